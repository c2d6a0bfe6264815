"""How calibrated is SmolLM2's multiple-choice confidence? ECE and a reliability diagram on the built-in bios_mc
task (confidence = the softmax of the choices' log-likelihoods, through the model client).

    OMP_NUM_THREADS=1 LLMLAB_NATIVE_THREADS=1 python experiments/detect_calibration.py [--n 40]
        [--out experiments/results/calibration]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_figure, write_results  # noqa: E402

from llmlab.client import connect  # noqa: E402
from llmlab.safety.audit_sections import bootstrap_ece  # noqa: E402
from llmlab.safety.hallucination import mc_calibration  # noqa: E402


def reliability_diagram(path: Path, result: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = result["bins"]
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=[b["hi"] - b["lo"] for b in bins],
           align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    for b in bins:
        ax.text((b["lo"] + b["hi"]) / 2, 0.02, str(b["count"]), ha="center", fontsize=7)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{result['task']}: ECE {result['ece']:.3f} (n={result['n']})")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", default="experiments/results/calibration")
    args = ap.parse_args()
    result = mc_calibration(connect(model=args.model, dtype="float32"), "bios_mc", n=args.n)
    lo, hi = result["accuracy_ci"]
    ece_lo, ece_hi = bootstrap_ece(result["confidences"], result["correct"])
    rows = [{"task": result["task"], "n": result["n"], "accuracy": round(result["accuracy"], 3),
             "accuracy 95% Wilson": f"[{lo:.3f}, {hi:.3f}]", "mean confidence": round(result["mean_confidence"], 3),
             "ECE (10 bins)": round(result["ece"], 3), "ECE 95% bootstrap": f"[{ece_lo:.3f}, {ece_hi:.3f}]"}]
    out = Path(args.out)
    rows.append({"task": "paper: GPT-4 on MMLU (OpenAI 2023, Fig. 8)", "ECE (10 bins)": "0.007 pre-trained, 0.074 "
                 "after RLHF (PPO)"})
    write_results(out, "calibration", rows, f"{args.model}: multiple-choice confidence (softmax over the choices' "
                  "log-likelihoods) vs accuracy on bios_mc, through the model client; Wilson interval for accuracy, "
                  "percentile bootstrap (1,000 resamples) for ECE.")
    reliability_diagram(out / "reliability.png", result)
    print((out / "calibration.md").read_text())


if __name__ == "__main__":
    main()
