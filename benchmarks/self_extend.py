"""Self-Extend on SmolLM2-135M past its trained context: the native kernel against the dense fp32 model.

    python benchmarks/self_extend.py [--prompt-tokens 10000] [--self-extend 4,1024] [--steps 32]

Before the native kernel knew Self-Extend, `--self-extend` ran on the dense fp32 model (llmlab.model.self_extend);
now `llmlab.load(FILE, self_extend=...)` keeps the native kernel on the file's 4-bit weights. Both paths prefill the
same random prompt once and then take greedy decode steps after it, one path after the other in this process.
llama.cpp's tools have no benchmark of their grouped attention (`--grp-attn-n`), so the comparison is the path a
user got before. Writes benchmarks/results/self_extend.json; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmlab
from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text

RESULTS = Path(__file__).parent / "results" / "self_extend.json"


def measure(n: int, spec: str, steps: int, **options) -> dict:
    """Seconds to prefill n random tokens, and decode steps per second after them."""
    llm = llmlab.load("smollm2", self_extend=spec, announce=False, **options)
    ids = torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = llm.model.new_cache(1, n + steps + 1)
    with torch.no_grad():
        start = time.perf_counter()
        logits, _ = llm.engine.prefill(ids, cache=cache)
        prefill = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for i in range(steps):
            token = llm.engine.decode_step(token, torch.tensor([[n + i]]), cache).argmax(-1, keepdim=True)
        decode = time.perf_counter() - start
    return {"prefill_s": round(prefill, 2), "prefill_tok_s": round(n / prefill, 1),
            "decode_tok_s": round(steps / decode, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=10000)
    ap.add_argument("--self-extend", default="4,1024", help="GROUP,WINDOW")
    ap.add_argument("--steps", type=int, default=32, help="decode steps after the prompt")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.prompt_tokens < 1 or args.steps < 1:
        ap.error("--prompt-tokens and --steps must be at least 1")
    rows = {}
    for name, options in (("native", {}), ("dense fp32", {"exact": True})):
        try:
            rows[name] = measure(args.prompt_tokens, args.self_extend, args.steps, **options)
        except LLMLabError as e:  # a bad --self-extend, a prompt past its reach
            raise SystemExit(f"self_extend.py: {e}") from None
        print(f"{name:>10}: prefill {args.prompt_tokens} tokens {rows[name]['prefill_s']} s "
              f"({rows[name]['prefill_tok_s']} tok/s), decode {rows[name]['decode_tok_s']} tok/s", flush=True)
    ratios = {key: round(rows["native"][key] / rows["dense fp32"][key], 2) for key in ("prefill_tok_s", "decode_tok_s")}
    print(f"native / dense: prefill {ratios['prefill_tok_s']}x, decode {ratios['decode_tok_s']}x")
    result = {"prompt_tokens": args.prompt_tokens, "self_extend": args.self_extend, "steps": args.steps,
              "threads": torch.get_num_threads(), "paths": rows, "native_vs_dense": ratios}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
