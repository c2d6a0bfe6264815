"""Run a strategy over a set of questions: accuracy, tokens and time; sweeps over its budget knob."""

from __future__ import annotations

import time

from llmlab.errors import LLMLabError
from llmlab.reason import strategies, tree
from llmlab.reason.tasks import is_correct

STRATEGIES = {
    "direct": strategies.direct,
    "cot": strategies.cot,
    "self-consistency": strategies.self_consistency,
    "best-of-n": strategies.best_of_n,
    "tree": tree.tree_of_thoughts,
    "revise": strategies.revise,
    "router": strategies.router,
    "debate": strategies.debate,
}
# the option each strategy's compute grows with: what --sweep varies and -k sets
SIZE_OPTION = {"self-consistency": "k", "best-of-n": "n", "tree": "breadth", "revise": "rounds", "router": "k",
               "debate": "rounds"}


def strategy_fn(name: str):
    if name not in STRATEGIES:
        raise LLMLabError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def solve(name: str, client, item: dict, strong=None, **options):
    """One question through a named strategy. The router needs `strong` (a second client, or the same one);
    debate runs its agents on `client` (and `strong`, when given) with personas."""
    fn = strategy_fn(name)
    if name == "router":
        return fn(client, strong or client, item, **options)
    if name == "debate":
        agents = [client, strong or client]
        return fn(agents, item, **options)
    return fn(client, item, **options)


def evaluate(name: str, client, items: list[dict], strong=None, seed: int = 0, progress=None, **options) -> dict:
    """Accuracy of a strategy over items, with tokens spent and time per question, and the per-question rows.
    Question i uses seeds from seed + 100_000 * i, so no two questions share a random stream."""
    strategy_fn(name)
    rows, t0 = [], time.perf_counter()
    for i, item in enumerate(items):
        result = solve(name, client, item, strong=strong, seed=seed + 100_000 * i, **options)
        t = result.trace
        rows.append({"question": item["question"], "answer": item["answer"], "predicted": result.answer,
                     "correct": is_correct(result.answer, item), "completion_tokens": t.completion_tokens,
                     "prompt_tokens": t.prompt_tokens, "scored_tokens": t.scored_tokens, "calls": t.calls,
                     "seconds": t.seconds, "steps": t.steps})
        if progress:
            progress(i + 1, len(items), rows)
    n = len(rows)
    return {"strategy": name, "questions": n, "accuracy": sum(r["correct"] for r in rows) / n,
            "completion_tokens": sum(r["completion_tokens"] for r in rows) / n,
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows) / n,
            "scored_tokens": sum(r["scored_tokens"] for r in rows) / n,
            "seconds": (time.perf_counter() - t0) / n, "options": options, "rows": rows}


def sweep(name: str, client, items: list[dict], sizes: list[int], strong=None, seed: int = 0, progress=None,
          **options) -> list[dict]:
    """evaluate() once per value of the strategy's size option (k, n, breadth, rounds); one summary row each."""
    if name not in SIZE_OPTION:
        raise LLMLabError(f"--sweep varies a strategy's size; {name!r} has none "
                          f"(sweep one of {', '.join(SIZE_OPTION)})")
    if not sizes or min(sizes) < (0 if SIZE_OPTION[name] == "rounds" else 1):
        raise LLMLabError(f"sweep sizes must be positive integers, got {sizes}")
    out = []
    for size in sizes:
        summary = evaluate(name, client, items, strong=strong, seed=seed, progress=progress,
                           **{**options, SIZE_OPTION[name]: size})
        out.append({"strategy": name, SIZE_OPTION[name]: size, **{k: summary[k] for k in (
            "accuracy", "completion_tokens", "prompt_tokens", "scored_tokens", "seconds", "questions")}})
    return out


def frontier_plot(path, series: dict[str, list[tuple[float, float]]], title: str):
    """Accuracy against generated tokens per question (log x), one line per strategy, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per question")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
