"""Reward over-optimisation with RL (Gao, Schulman, Hilton 2022): GRPO on SmolLM2 against the PROXY reward model of
reason_overopt.py, with the gold verifier, the proxy score and the KL to the initial policy read along training.

    .venv/bin/python experiments/reason_overopt_rl.py [--proxy-from runs/reason_overopt/proxy] [--rollouts 12]
        [--prompts 4] [--group 4] [--lr 1e-4] [--kl-coef 0] [--trainable-blocks 2] [--window 2]

The policy is SmolLM2-135M-Instruct (fp32), its last `--trainable-blocks` blocks trained (a one-core budget) by
llmlab's GRPO (train/rl.py, the one training loop) to maximise the proxy RM's score of its chains of thought on
arithmetic questions no proxy pair and no evaluation question came from. Every rollout logs, for its samples (drawn
from the policy as it is at that point), the proxy reward, the verifier's accuracy (gold) and the Monte-Carlo KL
to the initial policy (sum over the reply of log pi - log pi_init); rollouts are grouped into windows of `--window`
(rollout 0, the initial policy, alone), and Gao et al.'s RL form gold(d) - gold(0) = d (alpha - beta log d),
d = sqrt(KL), is fitted beside the best-of-n form of reason_overopt.py. Writes
experiments/results/reason_overopt/rl.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import save_figure, write_results  # noqa: E402
from reason_common import wilson  # noqa: E402
from reason_overopt import GAO, load_proxy  # noqa: E402

OUT = Path(__file__).parent / "results" / "reason_overopt"
RUN = Path("runs") / "reason_overopt" / "rl"


def fit_rl(ds: list[float], gains: list[float]) -> tuple[float, float]:
    """Least squares for gain = d (alpha - beta log d), no intercept (d log d -> 0 as d -> 0)."""
    import numpy as np
    A = np.array([[d, -d * math.log(d) if d > 0 else 0.0] for d in ds])
    alpha, beta = np.linalg.lstsq(A, np.array(gains), rcond=None)[0]
    return float(alpha), float(beta)


def windows(per_rollout: list[dict], width: int, samples: int) -> list[dict]:
    """Rollout 0 alone (the initial policy: KL 0), then consecutive windows of `width` rollouts, averaged."""
    groups = [per_rollout[:1]] + [per_rollout[i:i + width] for i in range(1, len(per_rollout), width)]
    rows = []
    for g in groups:
        kl = max(0.0, sum(r["kl"] for r in g) / len(g))  # a Monte-Carlo estimate can dip below 0 near the start
        gold = sum(r["verifiable_score"] for r in g) / len(g)
        lo, hi = wilson(round(gold * samples * len(g)), samples * len(g))
        rows.append({"rollouts": f"{g[0]['rollout']}-{g[-1]['rollout']}", "kl": kl, "d": math.sqrt(kl),
                     "proxy": sum(r["reward"] for r in g) / len(g), "gold_accuracy": gold, "ci_low": lo,
                     "ci_high": hi, "reply_tokens": sum(r["response_length"] for r in g) / len(g)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic1")
    ap.add_argument("--proxy-from", default="runs/reason_overopt/proxy")
    ap.add_argument("--questions", type=int, default=64, help="RL prompts (questions of their own seed)")
    ap.add_argument("--rollouts", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=4, help="questions per rollout")
    ap.add_argument("--group", type=int, default=4, help="samples per question (GRPO's group)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-coef", type=float, default=0.0, help="GRPO's KL penalty (0: nothing holds it back)")
    ap.add_argument("--trainable-blocks", type=int, default=2)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--replot", action="store_true", help="only redraw rl.png from rl.json and overopt.json")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((OUT / "rl.json").read_text())["rows"], json.loads((OUT / "overopt.json").read_text())["rows"],
             args)
        return

    import torch

    from llmlab.reason import make_items
    from llmlab.reason.prompts import cot_prompt
    from llmlab.reason.tasks import extract_answer, is_correct
    from llmlab.train.rl import RLConfig, rl_train
    from llmlab.train.sft import load_base
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    proxy = load_proxy(args.proxy_from)
    policy, tokenizer, _ = load_base("smollm2")
    policy.requires_grad_(False)
    for block in policy.model.layers[len(policy.model.layers) - args.trainable_blocks:]:
        block.requires_grad_(True)
    items = [{**it, "messages": [{"role": "user", "content": cot_prompt(it)}]}
             for it in make_items(args.task, args.questions, seed=5)]  # seed 0: evaluation, 1: proxy pairs
    cfg = RLConfig(algo="grpo", out_dir=str(RUN), steps=args.rollouts, prompts_per_step=args.prompts,
                   group_size=args.group, max_new_tokens=args.max_tokens, temperature=args.temperature, lr=args.lr,
                   min_lr=args.lr, kl_coef=args.kl_coef, minibatch=8, save_every=0, seed=0, threads=1)
    shutil.rmtree(RUN, ignore_errors=True)
    result = rl_train(policy, tokenizer, items, cfg, reward_model=proxy,
                      check=lambda text, item: is_correct(extract_answer(text, item), item))
    per_update = [r for r in result["history"] if "reward" in r]
    per_rollout = [{**r, "rollout": i} for i, r in enumerate(per_update[::cfg.updates_per_rollout])]
    rows = windows(per_rollout, args.window, args.prompts * args.group)
    gold0 = rows[0]["gold_accuracy"]
    alpha, beta = fit_rl([r["d"] for r in rows], [r["gold_accuracy"] - gold0 for r in rows])
    for r in rows:
        r["gold_fit"] = gold0 + (r["d"] * (alpha - beta * math.log(r["d"])) if r["d"] > 0 else 0.0)
    d_star = math.exp(alpha / beta - 1) if beta > 0 else float("inf")
    bon = json.loads((OUT / "overopt.json").read_text())
    peak = max(rows, key=lambda r: r["gold_accuracy"])
    samples = args.prompts * args.group
    note = (f"GRPO on SmolLM2-135M-Instruct (last {args.trainable_blocks} blocks, lr {args.lr}, KL coefficient "
            f"{args.kl_coef}), {args.rollouts} rollouts of {args.prompts} `{args.task}` questions x {args.group} "
            f"samples (temperature {args.temperature}, at most {args.max_tokens} tokens), reward = the proxy RM of "
            f"overopt.md (reused from {args.proxy_from}); gold = the verifier on the same samples; KL = Monte-Carlo "
            f"KL(policy || initial) per reply. Windows of {args.window} rollouts ({samples * args.window} samples; "
            f"95% Wilson intervals). Fit of gold(d) - gold(0) = d (alpha - beta log d): alpha = {alpha:.4f}, beta = "
            f"{beta:.4f}, peak at d = {d_star:.3g} (KL {d_star ** 2:.3g} nats); measured peak "
            f"{peak['gold_accuracy']:.3f} at KL {peak['kl']:.2f} (rollouts {peak['rollouts']}), start {gold0:.3f}, "
            f"end {rows[-1]['gold_accuracy']:.3f} at KL {rows[-1]['kl']:.2f}; proxy {rows[0]['proxy']:.3f} -> "
            f"{rows[-1]['proxy']:.3f}. {time.perf_counter() - t0:.0f} s in all, {time.process_time():.0f} s of CPU "
            f"(one thread, on a shared machine).\n\nPaper: {GAO}; for RL they fit gold = d (alpha - beta log d), "
            f"whose peak comes later in KL than best-of-n's.")
    write_results(OUT, "rl", rows, note)
    plot(rows, bon["rows"], args)
    print(note)


def plot(rl_rows, bon_rows, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from reason_overopt import fit_gao
    fig, (ax, ax_p, ax_g) = plt.subplots(1, 3, figsize=(14, 4))
    forms = {"best-of-n": (fit_gao, lambda d, a, b: d * (a - b * d), "d(a - b d)"),
             "GRPO": (fit_rl, lambda d, a, b: d * (a - b * math.log(d)), "d(a - b log d)")}
    for rows, label in ((bon_rows, "best-of-n"), (rl_rows, "GRPO")):
        d, g = [r["d"] for r in rows], [r["gold_accuracy"] for r in rows]
        line = ax.errorbar(d, g, yerr=[[y - r["ci_low"] for y, r in zip(g, rows)],
                                       [r["ci_high"] - y for y, r in zip(g, rows)]], marker="o", capsize=2,
                           label=f"{label}: gold (verifier)")
        fit, form, text = forms[label]
        a, b = fit(d, [y - g[0] for y in g])
        grid = [max(d) * i / 100 for i in range(1, 101)]
        ax.plot([0] + grid, [g[0]] + [g[0] + form(x, a, b) for x in grid], "--", color=line[0].get_color(),
                label=f"{label} fit: {text}, a={a:.2f} b={b:.2f}")
    ax.set_xlabel("d = sqrt(KL to the initial policy)")
    ax.set_ylabel("gold accuracy")
    ax.set_title("Ours: gold score vs d", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    steps = range(len(rl_rows))
    ax_p.plot(steps, [r["proxy"] for r in rl_rows], marker="o", color="tab:red", label="proxy RM score")
    ax_p.set_xticks(list(steps), [r["rollouts"] for r in rl_rows], fontsize=7)
    ax_p.set_xlabel("GRPO rollouts (KL " + ", ".join(f"{r['kl']:.1f}" for r in rl_rows) + ")", fontsize=8)
    ax_p.set_ylabel("proxy RM score (raw)", color="tab:red")
    ax_len = ax_p.twinx()
    ax_len.plot(steps, [r["reply_tokens"] for r in rl_rows], marker=".", color="grey", label="reply tokens")
    ax_len.set_ylabel("reply tokens", color="grey")
    ax_p.set_title("Ours: what GRPO does to the proxy, and to replies", fontsize=10)
    ax_p.grid(alpha=0.3)
    # the paper's shapes: its two functional forms with illustrative coefficients (not its numbers)
    d = [i / 50 for i in range(1, 251)]
    ax_g.plot(d, [x * (1.0 - 0.25 * x) for x in d], label="best-of-n: d(a - b d)")
    ax_g.plot(d, [x * (0.6 - 0.3 * math.log(x)) for x in d], label="RL: d(a - b log d)")
    ax_g.set_xlabel("d = sqrt(KL)")
    ax_g.set_ylabel("gold RM score gain (illustrative)")
    ax_g.set_title("Gao et al. 2022: the shapes (coefficients illustrative)", fontsize=10)
    ax_g.legend(fontsize=7)
    ax_g.grid(alpha=0.3)
    fig.suptitle(f"Reward over-optimisation, SmolLM2-135M on {args.task}: proxy RM vs verifier", fontsize=11)
    save_figure(fig, OUT / "rl.png", dpi=110)


if __name__ == "__main__":
    main()
