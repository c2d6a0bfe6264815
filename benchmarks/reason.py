"""Self-consistency's k samples in one request (shared prefill, one decode batch) against a naive loop of k calls.

    python benchmarks/reason.py [--k 16] [--max-tokens 64] [--questions 4] [--rounds 2] [--int4]

Both sides run llmlab.reason's chain-of-thought prompt on SmolLM2 through the same LocalClient, with the same
seeds (sample i of a question uses seed + i in both, so they generate the same texts): "shared" asks once with
GenParams(n=k); "loop" asks k times with n=1 and seed + i. The best of `rounds` alternating rounds counts. Prints
seconds per question for each, the ratio loop / shared and whether the samples matched, and writes
benchmarks/results/reason.json. Run it on a quiet machine: on 2 cores any other busy process skews both sides.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "reason.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--int4", action="store_true", help="decode through 4-bit copies (used only for <= 4 rows)")
    args = ap.parse_args()

    from llmlab.client import GenParams, connect
    from llmlab.io import atomic_write_text
    from llmlab.reason.prompts import cot_prompt
    from llmlab.reason.tasks import make_items

    client = connect(model="smollm2", int4=args.int4)
    prompts = [cot_prompt(item) for item in make_items("arithmetic", args.questions, seed=0)]

    def params(n, seed):
        return GenParams(max_tokens=args.max_tokens, temperature=0.7, n=n, seed=seed)

    def shared():
        return [[g.text for g in client.complete([p], params(args.k, 100 * q))[0]] for q, p in enumerate(prompts)]

    def loop():
        return [[client.generate([p], params(1, 100 * q + i))[0].text for i in range(args.k)]
                for q, p in enumerate(prompts)]

    client.generate([prompts[0]], params(1, 0))  # warm up: first-call allocations are nobody's cost
    best = {"shared": float("inf"), "loop": float("inf")}
    texts = {}
    for _ in range(args.rounds):
        for name, fn in (("shared", shared), ("loop", loop)):
            t0 = time.perf_counter()
            texts[name] = fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / len(prompts))
    ratio = best["loop"] / best["shared"]
    same = texts["shared"] == texts["loop"]
    tokens = sum(client.count_tokens(t) for qs in texts["shared"] for t in qs) / len(prompts)
    print(f"self-consistency k={args.k}, {args.max_tokens} max tokens, {len(prompts)} questions, "
          f"~{tokens:.0f} generated tokens/question")
    print(f"  one request, n={args.k} (shared prefill, one batch): {best['shared']:.2f} s/question")
    print(f"  a loop of {args.k} requests, n=1:                  {best['loop']:.2f} s/question")
    print(f"  ratio loop / shared: {ratio:.2f}x; same samples: {same}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps({"k": args.k, "max_tokens": args.max_tokens, "questions": len(prompts),
                                           "int4": args.int4, "seconds_per_question": best, "ratio": ratio,
                                           "same_samples": same}, indent=2) + "\n")


if __name__ == "__main__":
    main()
