"""Zero-shot AI-text detection on SmolLM2-135M-Instruct: stdlib docstring paragraphs (human) against the model's
own continuations of the same 32-token openings (machine), cut to the same length in tokens.

Each detector's AUROC (Mann-Whitney, ties half) with a 95% bootstrap interval and the Hanley-McNeil one, over all
pairs; and the accuracy of a threshold chosen on the first half of the pairs (calibration), measured on the
second half (test). Binoculars here uses SmolLM2 as both observer and performer: llmlab.load(int4=True) keeps the
very same Q4_1 weights (its 4-bit copies are exact for the GGUF's layers and are not even used by a full-text
forward), and no second model with SmolLM2's tokenizer ships offline, so the cross-perplexity is the model's mean
entropy and the score is log-perplexity / mean entropy.

    python experiments/detect_zero_shot.py [--n 120] [--temperature T] [--out experiments/results/detect]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure, write_results  # noqa: E402

import llmlab  # noqa: E402
from llmlab.io import atomic_write_text  # noqa: E402
from llmlab.safety.detect import DETECTORS, MACHINE_SIGN, detection_scores  # noqa: E402
from llmlab.safety.detect_pairs import make_pairs  # noqa: E402
from llmlab.safety.stats import auroc, bootstrap_auroc_interval, hanley_mcneil_interval  # noqa: E402

PAPERS = {  # what the papers report, with their (much larger) models, for scale
    "loglik": "DetectGPT Table 1: ~0.88 mean (GPT-2 ... NeoX-20B, XSum/SQuAD/Writing)",
    "logrank": "DetectGPT Table 1: ~0.90 mean (same setting)",
    "entropy": "DetectGPT Table 1: ~0.60 mean (same setting)",
    "binoculars": "Binoculars (Falcon-7B / -7B-instruct): AUROC > 0.9 on several domains",
    "curvature": "DetectGPT Table 1: ~0.95 mean (100 T5-3B span fills; same setting)",
}


def best_threshold(machine: np.ndarray, human: np.ndarray) -> tuple[float, float]:
    """The cut on machine-oriented scores (higher = machine) with the best accuracy on these pairs."""
    both = np.sort(np.concatenate([machine, human]))
    cuts = np.concatenate([[both[0] - 1], (both[1:] + both[:-1]) / 2, [both[-1] + 1]])
    accs = [((machine > c).sum() + (human <= c).sum()) / (len(machine) + len(human)) for c in cuts]
    i = int(np.argmax(accs))
    return float(cuts[i]), float(accs[i])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=None, help="default: the model's own (0.2, top-p 0.9)")
    ap.add_argument("--curvature", type=int, default=8, help="DetectGPT-style perturbations per text (0: skip)")
    ap.add_argument("--out", default="experiments/results/detect")
    args = ap.parse_args()
    torch.manual_seed(0)
    llm = llmlab.load("smollm2", dtype=torch.float32)
    pairs = make_pairs(llm, args.n, temperature=args.temperature, seed=0)
    human = detection_scores([p["human"] for p in pairs], llm, curvature=args.curvature)
    machine = detection_scores([p["machine"] for p in pairs], llm, curvature=args.curvature)
    detectors = [d for d in DETECTORS if d in human[0]]
    half = len(pairs) // 2
    rows, thresholds = [], {}
    for name in detectors:
        sign = MACHINE_SIGN[name]
        m = sign * np.array([s[name] for s in machine])
        h = sign * np.array([s[name] for s in human])
        auc = auroc(m, h)
        lo, hi = bootstrap_auroc_interval(m, h)
        hm_lo, hm_hi = hanley_mcneil_interval(auc, len(m), len(h))
        cut, cal_acc = best_threshold(m[:half], h[:half])
        test_acc = ((m[half:] > cut).sum() + (h[half:] <= cut).sum()) / (2 * (len(m) - half))
        thresholds[name] = sign * cut
        rows.append({"detector": name, "AUROC": round(auc, 3), "95% CI (bootstrap)": f"[{lo:.3f}, {hi:.3f}]",
                     "95% CI (Hanley-McNeil)": f"[{hm_lo:.3f}, {hm_hi:.3f}]",
                     "threshold (raw)": round(sign * cut, 3), "calibration acc": round(cal_acc, 3),
                     "test acc": round(float(test_acc), 3), "papers (larger models)": PAPERS[name]})
    temp = "model default (0.2, top-p 0.9)" if args.temperature is None else f"temperature {args.temperature}"
    note = (f"SmolLM2-135M-Instruct (fp32; observer = performer for Binoculars). {len(pairs)} pairs: stdlib "
            f"docstring paragraphs vs the model's continuation of the same 32-token opening ({temp}), both cut to "
            f"the same length (median {int(np.median([p['continuation_tokens'] for p in pairs]))} continuation "
            f"tokens); whole texts scored. Thresholds chosen on pairs 1..{half}, accuracy measured on the rest. "
            f"Curvature: {args.curvature} perturbations per text (15% of tokens in 2-token spans refilled by the "
            f"model).")
    out = Path(args.out)
    write_results(out, "auroc", rows, note)
    atomic_write_text(out / "scores.json", json.dumps({"thresholds": thresholds, "human": human,
                                                       "machine": machine}, indent=1) + "\n")
    plot(out / "auroc.png", rows, human, machine, detectors)
    print((out / "auroc.md").read_text())


def plot(path: Path, rows, human, machine, detectors):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(detectors) + 1, figsize=(3 * len(detectors) + 3, 3.2))
    ax = axes[0]
    aucs = [r["AUROC"] for r in rows]
    errs = [[a - float(r["95% CI (bootstrap)"][1:-1].split(",")[0]) for a, r in zip(aucs, rows)],
            [float(r["95% CI (bootstrap)"][1:-1].split(",")[1]) - a for a, r in zip(aucs, rows)]]
    ax.bar(range(len(rows)), aucs, yerr=errs, capsize=4)
    ax.axhline(0.5, color="gray", ls=":")
    ax.set_xticks(range(len(rows)), [r["detector"] for r in rows], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_title("AUROC (95% bootstrap CI)")
    for ax, name in zip(axes[1:], detectors):
        ax.hist([s[name] for s in human], bins=20, alpha=0.6, label="human (stdlib)")
        ax.hist([s[name] for s in machine], bins=20, alpha=0.6, label="SmolLM2")
        ax.set_title(name)
    axes[1].legend(fontsize=7)
    fig.suptitle("Zero-shot detection with SmolLM2-135M itself")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
