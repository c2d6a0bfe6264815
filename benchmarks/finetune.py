"""SFT throughput and peak memory on SmolLM2-135M: llmlab (full and LoRA) against transformers + peft in a plain loop.

Like for like: the same weights (the GGUF dequantised to fp32, written once as a Hugging Face directory that both
sides load), the same micro-batches (packed chat rows of the task families, loss on assistant tokens only, made
once and handed to every process), bf16 autocast over fp32 weights on both sides, gradient clipping at 1.0, the
same threads, LoRA r=8, alpha=16 on all seven projections.

llmlab's step is the training loop's own (train_step with sft_loss and make_optimizer's fused AdamW, the model
compiled as `TrainConfig.compile` does: block by block); transformers' is the loop a user writes:
model(input_ids).logits, F.cross_entropy on the fp32 logits, AdamW(foreach) (or fused: --hf-optimizer fused).
Compilation happens in the warm-up steps, which are timed separately and not counted in tokens/s.

Each configuration runs in its own fresh process, so the peak resident memory (ru_maxrss; CUDA's allocator peak
on a GPU) belongs to it alone; inductor compiles in that process (TORCHINDUCTOR_COMPILE_THREADS=1), so compiler
memory is counted too. The configurations alternate over rounds, so machine noise hits all alike; tokens/s is
each configuration's median over rounds, and the speedup is the median of the per-round ratios. Writes
benchmarks/results/finetune.json.

    python benchmarks/finetune.py [--rounds 3] [--steps 4] [--micro-batch 4] [--seq-len 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = ["llmlab-full", "hf-full", "llmlab-lora", "hf-peft-lora"]
PEER = {"full": "hf-full", "lora": "hf-peft-lora"}
LORA = dict(r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
WARMUP = 2  # steps: compilation, allocator, optimizer state


def make_batches(tokenizer, args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from llmlab.train import tasks
    from llmlab.train.chat_data import collate_rows, conversations_to_examples, to_rows
    from llmlab.train.sft import pad_id_of
    n = WARMUP + args.steps
    convs = [r["messages"] for r in tasks.sft_conversations(tasks.make_tasks("all", 16 * args.micro_batch * n, seed=0))]
    rows = to_rows(conversations_to_examples(convs, tokenizer), args.seq_len, pack=True, pad_id=pad_id_of(tokenizer))
    assert len(rows) >= n * args.micro_batch, "too few conversations for the rows asked for"
    return [collate_rows(rows[i * args.micro_batch:(i + 1) * args.micro_batch]) for i in range(n)]


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llmlab_step(name: str, args, device):
    """The training loop's step on the llmlab model (sft's prepare_model: all weights, or a LoRA adapter)."""
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import Objective, train_step
    from llmlab.train.optim import make_optimizer
    from llmlab.train.sft import LoRAConfig, prepare_model, sft_loss
    model, _, _ = load_checkpoint(args.hf_dir)
    model = prepare_model(model.float().to(device), LoRAConfig(**LORA) if name == "llmlab-lora" else None)
    cfg = TrainConfig(seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=1, dtype="bfloat16",
                      grad_clip=1.0, compile=not args.no_compile)
    forward_model = torch.compile(model) if cfg.compile else model  # as train() does
    optimizer = make_optimizer(model, 1e-5, 0.0)
    objective = Objective(sft_loss, batches=None)

    def step(x, y):
        objective.batches = iter([(x, y)])
        train_step(model, forward_model, objective, optimizer, cfg)
    return model, step


def hf_step(name: str, args, device):
    """The plain loop: transformers' model (+ peft's adapter), full fp32 logits, torch AdamW."""
    from transformers import AutoModelForCausalLM
    from llmlab.train.chat_data import IGNORE
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).train()
    if name == "hf-peft-lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=list(LORA["targets"]), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **{args.hf_optimizer: True})

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def run_one(name: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = torch.load(args.batches)
    model, step = (llmlab_step if name.startswith("llmlab") else hf_step)(name, args, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    for x, y in batches[:WARMUP]:
        step(x.to(device), y.to(device))
    warmup = time.perf_counter() - t0
    tokens, t0 = 0, time.perf_counter()
    for x, y in batches[WARMUP:]:
        step(x.to(device), y.to(device))
        tokens += x.numel()
    dt = time.perf_counter() - t0
    return {"config": name, "tokens_per_s": tokens / dt, "peak_memory_mb": peak_mb(), "trainable_params": trainable,
            "seconds_per_step": dt / args.steps, "warmup_seconds": warmup}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=3, help="each round runs every configuration once, in turn")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration and round")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-optimizer", choices=("foreach", "fused"), default="foreach")
    p.add_argument("--no-compile", action="store_true", help="llmlab eager (TrainConfig.compile off)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune.json"))
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return

    import tempfile
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.checkpoint.hf import save_hf_dir
    load_start, t_start = os.getloadavg(), time.perf_counter()
    runs = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, _ = load_checkpoint(args.model)
        hf_dir = save_hf_dir(model.float(), Path(tmp) / "hf", tokenizer=tokenizer)
        del model
        batches = make_batches(tokenizer, args)
        torch.save(batches, Path(tmp) / "batches.pt")
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        for r in range(args.rounds):
            for name in CONFIGS:
                cmd = [sys.executable, __file__, "--one", name, "--hf-dir", str(hf_dir), "--batches",
                       str(Path(tmp) / "batches.pt"), "--steps", str(args.steps), "--micro-batch",
                       str(args.micro_batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
                       "--hf-optimizer", args.hf_optimizer] + (["--no-compile"] if args.no_compile else [])
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(res)
                print(f"round {r + 1}: {name:13s} {res['tokens_per_s']:7.1f} tok/s  "
                      f"peak {res['peak_memory_mb']:6.0f} MB  warm-up {res['warmup_seconds']:5.1f} s  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)

    results = []
    for name, rs in runs.items():
        results.append({"config": name, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                        "peak_memory_mb": max(r["peak_memory_mb"] for r in rs),
                        "trainable_params": rs[0]["trainable_params"],
                        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
                        "warmup_seconds": statistics.median(r["warmup_seconds"] for r in rs),
                        "per_round_tokens_per_s": [r["tokens_per_s"] for r in rs]})
    by = {r["config"]: r for r in results}
    speedup, memory = {}, {}
    print(f"\n{'':6s} {'llmlab tok/s':>12s} {'peer tok/s':>11s} {'speedup':>8s} {'llmlab MB':>10s} {'peer MB':>8s}"
          f" {'memory':>7s} {'trainable':>12s}")
    for kind, peer in PEER.items():
        ours = runs[f"llmlab-{kind}"]
        speedup[kind] = statistics.median(o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, runs[peer]))
        memory[kind] = by[f"llmlab-{kind}"]["peak_memory_mb"] / by[peer]["peak_memory_mb"]
        print(f"{kind:6s} {by[f'llmlab-{kind}']['tokens_per_s']:12.1f} {by[peer]['tokens_per_s']:11.1f} "
              f"{speedup[kind]:7.2f}x {by[f'llmlab-{kind}']['peak_memory_mb']:10.0f} {by[peer]['peak_memory_mb']:8.0f}"
              f" {memory[kind]:6.2f}x {by[f'llmlab-{kind}']['trainable_params']:12,d}")
    load_end = os.getloadavg()
    print(f"(llmlab / transformers+peft; median of {args.rounds} alternating rounds; {args.threads} threads; "
          f"load average {load_start[0]:.1f} -> {load_end[0]:.1f}; {time.perf_counter() - t_start:.0f} s)")
    from llmlab.io import atomic_write_text
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "hf_dir", "batches", "out")}
    atomic_write_text(args.out, json.dumps({
        "results": results, "speedup": speedup, "peak_memory_ratio": memory, "settings": settings,
        "dtype": "bf16 autocast over fp32 weights, fp32 cross-entropy (both sides)",
        "llmlab": "train_step + sft_loss (lm_head on assistant positions only), fused AdamW, "
                  + ("eager" if args.no_compile else "torch.compile per block"),
        "transformers": f"model(input_ids).logits + F.cross_entropy, AdamW({args.hf_optimizer}), eager",
        "tokens_per_step": args.micro_batch * args.seq_len, "warmup_steps": WARMUP,
        "load_average_start": load_start, "load_average_end": load_end,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
