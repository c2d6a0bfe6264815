"""Training throughput: llmlab's train_step against transformers' LlamaForCausalLM in a plain PyTorch loop.

Same ~35M-parameter Llama, same batches, bf16 autocast over fp32 weights, gradient clipping and the same
threads; the two alternate in rounds so machine noise hits both alike, and the median round counts. Prints
tokens/s, MFU and the ratio and writes benchmarks/results/train.json.

llmlab's step is exactly the training loop's (train_step, lm_loss, make_optimizer: fused AdamW); with --compile,
the model and the cross-entropy are compiled as `TrainConfig.compile` does. transformers' side is the plain loop
a user writes: model(input_ids).logits, F.cross_entropy on fp32 logits, AdamW (foreach, or fused with
--hf-optimizer fused to compare model + loss alone).

    python benchmarks/train.py [--rounds 5] [--steps 2] [--threads 1] [--compile] [--hf-optimizer fused]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.io import atomic_write_text
from llmlab.model import ModelConfig, Transformer
from llmlab.train.config import PRESETS, TrainConfig
from llmlab.train.flops import flops_per_token, peak_flops
from llmlab.train.loop import Objective, train_step
from llmlab.train.optim import make_optimizer
from llmlab.train.pretrain import TokenBatches, lm_loss


def hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round and side")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="torch.compile llmlab's model and loss")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    ap.add_argument("--hf-optimizer", choices=("foreach", "fused"), default="foreach")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    load_start = os.getloadavg()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, max_seq_len=a.seq_len, **PRESETS["30m"])
    tcfg = TrainConfig(seq_len=a.seq_len, micro_batch=a.micro_batch, grad_accum=1, dtype="bfloat16",
                       grad_clip=1.0, compile=a.compile)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2_000_000, dtype=np.int64).astype(np.uint16)

    ours = Transformer(cfg).init_weights(seed=0).train()
    ours_fwd = torch.compile(ours) if a.compile else ours
    ours_opt = make_optimizer(ours, 3e-4, 0.1)
    ours_obj = Objective(lm_loss, TokenBatches(tokens, a.seq_len, a.micro_batch, 1))

    theirs = hf_model(cfg).train()
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=3e-4, weight_decay=0.1, **{a.hf_optimizer: True})
    theirs_batches = TokenBatches(tokens, a.seq_len, a.micro_batch, 1)

    def llmlab_step():
        train_step(ours, ours_fwd, ours_obj, ours_opt, tcfg)

    def hf_step():
        x, y = next(theirs_batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = theirs(input_ids=x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)

    step_tokens = a.micro_batch * a.seq_len
    for fn in (llmlab_step, hf_step):  # warm-up: allocator, kernel selection, compilation
        fn(); fn()
    times = {"llmlab": [], "transformers": []}
    for r in range(a.rounds):
        for name, fn in (("llmlab", llmlab_step), ("transformers", hf_step)):
            t = time.perf_counter()
            for _ in range(a.steps):
                fn()
            times[name].append(a.steps * step_tokens / (time.perf_counter() - t))
            print(f"round {r + 1}: {name:13s} {times[name][-1]:8.0f} tokens/s", flush=True)

    fpt = flops_per_token(cfg, a.seq_len)
    peak = peak_flops(torch.bfloat16)
    result = {
        "model": {"params": ours.num_params(), **{k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads",
                                                                                 "hidden_dim", "vocab_size")}},
        "seq_len": a.seq_len, "micro_batch": a.micro_batch, "dtype": "bfloat16 autocast, fp32 weights",
        "threads": torch.get_num_threads(), "compile": a.compile, "hf_optimizer": a.hf_optimizer,
        "rounds": a.rounds, "steps_per_round": a.steps,
        "flops_per_token": fpt, "peak_flops_bf16_matmul": peak, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }
    for name, tps in times.items():
        med = statistics.median(tps)
        result[name] = {"tokens_per_s": med, "mfu": fpt * med / peak, "per_round": tps}
    result["ratio_llmlab_over_transformers"] = result["llmlab"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    # each round's two contenders ran back to back, under about the same load: their ratio is the steadier number
    ratios = [o / t for o, t in zip(times["llmlab"], times["transformers"])]
    result["ratio_median_of_rounds"] = statistics.median(ratios)
    print(f"llmlab       {result['llmlab']['tokens_per_s']:8.0f} tokens/s  MFU {result['llmlab']['mfu']:.1%}")
    print(f"transformers {result['transformers']['tokens_per_s']:8.0f} tokens/s  MFU {result['transformers']['mfu']:.1%}")
    print(f"ratio {result['ratio_llmlab_over_transformers']:.2f}x, per-round median "
          f"{result['ratio_median_of_rounds']:.2f}x (peak bf16 matmul {peak / 1e9:.0f} GFLOP/s, "
          f"{torch.get_num_threads()} threads, load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    atomic_write_text(a.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
