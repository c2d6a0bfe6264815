"""CLI commands for post-training: `llmlab sft`, `merge`, `reward`, `dpo`, `rl` and `task-data` (write task-family JSONL)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from llmlab.cli.train import add_train_flags, train_config_from_args
from llmlab.train.config import RLConfig

# finetuning defaults differ from pretraining ones: few steps, small learning rate, short warmup
FINETUNE_DEFAULTS = dict(lr=2e-5, min_lr=2e-6, warmup_steps=10, max_steps=200, seq_len=512, micro_batch=4,
                         weight_decay=0.0, eval_every=0, save_every=200)


def add_lora_flags(p):
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    p.add_argument("--lora-r", type=int, default=8, help="adapter rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (scaling = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names to adapt")


def lora_from_args(args):
    if not args.lora:
        return None
    from llmlab.train.sft import LoRAConfig
    return LoRAConfig(args.lora_r, args.lora_alpha, args.lora_dropout,
                      tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))


def add_common(p, data_help: str):
    p.add_argument("model", help="base checkpoint: registry name, checkpoint directory or .gguf file")
    p.add_argument("data", help=data_help)
    p.add_argument("--val-data", help="held-out JSONL of the same kind")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's own)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines instead of stopping")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    add_train_flags(p)


def report_skipped(summary):
    if summary.get("skipped_lines"):
        print(f"skipped {summary['skipped_lines']} bad lines", file=sys.stderr)


def cmd_sft(args) -> int:
    from llmlab.train.sft import sft
    summary = sft(args.model, args.data, train_config_from_args(args), lora=lora_from_args(args),
                  val_data=args.val_data, pack=args.pack, skip_bad=args.skip_bad, resume=args.resume,
                  tokenizer_path=args.tokenizer)
    report_skipped(summary)
    if summary["interrupted"]:
        return 130
    print(f"trained {summary['steps']} steps ({summary['trainable_params']:,} of {summary['total_params']:,} "
          f"parameters trainable, peak memory {summary['peak_memory_mb']:.0f} MB); wrote {summary['path']}")
    return 0


def cmd_merge(args) -> int:
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.api import load_with_adapter
    llm = load_with_adapter(args.model, args.adapter, merge=True)
    path = save_hf_dir(llm.model, args.out, dtype=args.dtype, tokenizer=llm.tokenizer)
    print(f"merged {args.adapter} into {args.model}; wrote {path}")
    return 0


def cmd_reward(args) -> int:
    from llmlab.train.reward import train_reward
    summary = train_reward(args.model, args.data, train_config_from_args(args), val_data=args.val_data,
                           skip_bad=args.skip_bad, resume=args.resume, tokenizer_path=args.tokenizer)
    report_skipped(summary)
    acc = summary["val_accuracy"]
    shown = f"held-out pairwise accuracy {acc:.3f}; " if acc is not None else ""
    print(f"trained {summary['steps']} steps; {shown}wrote {summary['path']}")
    return 0


def cmd_dpo(args) -> int:
    from llmlab.train.dpo import dpo
    summary = dpo(args.model, args.data, train_config_from_args(args), beta=args.beta, loss_type=args.loss,
                  lora=lora_from_args(args), reference=args.reference, val_data=args.val_data,
                  skip_bad=args.skip_bad, resume=args.resume, tokenizer_path=args.tokenizer)
    report_skipped(summary)
    print(f"trained {summary['steps']} steps; wrote {summary['path']}")
    return 0


def cmd_rl(args) -> int:
    from llmlab.train.rl import rl
    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    result = rl(args.model, cfg, task=args.task, n_prompts=args.prompts, n_eval=args.eval_prompts,
                reward_model_path=args.reward_model, lora=lora_from_args(args), resume=args.resume)
    if result["interrupted"]:
        return 130
    print(json.dumps({"before": result["before"], "after": result["after"], "kl": result["kl"],
                      "path": result["path"]}))
    return 0


def cmd_tasks(args) -> int:
    from llmlab.io import atomic_write_text
    from llmlab.train import tasks
    items = tasks.make_tasks(args.family, args.n, args.seed)
    records = {"sft": tasks.sft_conversations, "pairs": lambda it: tasks.preference_pairs(it, args.seed),
               "items": lambda it: it}[args.kind](items)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} {args.kind} records to {args.out}")
    return 0


def add_commands(subparsers):
    p = subparsers.add_parser("sft", help="supervised finetuning on chat JSONL ({'messages': [...]}), full or LoRA")
    add_common(p, "JSONL of {'messages': [{'role', 'content'}, ...]}")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack short conversations into full rows")
    add_lora_flags(p)
    p.set_defaults(func=cmd_sft, out_dir="out_sft", **FINETUNE_DEFAULTS)

    p = subparsers.add_parser("merge", help="fold a LoRA adapter into its base model's weights")
    p.add_argument("model", help="base checkpoint")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="directory for the merged checkpoint")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("reward", help="train a reward model (Bradley-Terry) on preference JSONL")
    add_common(p, "JSONL of {'prompt' or 'messages', 'chosen', 'rejected'}")
    p.set_defaults(func=cmd_reward, out_dir="out_reward", **FINETUNE_DEFAULTS)

    p = subparsers.add_parser("dpo", help="direct preference optimisation (or IPO) on preference JSONL")
    add_common(p, "JSONL of {'prompt' or 'messages', 'chosen', 'rejected'}")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid")
    p.add_argument("--reference", choices=["precompute", "adapter_off"], default="precompute",
                   help="reference log-probs: computed once before training, or the model with its adapter off")
    add_lora_flags(p)
    p.set_defaults(func=cmd_dpo, out_dir="out_dpo", **{**FINETUNE_DEFAULTS, "lr": 5e-6, "min_lr": 5e-7})

    p = subparsers.add_parser("rl", help="RL (GRPO or PPO) on a task family with a verifiable reward or a reward model")
    p.add_argument("model", help="policy checkpoint")
    p.add_argument("--task", default="arithmetic", help="task family (arithmetic, count_letters, json_format, "
                                                        "sort_list, all)")
    p.add_argument("--prompts", type=int, default=256, help="training prompts generated from the seed")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts (another seed)")
    p.add_argument("--reward-model", help="reward model directory (default: the task's verifiable reward)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    for f in dataclasses.fields(RLConfig):  # llmlab.train.config's: llmlab.train.rl imports torch
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    add_lora_flags(p)
    p.set_defaults(func=cmd_rl)

    p = subparsers.add_parser("task-data", help="write task-family data: SFT conversations, preference pairs or items")
    p.add_argument("family", help="arithmetic, count_letters, json_format, sort_list or all")
    p.add_argument("--kind", choices=["sft", "pairs", "items"], default="sft")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tasks)


def main(argv=None) -> int:
    """Stand-alone entry (python -m llmlab.cli.post_train ...), e.g. under torchrun."""
    from llmlab.cli.train import run_standalone
    return run_standalone(add_commands, argv)


if __name__ == "__main__":
    sys.exit(main())
