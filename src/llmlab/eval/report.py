"""Markdown reports with tables, and the PNG plots they link (NIAH heatmap, rating intervals, score histograms)."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.io import atomic_write_bytes


def _save(fig, path: Path):
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(grid, depths, lengths, path: Path, title: str = "needle in a haystack: retrieval score"):
    """grid[i][j]: score at depth i, context length j."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    plt.close(fig)


def plot_ratings(rows: list[dict], path: Path):
    plt = _plt()
    rows = list(reversed(rows))
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(rows)))
    for i, r in enumerate(rows):
        lo, hi = r["ci95"]
        ax.plot([lo, hi], [i, i], color="tab:blue")
        ax.plot([r["rating"]], [i], "o", color="tab:blue")
    ax.set_yticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap interval")
    _save(fig, path)
    plt.close(fig)


def plot_histogram(scores: list[float], path: Path, title: str = "judge scores"):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    if scores:
        lo, hi = int(min(scores)), int(max(scores))
        ax.hist(scores, bins=[x - 0.5 for x in range(lo, hi + 2)], rwidth=0.85)
    ax.set_xlabel("score")
    ax.set_ylabel("items")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def judge_markdown(report: dict, records: list[dict], out: Path) -> str:
    from llmlab.eval.judge.selfreport import format_self_report
    lines = [f"# Judge report ({report['mode']})", "", f"Judge: `{report['judge']}`, temperature "
             f"{report['temperature']}, prompts {', '.join(report['prompt_versions'])}", "",
             "## Self-report", "", "```", format_self_report(report), "```", ""]
    if report["mode"] == "pairwise":
        lines += ["| verdict | count |", "|---|---:|"]
        for k, v in sorted(report.get("verdicts", {}).items()):
            lines.append(f"| {k} | {v} |")
        lines.append(f"| parse failure | {report['parse_failures']} |")
    else:
        scores = [r["score"] for r in records if r.get("score") is not None]
        plot_histogram(scores, out / "scores.png", f"{report['mode']} scores")
        lines += ["![score histogram](scores.png)", "", "| score | items |", "|---:|---:|"]
        for k, v in report.get("score_histogram", {}).items():
            lines.append(f"| {k} | {v} |")
        lines.append(f"| parse failure | {report['parse_failures']} |")
    return "\n".join(lines) + "\n"


def eval_markdown(summaries: list[dict]) -> str:
    lines = ["# Evaluation report", "", "| task | model | metric | value | 95% CI | n | tokens | s | tokens/s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for s in summaries:
        for k, v in s["metrics"].items():
            if not isinstance(v, dict):
                continue
            tps = f"{s['tokens_per_s']:.0f}" if s.get("tokens_per_s") else ""
            lines.append(f"| {s['task']} | {Path(str(s['model'])).name} | {k} | {v['mean']:.4f} | "
                         f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | {v['n']} | {s['tokens']} | "
                         f"{s['seconds']:.1f} | {tps} |")
    return "\n".join(lines) + "\n"


def write_eval_report(summaries: list[dict], out: Path) -> Path:
    from llmlab.io import atomic_write_text
    path = Path(out) / "report.md"
    atomic_write_text(path, eval_markdown(summaries))
    atomic_write_text(Path(out) / "summaries.json", json.dumps(summaries, indent=2) + "\n")
    return path
