"""Reward over-optimisation (Gao, Schulman, Hilton 2022) with best-of-N on SmolLM2: choose among n sampled chains
of thought by a PROXY reward model trained on few, noisy labels, and score the choice by the task's true verifier.

    .venv/bin/python experiments/reason_overopt.py --int4 [--task arithmetic1] [--eval-questions 30] [--k 16]
        [--train-questions 24] [--pairs 48] [--noise 0.25] [--steps 24] [--trainable-blocks 2]
        [--proxy-from runs/reason_overopt/proxy]   # reuse the proxy an earlier run trained

The proxy is llmlab's reward model (train/reward.py: SmolLM2 with a scalar head, Bradley-Terry loss, the one
training loop) trained on `pairs` (right, wrong) pairs of SmolLM2's own samples on other questions, a `noise`
fraction of them flipped; only its last blocks and head train (a CPU budget). Best-of-n is read exactly from one
pool of k samples per question: the expected proxy and gold (verifier) score of the proxy's choice among n samples
drawn without replacement (order statistics over the pool), n = 1..k. Gao et al.'s KL of best-of-n is
log n - (n-1)/n; with d = sqrt(KL) they fit gold(d) - gold(0) = d (alpha - beta d). A larger --k tops up the
cached pool (samples 0..k-1 keep their seeds). The RL half is reason_overopt_rl.py. Writes
experiments/results/reason_overopt/overopt.{md,json,png}.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import save_figure, write_results  # noqa: E402
from reason_common import sample_pool, wilson  # noqa: E402

OUT = Path(__file__).parent / "results" / "reason_overopt"
GAO = ("Gao et al. 2022 (best-of-n against proxy RMs of 3M-3B parameters, gold = a 6B RM): the proxy score rises "
       "monotonically with KL while the gold score rises, peaks and falls; gold follows d (alpha - beta d), "
       "d = sqrt(KL), and the peak moves to larger KL as the proxy RM grows or gets more data")


def kl_bon(n: int) -> float:
    return math.log(n) - (n - 1) / n


def best_of_n_expectations(proxy: list[float], gold: list[float], n: int) -> tuple[float, float]:
    """E[proxy], E[gold] of the proxy's best among n of the pool's samples drawn without replacement: the sample
    ranked j-th lowest (0-based) is the best of the draw with probability C(j, n-1) / C(N, n)."""
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])
    total = math.comb(len(proxy), n)
    p = [math.comb(j, n - 1) / total for j in range(len(proxy))]
    return (sum(pj * proxy[i] for pj, i in zip(p, order)), sum(pj * gold[i] for pj, i in zip(p, order)))


def fit_gao(ds: list[float], gains: list[float]) -> tuple[float, float]:
    """Least squares for gain = alpha d - beta d^2 (no intercept: the gain is 0 at n = 1)."""
    import numpy as np
    A = np.array([[d, -d * d] for d in ds])
    alpha, beta = np.linalg.lstsq(A, np.array(gains), rcond=None)[0]
    return float(alpha), float(beta)


def noisy_pairs(pool, n_pairs: int, noise: float, seed: int = 0) -> tuple[list[dict], int]:
    """(right, wrong) sample pairs of the same question, a `noise` fraction flipped; and how many were flipped."""
    from llmlab.reason.prompts import cot_prompt
    rng = random.Random(f"overopt/{seed}")
    candidates = []
    for rec in pool:
        right = [s for s, c in zip(rec["samples"], rec["correct"]) if c]
        wrong = [s for s, c in zip(rec["samples"], rec["correct"]) if not c]
        candidates += [(rec["item"], r, w) for r in right for w in wrong if r != w]
    rng.shuffle(candidates)
    pairs, flipped = [], 0
    for item, r, w in candidates[:n_pairs]:
        flip = rng.random() < noise
        flipped += flip
        pairs.append({"prompt": cot_prompt(item), "chosen": w if flip else r, "rejected": r if flip else w})
    return pairs, flipped


def train_proxy(records: list[dict], args):
    """SmolLM2 as a reward model, the last blocks and the head trained on the noisy pairs through the one loop."""
    from llmlab.train.chat_data import preference_pair
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import train
    from llmlab.train.reward import RewardModel, reward_objective, to_reward_model
    from llmlab.train.sft import load_base, pad_id_of
    model, tokenizer, _ = load_base("smollm2")
    pairs = [preference_pair(r, tokenizer) for r in records]
    cfg = TrainConfig(out_dir=str(Path("runs") / "reason_overopt" / "proxy"), seq_len=160, micro_batch=4,
                      max_steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=2, dtype="float32",
                      progress=False, eval_every=0, save_every=0, peak_flops=1e12, seed=0)
    import shutil
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a fresh run each time (the loop refuses a used directory)
    to_reward_model(model).train()
    layers = model.model.layers
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [*layers[len(layers) - args.trainable_blocks:], model.model.norm, model.lm_head]:
        for p in module.parameters():
            p.requires_grad_(True)
    result = train(model, reward_objective(pairs, tokenizer, cfg), cfg)
    return RewardModel(result.model.eval(), tokenizer, pad_id_of(tokenizer))


def load_proxy(run_dir: str | Path):
    """The proxy RM a previous run of this script trained: its run directory's last checkpoint (llmlab names), or a
    saved reward-model directory (config.json)."""
    from safetensors.torch import load_file

    from llmlab.train.ckpt import read_latest_name
    from llmlab.train.reward import RewardModel, to_reward_model
    from llmlab.train.sft import load_base, pad_id_of
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        return RewardModel.load(run_dir)
    latest = read_latest_name(run_dir / "checkpoints")
    if latest is None:
        raise SystemExit(f"no proxy checkpoint under {run_dir}/checkpoints: run without --proxy-from first")
    model, tokenizer, _ = load_base("smollm2")
    to_reward_model(model)
    model.load_state_dict(load_file(run_dir / "checkpoints" / latest / "model.safetensors"), strict=True)
    return RewardModel(model.eval(), tokenizer, pad_id_of(tokenizer))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic1")
    ap.add_argument("--eval-questions", type=int, default=30)
    ap.add_argument("--train-questions", type=int, default=24)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--train-k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--trainable-blocks", type=int, default=2)
    ap.add_argument("--int4", action="store_true")
    ap.add_argument("--proxy-from", default=None, help="reuse the proxy RM a previous run trained (its run "
                                                       "directory, e.g. runs/reason_overopt/proxy)")
    args = ap.parse_args()

    from llmlab.client import connect
    from llmlab.reason import make_items
    from llmlab.reason.prompts import cot_prompt

    t0 = time.perf_counter()
    client = connect(model="smollm2", int4=args.int4)
    suffix = f"-t{args.max_tokens}-T{args.temperature}{'-int4' if args.int4 else ''}"
    eval_items = make_items(args.task, args.eval_questions, seed=0)
    pool = sample_pool(client, eval_items, args.k, args.max_tokens, args.temperature,
                       f"{args.task}-q{len(eval_items)}-k{args.k}{suffix}")  # the frontier's pool, when it ran
    train_items = make_items(args.task, args.train_questions, seed=1)
    train_pool = sample_pool(client, train_items, args.train_k, args.max_tokens, args.temperature,
                             f"{args.task}-seed1-q{len(train_items)}-k{args.train_k}{suffix}")
    del client
    records, flipped = noisy_pairs(train_pool, args.pairs, args.noise)
    t1 = time.perf_counter()
    if args.proxy_from:  # the same pairs and steps as the run that trained it (the note says what was given)
        print(f"proxy: reusing {args.proxy_from}", flush=True)
        proxy = load_proxy(args.proxy_from)
    else:
        print(f"proxy: {len(records)} pairs ({flipped} flipped), {args.steps} steps", flush=True)
        proxy = train_proxy(records, args)
    train_seconds = time.perf_counter() - t1

    proxy_scores = []
    for rec in pool:
        proxy_scores.append(proxy.score_batch([cot_prompt(rec["item"])] * len(rec["samples"]), rec["samples"]))
    flat = [s for ss in proxy_scores for s in ss]
    mean, std = sum(flat) / len(flat), (sum((s - sum(flat) / len(flat)) ** 2 for s in flat) / len(flat)) ** 0.5
    right = [s for ss, rec in zip(proxy_scores, pool) for s, c in zip(ss, rec["correct"]) if c]
    wrong = [s for ss, rec in zip(proxy_scores, pool) for s, c in zip(ss, rec["correct"]) if not c]
    from llmlab.safety.stats import auroc
    proxy_auroc = auroc(right, wrong) if right and wrong else float("nan")

    rows, n_q = [], len(pool)
    for n in range(1, args.k + 1):
        p_sum = g_sum = 0.0
        for ss, rec in zip(proxy_scores, pool):
            p, g = best_of_n_expectations([(s - mean) / std for s in ss], [float(c) for c in rec["correct"]], n)
            p_sum, g_sum = p_sum + p, g_sum + g
        lo, hi = wilson(round(g_sum), n_q)
        rows.append({"n": n, "kl_bon": kl_bon(n), "d": math.sqrt(kl_bon(n)), "proxy_z": p_sum / n_q,
                     "gold_accuracy": g_sum / n_q, "ci_low": lo, "ci_high": hi})
    alpha, beta = fit_gao([r["d"] for r in rows], [r["gold_accuracy"] - rows[0]["gold_accuracy"] for r in rows])
    for r in rows:
        r["gold_fit"] = rows[0]["gold_accuracy"] + r["d"] * (alpha - beta * r["d"])
    peak = max(rows, key=lambda r: r["gold_accuracy"])
    d_star = alpha / (2 * beta) if beta > 0 else float("inf")
    note = (f"SmolLM2-135M-Instruct, task `{args.task}`: n = {n_q} held-out questions x {args.k} samples "
            f"(temperature {args.temperature}, at most {args.max_tokens} tokens). Proxy RM: SmolLM2 + scalar head, "
            f"last {args.trainable_blocks} blocks trained {args.steps} steps on {len(records)} pairs from "
            f"{len(train_items)} other questions, {flipped} of them flipped ("
            f"{'reused from ' + args.proxy_from if args.proxy_from else f'{train_seconds:.0f} s'}"
            f"); its AUROC "
            f"for right vs wrong held-out samples: {proxy_auroc:.3f}. Gold = the verifier (accuracy; 95% Wilson "
            f"interval, approximate for an expectation). Best-of-n read exactly from the pool (order statistics). "
            f"Fit of gold(d) - gold(0) = d (alpha - beta d): alpha = {alpha:.4f}, beta = {beta:.4f}, so the gold "
            f"peak would be at d = {d_star:.2f} (KL = {d_star ** 2:.2f} nats); measured peak at n = {peak['n']} "
            f"(accuracy {peak['gold_accuracy']:.3f} vs {rows[0]['gold_accuracy']:.3f} at n = 1, "
            f"{rows[-1]['gold_accuracy']:.3f} at n = {args.k}). {time.perf_counter() - t0:.0f} s in all.\n\n"
            f"Paper: {GAO}.")
    write_results(OUT, "overopt", rows, note)
    plot(rows, args, n_q)
    print(note)


def plot(rows, args, n_q):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = [r["d"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(d, [r["gold_accuracy"] for r in rows], yerr=[[r["gold_accuracy"] - r["ci_low"] for r in rows],
                [r["ci_high"] - r["gold_accuracy"] for r in rows]], marker="o", capsize=2, label="gold (verifier)")
    ax.plot(d, [r["gold_fit"] for r in rows], "--", label="fit d(alpha - beta d)")
    ax.set_xlabel("d = sqrt(KL of best-of-n), nats^0.5")
    ax.set_ylabel("gold accuracy of the proxy's choice")
    ax2 = ax.twinx()
    ax2.plot(d, [r["proxy_z"] for r in rows], color="tab:red", marker=".", label="proxy RM score (z)")
    ax2.set_ylabel("proxy score (standardised)", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="lower right")
    ax.set_title(f"Best-of-n vs a proxy RM, SmolLM2-135M on {args.task} (n={n_q}), n = 1..{args.k}", fontsize=10)
    ax.grid(alpha=0.3)
    save_figure(fig, OUT / "overopt.png", dpi=120)


if __name__ == "__main__":
    main()
