"""CLI commands `llmlab pretrain` and `llmlab scaling`: parse flags into TrainConfig, call the library, print."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from llmlab.train.config import PRESETS, TrainConfig

MODEL_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")


def add_train_flags(p: argparse.ArgumentParser):
    """One flag per TrainConfig field (--micro-batch, --no-progress, ...), defaults from the dataclass."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=f.default)


def train_config_from_args(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def cmd_pretrain(args) -> int:
    from llmlab.train.pretrain import model_config, pretrain
    from llmlab.data.pack import load_manifest

    cfg = train_config_from_args(args)
    manifest = load_manifest(args.data)
    model_cfg = model_config(args.preset, manifest["vocab_size"], cfg.seq_len, manifest.get("eos_id"),
                             **{k: getattr(args, k) for k in MODEL_FLAGS})
    result, final = pretrain(args.data, cfg, model_cfg, tokenizer_dir=args.tokenizer, resume=args.resume)
    if result.interrupted:
        return 130
    if final is not None:
        print(f"trained {result.step} steps; model written to {final}")
    return 0


def cmd_scaling(args) -> int:
    from llmlab.train.scaling import run_grid

    cfg = train_config_from_args(args)
    sizes = [s.strip() for s in args.sizes.split(",")]
    budgets = [int(float(b)) for b in args.tokens.split(",")]
    fit = run_grid(args.data, cfg, sizes, budgets, args.out_dir)
    print(fit.summary())
    return 0


def add_commands(subparsers):
    p = subparsers.add_parser("pretrain", help="train a transformer from scratch on packed token shards")
    p.add_argument("data", help="directory of token shards (llmlab data pack)")
    p.add_argument("--tokenizer", help="tokenizer directory: for samples, bits per byte and the final checkpoint")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    for name in MODEL_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    add_train_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser("scaling", help="train a grid of model sizes x token budgets and fit L(N, D)")
    p.add_argument("data", help="directory of token shards")
    p.add_argument("--sizes", default="d32,d48,d64,d96", help="model widths dNN (2 layers, heads of 16)")
    p.add_argument("--tokens", default="20000,40000,80000", help="token budgets per run")
    add_train_flags(p)
    p.set_defaults(func=cmd_scaling, out_dir="scaling", eval_every=0, save_every=0, warmup_steps=10)


def main(argv=None) -> int:
    """Stand-alone entry (python -m llmlab.cli.train ...), e.g. under torchrun."""
    return run_standalone(add_commands, argv)


def run_standalone(add, argv=None) -> int:
    """Parse and run the commands that `add` registers, without importing the whole CLI (torchrun ranks)."""
    from llmlab.errors import LLMLabError

    parser = argparse.ArgumentParser(prog="llmlab")
    add(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
