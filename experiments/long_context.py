"""Needle in a haystack past SmolLM2's trained context (8,192 tokens), with and without context extension.

    .venv/bin/python experiments/long_context.py [--lengths 4096,16384] [--depths 0.25,0.75] [--methods none,yarn,self-extend]

For each method SmolLM2-135M-Instruct (the GGUF, fp32 eager) is loaded and extended to cover the longest haystack:
- none: positions past 8,192 are used as they are (RoPE extrapolation, what the model never saw);
- yarn / ntk / linear: RoPE scaling by the factor that covers the longest length (llmlab.model.rope);
- self-extend: grouped attention (llmlab.model.self_extend), group 4 and window 1,024 by default (Jin et al. 2024
  report Llama-2 passing needle retrieval at 4x its 4k context with similar settings, no training).
Writes experiments/results/long_context/{niah.md,niah.json,heatmap.png}: exact retrieval per (method, length,
depth). One 16k prompt costs a few minutes of CPU; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "long_context"
PAPER = "Self-Extend (Jin et al. 2024): Llama-2-7B-chat retrieves the passkey at every depth up to 16k (4x) with it, none past 4k without"


def load_extended(method: str, length: int, group: int, window: int):
    from llmlab.api import LLM
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.model.rope import extend_context
    from llmlab.model.self_extend import enable_self_extend

    model, tokenizer, path = load_checkpoint("smollm2", torch.float32)
    trained = model.config.max_seq_len
    need = length + 64  # the question and the answer
    if method == "none":
        model.config.max_seq_len = max(trained, need)
    elif method == "self-extend":
        enable_self_extend(model, group, window)
    else:
        extend_context(model, method, max(2.0, 2 ** math.ceil(math.log2(need / trained))))
    return LLM(model, tokenizer, path), trained


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--depths", default="0.25,0.75")
    p.add_argument("--methods", default="none,yarn,self-extend")
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    from llmlab.eval.niah import run_niah
    lengths = [int(v) for v in args.lengths.split(",")]
    depths = [float(v) for v in args.depths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        llm, trained = load_extended(method, max(lengths), args.group, args.window)
        kv = llm.info()["kv_cache_bytes_per_token"]
        for n in lengths:  # one length at a time: the KV cache of one 16k prompt is 0.75 GB in fp32
            t0 = time.perf_counter()
            summary = run_niah(llm, lengths=[n], depths=depths, max_tokens=16)
            for i, d in enumerate(depths):
                rows.append({"method": method, "length": n, "depth": d, "exact": summary["exact"][i][0],
                             "fuzzy": round(summary["fuzzy"][i][0], 3),
                             "output": summary["records"][i]["output"][:40]})
            print(f"{method:12s} {n:6d}: exact {[r['exact'] for r in rows[-len(depths):]]} "
                  f"({time.perf_counter() - t0:.0f} s; KV cache {kv / 1024:.0f} KiB/token)", flush=True)
            write(out, rows, lengths, depths, trained, kv)


def write(out: Path, rows, lengths, depths, trained, kv):
    from llmlab.io import atomic_write_text
    lines = [f"Needle in a haystack on SmolLM2-135M-Instruct (trained context {trained:,} tokens), exact retrieval.",
             f"Paper: {PAPER}.", f"KV cache: {kv / 1024:.0f} KiB per token in fp32.", "",
             "| method | length | depth | exact | fuzzy | output |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['method']} | {r['length']} | {r['depth']:.2f} | {r['exact']:.0f} | {r['fuzzy']:.2f} | "
              f"{r['output'].strip().replace('|', '/')!r} |" for r in rows]
    atomic_write_text(out / "niah.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "niah.json", json.dumps({"trained": trained, "rows": rows}, indent=2) + "\n")
    plot(out / "heatmap.png", rows, lengths, depths)


def plot(path: Path, rows, lengths, depths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 2.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = [[next((r["fuzzy"] for r in rows if r["method"] == m and r["length"] == n and r["depth"] == d), float("nan"))
                 for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(m)
        ax.set_xlabel("haystack tokens")
    axes[0][0].set_ylabel("needle depth")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
