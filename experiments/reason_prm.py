"""A process reward model for SmolLM2's arithmetic: trained on step-labelled traces through llmlab.reason.prm, then
used to pick among SmolLM2's sampled chains of thought (best-of-N), beside the other ways of choosing.

    .venv/bin/python experiments/reason_prm.py --int4 [--task arithmetic1] [--questions 30] [--k 16] [--steps 60]
        [--prm-from runs/reason_prm] [--orm runs/reason_overopt/proxy]   # reuse a trained PRM; add an outcome RM

Training traces are worked solutions of the task's generator with exact step labels (a slip at a random step makes
that step and every later one bad: what Math-Shepherd's rollouts estimate; `--shepherd N` also labels N of
SmolLM2's own samples from other questions by rollouts). The PRM is SmolLM2 with a scalar head read at every step's
newline, its last `--trainable-blocks` blocks trained. The candidates are the frontier's cached pool (the same
questions and samples), so the numbers sit beside experiments/results/reason_frontier. Writes
experiments/results/reason_prm/prm.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_results  # noqa: E402
from reason_common import accuracy_row, line_plot, sample_pool  # noqa: E402

OUT = Path(__file__).parent / "results" / "reason_prm"
PAPERS = ("Math-Shepherd (Wang et al. 2024): Mistral-7B reaches 89.1% on GSM8K (43.5% on MATH) when its PRM picks "
          "among 256 samples; Lightman et al. 2023: on MATH a PRM picks better than an outcome RM and than majority "
          "vote")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic1")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--train-items", type=int, default=400)
    ap.add_argument("--shepherd", type=int, default=0, help="also label this many SmolLM2 samples by rollouts")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--trainable-blocks", type=int, default=2)
    ap.add_argument("--int4", action="store_true")
    ap.add_argument("--prm-from", default=None, help="reuse the PRM an earlier run trained (runs/reason_prm), "
                                                     "with its train.json")
    ap.add_argument("--orm", default=None, help="also choose by an outcome RM: reason_overopt.py's proxy run "
                                                "directory (runs/reason_overopt/proxy) or a reward-model dir")
    args = ap.parse_args()

    from llmlab.client import connect
    from llmlab.reason import make_items
    from llmlab.reason.prm import PRMScorer
    from llmlab.reason.prompts import cot_prompt
    from llmlab.reason.tasks import is_correct
    from llmlab.reason.vote import majority_vote

    t0 = time.perf_counter()
    client = connect(model="smollm2", int4=args.int4)
    items = make_items(args.task, args.questions, seed=0)
    suffix = f"-t{args.max_tokens}-T{args.temperature}{'-int4' if args.int4 else ''}"
    pool = sample_pool(client, items, args.k, args.max_tokens, args.temperature,
                       f"{args.task}-q{len(items)}-k{args.k}{suffix}")
    if args.prm_from:  # the pool is cached: no sampling
        del client
        trained = json.loads((Path(args.prm_from) / "train.json").read_text())
    else:
        trained = train_new_prm(client, args)
    scorer = PRMScorer(trained["path"])
    orm_scores = None
    if args.orm:
        from reason_overopt import load_proxy
        orm = load_proxy(args.orm)
        orm_scores = [orm.score_batch([cot_prompt(rec["item"])] * len(rec["samples"]), rec["samples"]) for rec in pool]
        del orm

    n, rows = len(pool), []
    prm_scores = [scorer(rec["item"], rec["samples"]) for rec in pool]
    for k in [k for k in (1, 2, 4, 8, 16, 32) if k <= args.k]:
        counts = {"best-of-n (PRM, min over steps)": 0, "best-of-n (likelihood)": 0, "self-consistency": 0,
                  "pass@k (verifier)": 0}
        if orm_scores:
            counts["best-of-n (ORM: outcome RM)"] = 0
        for q, (rec, ps) in enumerate(zip(pool, prm_scores)):
            item, answers, lps = rec["item"], rec["answers"][:k], rec["logprob"][:k]
            counts["best-of-n (PRM, min over steps)"] += is_correct(answers[ps[:k].index(max(ps[:k]))], item)
            if orm_scores:
                os_ = orm_scores[q][:k]
                counts["best-of-n (ORM: outcome RM)"] += is_correct(answers[os_.index(max(os_))], item)
            counts["best-of-n (likelihood)"] += is_correct(answers[lps.index(max(lps))], item)
            counts["self-consistency"] += is_correct(majority_vote(answers)[0], item)
            counts["pass@k (verifier)"] += any(rec["correct"][:k])
        for name, correct in counts.items():
            rows.append({"chooser": name, "k": k, **accuracy_row(correct, n)})
    note = (f"SmolLM2-135M-Instruct on `{args.task}`: n = {n} questions x {args.k} samples (the frontier's pool). PRM: "
            f"SmolLM2 + step head, last {trained['trainable_blocks']} blocks, {trained['steps']} steps (lr "
            f"{trained['lr']}) on {trained['traces']} step-labelled traces ({trained['exact']} exact, "
            f"{trained['traces'] - trained['exact']} Math-Shepherd), {trained['seconds']:.0f} s; held-out step "
            f"ranking (AUROC, good above bad) {trained['val']:.3f}."
            + (f" ORM: the outcome reward model of reason_overopt ({args.orm}: trained on (right, wrong) pairs of "
               f"whole samples)." if args.orm else "")
            + f" 95% Wilson intervals. {time.perf_counter() - t0:.0f} s in all.\n\nPapers: {PAPERS}.")
    write_results(OUT, "prm", rows, note)
    series = {}
    for r in rows:
        series.setdefault(r["chooser"], []).append((r["k"], r["accuracy"], r["ci_low"], r["ci_high"]))
    line_plot(OUT / "prm.png", series, f"Choosing among k samples, SmolLM2-135M on {args.task} (n={n})",
              "samples k (log)", logx=True)
    print(note)


def train_new_prm(client, args) -> dict:
    """Step-labelled traces (exact, plus Math-Shepherd rollout labels of SmolLM2's own samples), then the PRM,
    trained into runs/reason_prm; its summary is kept in runs/reason_prm/train.json for --prm-from."""
    from llmlab.io import atomic_write_text
    from llmlab.reason import make_items
    from llmlab.reason.prm import StepTrace, arithmetic_traces, label_steps, split_steps, train_prm
    from llmlab.train.config import TrainConfig
    suffix = f"-t{args.max_tokens}-T{args.temperature}{'-int4' if args.int4 else ''}"
    traces = arithmetic_traces(make_items(args.task, args.train_items, seed=2), seed=2)
    held_out = arithmetic_traces(make_items(args.task, 60, seed=3), seed=3)
    if args.shepherd:
        others = sample_pool(client, make_items(args.task, max(1, args.shepherd // 4), seed=4), 4, args.max_tokens,
                             args.temperature, f"{args.task}-seed4-q{max(1, args.shepherd // 4)}-k4{suffix}")
        for q, rec in enumerate(others):
            for j, text in enumerate(rec["samples"]):
                steps = split_steps(text)[:6]
                if steps:
                    labels = label_steps(client, rec["item"], steps, rollouts=4, max_tokens=32, seed=1000 * q + j)
                    traces.append(StepTrace(rec["item"], steps, labels))
    del client
    out = Path("runs") / "reason_prm"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(out_dir=str(out), seq_len=160, micro_batch=8, max_steps=args.steps, lr=args.lr,
                      min_lr=args.lr / 10, warmup_steps=4, dtype="float32", progress=False, eval_every=0,
                      save_every=0, peak_flops=1e12, seed=0)
    trained = train_prm("smollm2", traces, cfg, val_traces=held_out, trainable_blocks=args.trainable_blocks)
    trained = {**trained, "path": str(trained["path"]), "traces": len(traces), "exact": args.train_items,
               "lr": args.lr, "trainable_blocks": args.trainable_blocks}
    atomic_write_text(out / "train.json", json.dumps(trained, indent=2) + "\n")
    return trained


if __name__ == "__main__":
    main()
