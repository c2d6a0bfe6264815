"""Scaling laws: train a grid of model sizes x token budgets and fit Chinchilla's L(N, D) = E + A/N^a + B/D^b."""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_bytes, atomic_write_text
from llmlab.train.config import TrainConfig


@dataclass
class ScalingFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising L under C = 6 N D (Chinchilla eq. 4)."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = G * (compute / 6) ** (b / (a + b))
        return n, compute / 6 / n

    def tokens_per_param(self, compute: float) -> float:
        n, d = self.optimal(compute)
        return d / n

    def summary(self, compute: float | None = None) -> str:
        lines = [f"L(N, D) = {self.E:.3f} + {self.A:.4g} / N^{self.alpha:.3f} + {self.B:.4g} / D^{self.beta:.3f}"]
        for c in ([compute] if compute else []) + [1e18, 1e21]:
            n, d = self.optimal(c)
            lines.append(f"compute {c:.2e} FLOPs: optimal N {n:.3g}, D {d:.3g}, tokens per parameter "
                         f"{d / n:.1f}")
        return "\n".join(lines)


def huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def fit_scaling_law(N, D, L, delta: float = 1e-3, top_starts: int = 8) -> ScalingFit:
    """Chinchilla's fit: minimise Huber(log L_hat - log L) with L_hat = exp(LSE(a - alpha log N, b - beta log D, e)),
    L-BFGS from a grid of starting points; the best one wins."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    logN, logD, logL = (np.log(np.asarray(x, dtype=float)) for x in (N, D, L))
    if len(logL) < 5:
        raise LLMLabError(f"fitting 5 constants needs at least 5 runs, got {len(logL)}")

    def objective(p):
        """Huber loss and its exact gradient (L-BFGS with finite differences would be ~6x slower)."""
        a, b, e, alpha, beta = p
        z = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
        pred = logsumexp(z, axis=0)
        w = np.exp(z - pred)  # softmax weights: d pred / d z
        r = pred - logL
        dr = np.clip(r, -delta, delta)  # Huber'
        grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                         -(dr * w[0] * logN).sum(), -(dr * w[1] * logD).sum()])
        return huber(r, delta).sum(), grad

    # Starting points: Chinchilla optimises from a large grid of them, which costs minutes. Instead, for fixed
    # exponents the law is linear in (E, A, B): solve those by non-negative least squares (relative error,
    # close to log space) over a grid of exponents, and refine the best few with the Huber objective.
    from scipy.optimize import nnls
    Nf, Df, Lf = np.exp(logN), np.exp(logD), np.exp(logL)
    candidates = []
    for alpha, beta in itertools.product(np.linspace(0.05, 1.5, 30), np.linspace(0.05, 1.5, 30)):
        X = np.stack([np.ones_like(Nf), Nf**-alpha, Df**-beta], axis=1) / Lf[:, None]
        coef, residual = nnls(X, np.ones_like(Lf))
        E, A, B = np.maximum(coef, 1e-12)
        candidates.append((residual, [math.log(A), math.log(B), math.log(E), alpha, beta]))
    candidates.sort(key=lambda c: c[0])
    best = None
    for _, start in candidates[:top_starts]:
        r = minimize(objective, np.array(start, float), method="L-BFGS-B", jac=True)
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, alpha, beta = best.x
    return ScalingFit(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))


def size_config(name: str, vocab_size: int, seq_len: int, eos_id=None):
    """'d64' -> a 2-layer Llama of width 64 (heads of 16 dims, SwiGLU at 8/3 width)."""
    from llmlab.model import ModelConfig
    if not (name.startswith("d") and name[1:].isdigit() and int(name[1:]) % 16 == 0):
        raise LLMLabError(f"model size {name!r}: expected dNN with NN a multiple of 16, e.g. d64")
    dim = int(name[1:])
    hidden = int(8 * dim / 3 + 15) // 16 * 16
    return ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=2, n_heads=dim // 16, hidden_dim=hidden,
                       max_seq_len=seq_len, eos_token_id=eos_id)


def run_grid(data_dir: str | Path, cfg: TrainConfig, sizes: list[str], budgets: list[int],
             out_dir: str | Path) -> ScalingFit | None:
    """Train every (size, token budget) pair, record the final validation loss, fit and plot L(N, D).

    N counts non-embedding parameters (Kaplan et al.): at these tiny sizes the embeddings would dominate.
    Results go to out_dir/scaling.json and out_dir/scaling.png; the fit is None with fewer than 5 runs.
    """
    from llmlab.data.pack import load_manifest, load_shards
    from llmlab.model import Transformer
    from llmlab.train.loop import Objective, train
    from llmlab.train.pretrain import TokenBatches, lm_loss, make_evaluate
    from llmlab.train import distributed as D

    out_dir = Path(out_dir)
    manifest = load_manifest(data_dir)
    train_tokens, val_tokens = load_shards(data_dir, "train"), load_shards(data_dir, "val")
    d = D.Dist()
    runs = []
    for size, budget in itertools.product(sizes, budgets):
        steps = max(1, budget // cfg.tokens_per_step)
        run_cfg = replace(cfg, out_dir=str(out_dir / f"{size}_{budget}"), max_steps=steps, eval_every=steps,
                          save_every=0, keep_last=1, progress=False, sample_every=0, num_samples=0,
                          warmup_steps=min(cfg.warmup_steps, max(1, steps // 10)))
        model_cfg = size_config(size, manifest["vocab_size"], cfg.seq_len, manifest.get("eos_id"))
        model = Transformer(model_cfg).init_weights(seed=cfg.seed)
        evaluate, _ = make_evaluate(val_tokens, run_cfg, d, None)
        batches = TokenBatches(train_tokens, cfg.seq_len, cfg.micro_batch, cfg.grad_accum)
        train(model, Objective(lm_loss, batches, evaluate=evaluate), run_cfg, resume=True, dist=d)
        from llmlab.train.metrics import read_metrics
        val = [r["val_loss"] for r in read_metrics(Path(run_cfg.out_dir) / "metrics.jsonl") if "val_loss" in r]
        runs.append({"size": size, "N": model_cfg.n_params(include_embeddings=False),
                     "D": steps * cfg.tokens_per_step, "loss": val[-1]})
        print(f"{size} N={runs[-1]['N']:,} D={runs[-1]['D']:,}: val loss {val[-1]:.4f}", flush=True)
    fit = fit_scaling_law([r["N"] for r in runs], [r["D"] for r in runs], [r["loss"] for r in runs]) \
        if len(runs) >= 5 else None
    result = {"runs": runs, "fit": asdict(fit) if fit else None}
    if fit:
        c = max(6 * r["N"] * r["D"] for r in runs)
        result["tokens_per_param_at_max_compute"] = fit.tokens_per_param(c)
    atomic_write_text(out_dir / "scaling.json", json.dumps(result, indent=2) + "\n")
    plot_grid(runs, fit, out_dir / "scaling.png")
    return fit


def plot_grid(runs: list[dict], fit: ScalingFit | None, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for size in dict.fromkeys(r["size"] for r in runs):
        pts = sorted((r["D"], r["loss"], r["N"]) for r in runs if r["size"] == size)
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"{size} (N={pts[0][2]:,})")[0]
        if fit:
            ds = np.geomspace(pts[0][0], pts[-1][0], 50)
            ax.plot(ds, fit.loss(pts[0][2], ds), "-", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title("L(N, D) fit" if fit else "scaling grid")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
