"""SFT throughput and peak memory on SmolLM2-135M: llmlab (full and LoRA) against transformers + peft in a plain loop.

Same weights (the GGUF dequantised to fp32, written once as a Hugging Face directory for transformers), same
packed chat rows from the arithmetic task family (loss on assistant tokens only), bf16 autocast over fp32
weights, AdamW(foreach), the same threads. Each configuration runs in its own process, so the peak resident
memory (ru_maxrss; CUDA's allocator peak on a GPU) belongs to it alone. Writes benchmarks/results/finetune.json.

    python benchmarks/finetune.py [--model smollm2] [--steps 4] [--micro-batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = ["llmlab-full", "hf-full", "llmlab-lora", "hf-peft-lora"]
LORA = dict(r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def rows_for(tokenizer, seq_len: int, n: int):
    from llmlab.train import tasks
    from llmlab.train.chat_data import conversations_to_examples, to_rows
    from llmlab.train.sft import pad_id_of
    convs = [r["messages"] for r in tasks.sft_conversations(tasks.make_tasks("all", n, seed=0))]
    return to_rows(conversations_to_examples(convs, tokenizer), seq_len, pack=True, pad_id=pad_id_of(tokenizer))


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, args) -> dict:
    from llmlab.api import load_checkpoint
    from llmlab.train.chat_data import IGNORE, collate_rows
    from llmlab.train.optim import make_optimizer
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    llm_model, tokenizer, _ = load_checkpoint(args.model)
    rows = rows_for(tokenizer, args.seq_len, 2000)
    batches = [collate_rows(rows[i * args.micro_batch:(i + 1) * args.micro_batch]) for i in range(args.steps + 1)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if name.startswith("llmlab"):
        from llmlab.train.sft import sft_loss
        model = llm_model.float().to(device).train()
        if name == "llmlab-lora":
            from llmlab.model.lora import apply_lora
            apply_lora(model, **LORA)
        else:
            model.requires_grad_(True)
        optimizer = make_optimizer(model, 1e-5, 0.0)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _ = sft_loss(model, (x, y))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        del llm_model
        model = model.to(device).train()
        if name == "hf-peft-lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                     target_modules=list(LORA["targets"]), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=True)

        def step(x, y):
            # the plain loop: full logits, shifted labels already in y (-100 where no loss)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x, y = batches[0]
    step(x.to(device), y.to(device))  # warm-up: allocator, optimizer state
    tokens, t0 = 0, time.perf_counter()
    for x, y in batches[1:]:
        step(x.to(device), y.to(device))
        tokens += x.numel()
    dt = time.perf_counter() - t0
    return {"config": name, "tokens_per_s": tokens / dt, "peak_memory_mb": peak_mb(), "trainable_params": trainable,
            "seconds_per_step": dt / args.steps}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune.json"))
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return

    import tempfile
    from llmlab.api import load_checkpoint
    from llmlab.checkpoint.hf import save_hf_dir
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, _ = load_checkpoint(args.model)
        hf_dir = save_hf_dir(model.float(), Path(tmp) / "hf", tokenizer=tokenizer)
        del model
        results = []
        for name in CONFIGS:
            cmd = [sys.executable, __file__, "--one", name, "--hf-dir", str(hf_dir), "--model", args.model,
                   "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{name:14s} {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_memory_mb']:7.0f} MB  "
                  f"trainable {r['trainable_params']:,}", flush=True)
    by = {r["config"]: r for r in results}
    ratios = {kind: by[f"llmlab-{kind}"]["tokens_per_s"] / by[hf]["tokens_per_s"]
              for kind, hf in (("full", "hf-full"), ("lora", "hf-peft-lora"))}
    for kind, r in ratios.items():
        mem = by[f"llmlab-{kind}"]["peak_memory_mb"] / by["hf-full" if kind == "full" else "hf-peft-lora"]["peak_memory_mb"]
        print(f"{kind}: llmlab / transformers tokens/s = {r:.2f}x, peak memory ratio {mem:.2f}")
    from llmlab.io import atomic_write_text
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"results": results, "speedup": ratios, "settings": vars(args),
                                            "machine": platform.processor() or platform.machine(),
                                            "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
