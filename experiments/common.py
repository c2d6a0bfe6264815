"""Shared bits of the post-training experiments: results table (markdown + JSON) and a bar plot, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.io import atomic_write_text


def write_results(out_dir: str | Path, name: str, rows: list[dict], note: str = "") -> Path:
    """out_dir/name.json and out_dir/name.md (a table with the union of the rows' keys as columns)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps({"rows": rows, "note": note}, indent=2) + "\n")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    atomic_write_text(out_dir / f"{name}.md", (note + "\n\n" if note else "") + "\n".join(lines) + "\n")
    return out_dir / f"{name}.md"


def bar_plot(path: str | Path, labels: list[str], series: dict[str, list[float]], title: str, ylabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    save_figure(fig, path)


def save_figure(fig, path: str | Path, **savefig_options):
    """Lay out, write and close a matplotlib figure: to a temp file, then renamed, so a plot is never half-written."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, **savefig_options)
    plt.close(fig)
    tmp.replace(path)
