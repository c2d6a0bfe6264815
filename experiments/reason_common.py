"""Shared bits of the test-time compute experiments: a cached pool of sampled chains of thought per question,
Wilson intervals for accuracies, and line plots with error bars."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from llmlab.io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).parent.parent
POOLS = ROOT / "runs" / "reason_pools"


def wilson(correct: int, n: int) -> tuple[float, float]:
    from llmlab.safety.stats import wilson_interval
    return wilson_interval(correct, n)


def accuracy_row(correct: int, n: int) -> dict:
    lo, hi = wilson(correct, n)
    return {"accuracy": correct / n, "ci_low": lo, "ci_high": hi, "n": n}


def sample_pool(client, items: list[dict], k: int, max_tokens: int, temperature: float, tag: str,
                log=print) -> list[dict]:
    """k chains of thought per question, in one request each (sample i uses seed + i, question q seeds from
    100_000 * q: exactly what llmlab.reason.evaluate gives question q), with each sample's extracted answer,
    mean token log-probability, length and correctness. Cached under runs/reason_pools/TAG.json: the
    experiments that read the same pool (frontier, self-consistency, over-optimisation) pay for it once. A cached
    pool with fewer samples is topped up: samples j >= its k are drawn from their own seeds seed + j, as a k-sample
    request would draw them (the same random streams; batched decoding may round differently)."""
    path = POOLS / f"{tag}.json"
    source = path if path.is_file() else _smaller_pool(tag)
    cached = json.loads(source.read_text()) if source else {"k": 0, "records": [], "seconds": 0.0}
    if len(cached["records"]) >= len(items) and cached["k"] >= k:
        return cached["records"][:len(items)]
    have = cached["k"] if len(cached["records"]) >= len(items) else 0
    records, t0 = [], time.perf_counter()
    for q, item in enumerate(items):
        rec = cached["records"][q] if have else None
        new = _draw(client, item, k - have, max_tokens, temperature, 100_000 * q + have)
        if rec is not None:
            new = {**{key: rec[key] + new[key] for key in ("samples", "answers", "logprob", "tokens", "correct")},
                   "item": item, "prompt_tokens": rec["prompt_tokens"] + new["prompt_tokens"]}
        records.append(new)
        log(f"pool {tag}: question {q + 1}/{len(items)}, samples {have}..{k - 1}, {time.perf_counter() - t0:.0f} s")
    POOLS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"k": k, "max_tokens": max_tokens, "temperature": temperature,
                                        "seconds": cached["seconds"] + time.perf_counter() - t0,
                                        "records": records}) + "\n")
    return records


def _smaller_pool(tag: str) -> Path | None:
    """The cached pool of the same questions and settings with the most samples (fewer than TAG's -kN), if any."""
    m = re.search(r"-k(\d+)-", tag)
    if not m:
        return None
    found = [(int(p.stem[m.start() + 2:].split("-", 1)[0]), p) for p in POOLS.glob(f"{tag[:m.start()]}-k*.json")
             if p.stem.split("-k", 1)[1].split("-", 1)[1] == tag[m.end():]] if POOLS.is_dir() else []
    found = [(k, p) for k, p in found if k < int(m.group(1))]
    return max(found)[1] if found else None


def _draw(client, item: dict, n: int, max_tokens: int, temperature: float, seed: int) -> dict:
    from llmlab.reason.strategies import best_of_n
    from llmlab.reason.tasks import is_correct
    t = best_of_n(client, item, n=n, scorer="likelihood", temperature=temperature, max_tokens=max_tokens,
                  seed=seed).trace
    return {"item": item, "samples": t.samples, "answers": t.answers, "logprob": t.scores,
            "tokens": t.sample_tokens, "correct": [is_correct(a, item) for a in t.answers],
            "prompt_tokens": t.prompt_tokens}


def pool_time(tag: str) -> float:
    """Seconds the cached pool TAG took to sample."""
    return json.loads((POOLS / f"{tag}.json").read_text())["seconds"]


def line_plot(path: Path, series: dict[str, list[tuple[float, float, float, float]]], title: str, xlabel: str,
              ylabel: str = "accuracy", logx: bool = False, hlines: dict[str, float] | None = None):
    """One line per series of (x, y, y_low, y_high) points, with error bars; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, points in series.items():
        xs, ys, lo, hi = zip(*sorted(points))
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]], marker="o",
                    capsize=3, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1)
        ax.text(ax.get_xlim()[0], y, f" {label}", va="bottom", fontsize=8, color="grey")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
