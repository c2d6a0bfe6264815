"""Loss (or, for RL, reward) curve PNGs from metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

from llmlab.io import atomic_write_bytes
from llmlab.train.metrics import read_metrics


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if any("reward" in r for r in records):  # RL: the reward is the curve to watch; its policy loss is not
        curves, ylabel = [("reward", "train reward"), ("eval_score", "held-out score")], "reward"
    else:
        curves, ylabel = [("loss", "train loss"), ("val_loss", "val loss")], "loss (nats/token)"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for (key, label), style in zip(curves, ("-", "o-")):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), style, label=label, linewidth=1, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)
