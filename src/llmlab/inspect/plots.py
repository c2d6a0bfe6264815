"""PNG figures for the inspect tools (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from llmlab.io import atomic_write_bytes


def _figure(rows: int = 1, cols: int = 1, size=(6, 4)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def heatmap(path, matrix, xlabels, ylabels, title: str, xlabel: str = "", ylabel: str = "", cmap="viridis",
            center: bool = False) -> Path:
    """One annotated heatmap; center=True puts 0 in the middle of a diverging colour map."""
    matrix = np.asarray(matrix, dtype=float)
    plt, fig, axes = _figure(size=(max(5, 0.45 * len(xlabels) + 2), max(3.5, 0.3 * len(ylabels) + 1.5)))
    ax = axes[0, 0]
    limit = float(np.abs(matrix).max()) or 1.0
    image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r" if center else cmap,
                      vmin=-limit if center else None, vmax=limit if center else None)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax)
    return _save(plt, fig, path)


def attention_grid(path, weights, tokens: list[str], layers: list[int], title: str) -> Path:
    """weights (layers, heads, T, T): one small map per layer (rows) and head (columns)."""
    weights = np.asarray(weights)
    n_rows, n_cols = weights.shape[0], weights.shape[1]
    cell = 2.2 if n_rows * n_cols <= 16 else 1.0
    plt, fig, axes = _figure(n_rows, n_cols, size=(cell * n_cols + 0.5, cell * n_rows + 0.8))
    labelled = n_rows * n_cols <= 16 and len(tokens) <= 24
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(weights[r, c], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if labelled:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            if r == 0:
                ax.set_title(f"head {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {layers[r]}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def lines(path, x, series: dict[str, list[float]], title: str, xlabel: str, ylabel: str, hline: float | None = None,
          logy: bool = False) -> Path:
    plt, fig, axes = _figure(size=(6, 3.8))
    ax = axes[0, 0]
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=3, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label="chance")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def bars(path, labels: list[str], values: list[float], title: str, ylabel: str) -> Path:
    plt, fig, axes = _figure(size=(max(5, 0.4 * len(labels) + 2), 3.8))
    ax = axes[0, 0]
    ax.bar(range(len(labels)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    return _save(plt, fig, path)


def token_labels(tokenizer, ids) -> list[str]:
    """Readable token strings for axis labels (byte-level BPE marks a leading space as Ġ)."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        out.append(repr(text)[1:-1] if text.strip() else repr(text))
    return out
