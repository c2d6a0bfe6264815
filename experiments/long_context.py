"""Needle in a haystack past SmolLM2's trained context (8,192 tokens), with and without context extension.

    .venv/bin/python experiments/long_context.py [--runs none:4096,none:8192,self-extend:16384,none:16384]
                                                 [--depths 0.1,0.5,0.9] [--window 1024] [--group 0] [--native]

Each run is METHOD:LENGTH; SmolLM2-135M-Instruct (the GGUF, fp32 eager; --native: its 4-bit weights through the
native kernel, as llmlab.load gives them) is loaded and extended to cover LENGTH:
- none: positions past 8,192 are used as they are (RoPE extrapolation, what the model never saw); at 4k and 8k it
  is the in-context reference (can the model find a needle at all?);
- yarn / ntk / linear: RoPE scaling by the power-of-two factor that covers LENGTH (llmlab.model.rope);
- self-extend: grouped attention (llmlab.model.self_extend) with WINDOW neighbours at true distance and the smallest
  group of 2, 4, 8, 16 that reaches LENGTH (or --group); Jin et al. 2024 report Llama-2 passing needle retrieval at
  4x its 4k context with group 4-16, window 512-2048, no training.
One sample per (run, depth): the needle is drawn by the depth's index in --depths plus --first-needle and the filler
by the length, so runs with the same --depths and --first-needle are paired (the same needle and filler in every
cell). A heatmap cell that holds several needles (runs with other --first-needle) shows their mean fuzzy score and
their number.
Writes experiments/results/long_context/{niah.md,niah.json,heatmap.png} after every run: exact retrieval and a
fuzzy score per cell, with the wall-clock and CPU seconds of each run. A 16k prompt costs minutes of one core
(attention is quadratic); run it on a quiet machine.
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
ROOM = 64  # tokens for the question and the answer


def self_extend_group(trained: int, window: int, need: int) -> int:
    """The smallest group in 2, 4, 8, 16 whose reach, (trained - window + window // group) * group, covers need."""
    for group in (2, 4, 8, 16):
        if (trained - window + window // group) * group >= need:
            return group
    return 16


def load_extended(method: str, length: int, group: int, window: int, native: bool = False):
    """(LLM extended to cover length, trained context, what was done). native: the GGUF's packed weights through
    the native kernel, as llmlab.load gives them (else the dense fp32 model in PyTorch)."""
    import llmlab
    from llmlab.api import LLM
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.model.rope import extend_context
    from llmlab.model.self_extend import enable_self_extend

    model, tokenizer, path = load_checkpoint("smollm2", torch.float32)
    trained = model.config.max_seq_len
    need = length + ROOM
    options = {}
    if method == "none":
        model.config.max_seq_len = max(trained, need)
        how = "none"
    elif method == "self-extend":
        group = group or self_extend_group(trained, window, need)
        enable_self_extend(model, group, window)
        how, options = f"self-extend {group},{window}", {"self_extend": f"{group},{window}"}
    else:
        factor = max(2.0, 2 ** math.ceil(math.log2(need / trained)))
        extend_context(model, method, factor)
        how, options = f"{method}:{factor:g}", {"rope_scaling": f"{method}:{factor:g}"}
    if not native:
        return LLM(model, tokenizer, path), trained, how
    llm = llmlab.load("smollm2", announce=False, **options)
    if method == "none":  # positions past the trained context as they are
        llm.model.config.max_seq_len = llm.engine.context_len = max(trained, need)
    return llm, trained, how + " (native)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="none:4096,none:8192,self-extend:16384,none:16384",
                   help="METHOD:LENGTH,... (methods: none, self-extend, yarn, ntk, linear), run in this order")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--group", type=int, default=0, help="Self-Extend group (0: the smallest that reaches LENGTH)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--first-needle", type=int, default=0,
                   help="needle number of the first depth (llmlab.eval.niah.make_needle); the next depths count on")
    p.add_argument("--number-needles", action="store_true",
                   help="needles whose code is a number alone (make_needle(number=True)); their own heatmap panels")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true", help="keep the rows already in OUT/niah.json (other runs)")
    p.add_argument("--native", action="store_true",
                   help="the GGUF's 4-bit weights through the native kernel (llmlab.load's default), not dense fp32")
    args = p.parse_args(argv)
    from llmlab.eval.niah import run_niah
    runs = [(m, int(n)) for m, n in (r.split(":") for r in args.runs.split(","))]
    depths = [float(v) for v in args.depths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads((out / "niah.json").read_text())["rows"] if args.append and (out / "niah.json").is_file() else []
    for method, n in runs:
        llm, trained, how = load_extended(method, n, args.group, args.window, args.native)
        kv = llm.info()["kv_cache_bytes_per_token"]
        t0, cpu0 = time.perf_counter(), time.process_time()
        summary = run_niah(llm, lengths=[n], depths=depths, max_tokens=16, first_needle=args.first_needle,
                           number_needles=args.number_needles)
        for i, d in enumerate(depths):
            rows.append({"method": method + (", number needle" if args.number_needles else ""), "how": how,
                         "length": n, "depth": d, "exact": summary["exact"][i][0],
                         "fuzzy": round(summary["fuzzy"][i][0], 3), "output": summary["records"][i]["output"][:80],
                         "needle": summary["records"][i]["answer"],
                         "seconds": round(time.perf_counter() - t0),
                         "cpu_seconds": round(time.process_time() - cpu0)})
        print(f"{how:20s} {n:6d}: exact {[r['exact'] for r in rows[-len(depths):]]} "
              f"({time.perf_counter() - t0:.0f} s, {time.process_time() - cpu0:.0f} CPU s; "
              f"KV cache {kv / 1024:.0f} KiB/token)", flush=True)
        write(out, rows, trained, kv)
        del llm


def write(out: Path, rows, trained, kv):
    from llmlab.io import atomic_write_text
    lines = [f"Needle in a haystack on SmolLM2-135M-Instruct (trained context {trained:,} tokens), exact retrieval.",
             f"Paper: {PAPER}.", f"KV cache: {kv / 1024:.0f} KiB per token in fp32.", "",
             "Seconds per run (all its depths): wall clock on a loaded machine, and the process's CPU seconds.", "",
             "| method | length | depth | needle | exact | fuzzy | output | seconds (run) | CPU seconds (run) |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['how']} | {r['length']} | {r['depth']:.2f} | {r.get('needle', '')} | {r['exact']:.0f} | "
              f"{r['fuzzy']:.2f} | "
              f"{r['output'].strip().replace('|', '/')!r} | {r['seconds']} | {r.get('cpu_seconds', '')} |"
              for r in rows]
    atomic_write_text(out / "niah.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "niah.json", json.dumps({"trained": trained, "rows": rows}, indent=2) + "\n")
    plot(out / "heatmap.png", rows, sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows}))


def plot(path: Path, rows, lengths, depths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 2.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        cells = [[[r["fuzzy"] for r in rows if r["method"] == m and r["length"] == n and r["depth"] == d]
                  for n in lengths] for d in depths]  # a cell may hold several needles: their mean, and how many
        grid = [[sum(c) / len(c) if c else float("nan") for c in line] for line in cells]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")  # not run: blank
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if value == value:
                    many = f" ({len(cells[i][j])})" if len(cells[i][j]) > 1 else ""
                    ax.text(j, i, f"{value:.2f}{many}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        hows = " / ".join(dict.fromkeys(r["how"] for r in rows if r["method"] == m))
        ax.set_title(hows + (", number needles" if m.endswith("number needle") else ""), fontsize=9)
        ax.set_xlabel("haystack tokens")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle("SmolLM2-135M-Instruct NIAH, fuzzy retrieval score (trained context 8k; (n): n needles)", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
