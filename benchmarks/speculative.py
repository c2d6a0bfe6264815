"""Prompt-lookup speculative decoding against plain decoding on SmolLM2-135M, greedy, batch 1.

    python benchmarks/speculative.py [--new-tokens 128] [--rounds 2] [--draft-tokens 5] [--int4]

Input-grounded prompts (repeat, rewrite, extract from or answer from a given passage) and open-ended ones; for each,
plain greedy (Engine.generate) and speculative greedy alternate over rounds in the same process and the best
round counts. Prints tokens/s of both, their ratio, the acceptance rate and tokens per model call, checks the two
outputs are the same tokens, and writes benchmarks/results/speculative.json. Run it on a quiet machine.

--int4: the 4-bit copies serve calls of at most 4 rows (llmlab.model.quant.INT4_MAX_ROWS), so a verify call of
k + 1 > 4 tokens runs on the dense weights; use --draft-tokens 3 to keep verify calls on the 4-bit path (and the
output identical to plain int4 decoding, which otherwise differs by the 4-bit rounding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmlab
from llmlab.engine import SamplingParams
from llmlab.engine.speculative import SpeculativeDecoder

RESULTS = Path(__file__).parent / "results" / "speculative.json"
PASSAGE = ("The Orkney lighthouse was built in 1833 by the engineer Alan Stevenson. Its lamp burned whale oil "
           "until 1870, when paraffin replaced it, and electricity arrived only in 1954. Three keepers lived on "
           "the rock in four-week shifts; supplies came by a boat from Stromness every fortnight, weather allowing. "
           "In 1998 the light was automated and the last keepers, James Flett and Robert Isbister, left the island.")
CODE = ("def total(items):\n    s = 0\n    for i in range(len(items)):\n        s = s + items[i]['price'] * "
        "items[i]['qty']\n    return s\n")
PROMPTS = {
    "grounded": [
        "Repeat this text exactly:\n\n" + PASSAGE,
        "Rewrite this Python function with clearer variable names, keeping its logic:\n\n" + CODE,
        PASSAGE + "\n\nList every year mentioned in the passage, each with what happened in it.",
        PASSAGE + "\n\nAnswer from the passage: who were the last keepers, and when did they leave?",
    ],
    "open-ended": [
        "Write a short story about a robot who learns to paint.",
        "Explain why the sky is blue to a ten-year-old.",
    ],
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_prompt(llm, prompt: str, params: SamplingParams, rounds: int, draft_tokens: int) -> dict:
    ids = llm.prompt_ids(prompt)
    best_plain = best_spec = float("inf")
    for _ in range(rounds):  # alternate, so a change in machine load hits both
        plain, t_plain = timed(lambda: llm.engine.generate([ids], params)[0])
        decoder = SpeculativeDecoder(llm.engine, draft_tokens)
        spec, t_spec = timed(lambda: decoder.generate(ids, params))
        best_plain, best_spec = min(best_plain, t_plain), min(best_spec, t_spec)
    stats = decoder.stats
    n = spec.completion_tokens
    return dict(prompt=prompt[:60], tokens=n, plain_tok_s=plain.completion_tokens / best_plain,
                speculative_tok_s=n / best_spec, ratio=(n / best_spec) / (plain.completion_tokens / best_plain),
                acceptance=stats.acceptance_rate, tokens_per_call=stats.tokens_per_step,
                same_tokens=spec.token_ids == plain.token_ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=5)
    ap.add_argument("--int4", action="store_true", help="decode with the 4-bit weight copies (see above)")
    args = ap.parse_args()
    llm = llmlab.load("smollm2", dtype=torch.float32, int4=args.int4)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    rows = []
    print(f"{'kind':<11} {'prompt':<40} {'plain':>7} {'spec':>7} {'ratio':>6} {'accept':>7} {'tok/call':>8} same")
    for kind, prompts in PROMPTS.items():
        for prompt in prompts:
            row = dict(kind=kind, **run_prompt(llm, prompt, params, args.rounds, args.draft_tokens))
            rows.append(row)
            print(f"{kind:<11} {row['prompt'][:40].replace(chr(10), ' '):<40} {row['plain_tok_s']:7.1f} "
                  f"{row['speculative_tok_s']:7.1f} {row['ratio']:6.2f} {row['acceptance']:7.0%} "
                  f"{row['tokens_per_call']:8.2f} {row['same_tokens']}")
    for kind in PROMPTS:
        ratios = [r["ratio"] for r in rows if r["kind"] == kind]
        print(f"{kind}: mean speed-up {sum(ratios) / len(ratios):.2f}x (min {min(ratios):.2f}x)")
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(int4=args.int4, draft_tokens=args.draft_tokens, new_tokens=args.new_tokens,
                                   cpu=_cpu_name(), rows=rows), indent=1))
    tmp.replace(RESULTS)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
