"""LoRA vs full SFT on SmolLM2-135M-Instruct for one task family: held-out accuracy, trainable parameters,
peak memory and time. Each mode runs in its own process so its peak memory is its own.

    python experiments/lora_vs_full.py [--model smollm2] [--family sort_list] [--steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bar_plot, write_results  # noqa: E402


def run_mode(args) -> dict:
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.model.lora import trainable_parameters
    from llmlab.train import tasks
    from llmlab.train.chat_data import conversations_to_examples
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import train
    from llmlab.train.sft import LoRAConfig, answer, peak_memory_mb, prepare_model, sft_objective
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_checkpoint(args.model)
    model = model.float()
    train_items = tasks.make_tasks(args.family, args.n_train, seed=0)
    eval_items = tasks.make_tasks(args.family, args.n_eval, seed=1)

    def accuracy(m):
        replies = answer(m, tokenizer, [it["messages"] for it in eval_items], max_new_tokens=args.max_new_tokens)
        return sum(tasks.check(r, it) for r, it in zip(replies, eval_items)) / len(eval_items)

    if args.mode == "base":
        return {"mode": "base (no finetuning)", "heldout_accuracy": accuracy(model)}
    lora = LoRAConfig(r=16, alpha=32) if args.mode == "lora" else None
    prepare_model(model, lora)
    trainable, total = trainable_parameters(model)
    cfg = TrainConfig(out_dir=str(Path(args.out) / f"run_{args.mode}"), seq_len=args.seq_len, micro_batch=args.micro_batch,
                      max_steps=args.steps, lr=1e-3 if lora else 5e-5, min_lr=1e-4 if lora else 5e-6,
                      warmup_steps=max(1, args.steps // 10), weight_decay=0.0, eval_every=0, save_every=0,
                      progress=False, threads=args.threads, peak_flops=1e12, keep_last=1)
    convs = [r["messages"] for r in tasks.sft_conversations(train_items)]
    objective = sft_objective(conversations_to_examples(convs, tokenizer), tokenizer, cfg)
    t0 = time.perf_counter()
    model = train(model, objective, cfg, resume=True).model
    seconds = time.perf_counter() - t0
    import shutil
    shutil.rmtree(Path(cfg.out_dir) / "checkpoints", ignore_errors=True)  # weights + AdamW state: GBs, not results
    return {"mode": "LoRA r16 (all linear)" if lora else "full", "heldout_accuracy": accuracy(model),
            "trainable_params": trainable, "total_params": total, "peak_memory_mb": round(peak_memory_mb()),
            "train_seconds": round(seconds, 1), "steps": args.steps}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--family", default="sort_list")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=50)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="experiments/results/lora_vs_full")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    rows = []
    for mode in ("base", "full", "lora"):
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    note = (f"SFT on {args.n_train} '{args.family}' demonstrations, {args.steps} steps of {args.micro_batch} packed rows x "
            f"{args.seq_len} tokens; held-out accuracy on {args.n_eval} items (greedy); CPU, shared machine")
    write_results(args.out, "lora_vs_full", rows, note)
    bar_plot(Path(args.out) / "lora_vs_full.png", [r["mode"] for r in rows],
             {"held-out accuracy": [r["heldout_accuracy"] for r in rows]}, f"SmolLM2-135M, {args.family}", "accuracy")


if __name__ == "__main__":
    main()
