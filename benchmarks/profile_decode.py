"""Where a batch-1 decode step's time goes on SmolLM2-135M: torch.profiler over a few steps after warm-up.

    python benchmarks/profile_decode.py [--path int4|fp32|native] [--steps 20] [--threads 2]

Prints the ops by self CPU time and the step's wall time; the step is Engine.decode_step at batch 1 with a
128-token prompt in the cache, as benchmarks/decode.py measures it.
"""

from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", choices=["int4", "fp32", "native"], default="int4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import llmlab

    llm = llmlab.load("smollm2", int4=args.path == "int4", exact=args.path == "fp32")
    if args.path == "native" and llm.engine.native_step is None:
        raise SystemExit("the native kernel was not chosen (see the line above)")
    engine = llm.engine
    ids = llm.tokenizer.encode("The history of the printing press begins in the fifteenth century. " * 12)[:128]
    _, cache = engine.prefill(ids, max_len=256)
    token, pos = torch.tensor([[ids[-1]]]), torch.tensor([[len(ids)]])

    def step():
        nonlocal token, pos
        logits = engine.decode_step(token, pos, cache)
        token, pos = logits.argmax(-1, keepdim=True), pos + 1

    for _ in range(5):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - t0) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{args.path}: {per_step * 1e3:.2f} ms per step ({1 / per_step:.1f} tok/s) without the profiler, "
          f"{args.threads} threads")


if __name__ == "__main__":
    main()
