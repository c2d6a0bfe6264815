"""Accuracy against generated tokens for every test-time strategy on one arithmetic set with SmolLM2 (a compute
frontier, as in Snell et al. 2024), and self-consistency accuracy as k grows (Wang et al. 2022).

    .venv/bin/python experiments/reason_frontier.py --int4 [--task arithmetic1] [--questions 30] [--k 16]
        [--max-tokens 48] [--tree] [--fewshot]

Every point is a llmlab.reason strategy on the same questions. Self-consistency, its weighted vote and best-of-N
(by the model's likelihood; by the task's verifier = pass@k, the ceiling) for k = 1, 2, 4, ... are all read from
one request of k_max samples per question (reason_common.sample_pool, cached for the other experiments): sample i
uses seed + i, so the first k samples of that request are exactly what the strategy draws with k
(tests/test_reason.py checks it). Greedy chain of thought (zero- and 2-shot), direct answers, tree of thoughts
and self-refine run through llmlab.reason.evaluate. Writes experiments/results/reason_frontier/frontier.{md,json,png}
and experiments/results/reason_self_consistency/self_consistency.{md,json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_results  # noqa: E402
from reason_common import accuracy_row, line_plot, pool_time, sample_pool  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT, SC_OUT = RESULTS / "reason_frontier", RESULTS / "reason_self_consistency"

# Wang et al. 2022 (Table 2, GSM8K): chain of thought greedy -> self-consistency with 40 sampled paths
WANG = [("PaLM 540B", 56.5, 74.4), ("code-davinci-002", 60.1, 78.0), ("LaMDA 137B", 17.1, 27.7)]
SNELL = ("Snell et al. 2024: compute-optimal allocation of test-time compute beats best-of-N with about 4x less "
         "compute on MATH, and the gains from more samples flatten as the budget grows")


def vote_counts(pool, k: int) -> dict[str, int]:
    """Questions right when each aggregation reads the first k samples of every question's pool."""
    from llmlab.reason.tasks import is_correct
    from llmlab.reason.vote import majority_vote, weighted_vote
    right = dict.fromkeys(["self-consistency", "self-consistency (weighted)", "best-of-n (likelihood)",
                           "best-of-n (verifier = pass@k)"], 0)
    for rec in pool:
        item, answers, lps = rec["item"], rec["answers"][:k], rec["logprob"][:k]
        right["self-consistency"] += is_correct(majority_vote(answers)[0], item)
        right["self-consistency (weighted)"] += is_correct(weighted_vote(answers, lps)[0], item)
        right["best-of-n (likelihood)"] += is_correct(answers[lps.index(max(lps))], item)
        right["best-of-n (verifier = pass@k)"] += int(any(rec["correct"][:k]))
    return right


def stops_paying(rows) -> list[str]:
    """Per strategy with several sizes: the smallest budget within one question of its best accuracy."""
    out = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        points = sorted((r["generated_tokens"], r["accuracy"], r["size"]) for r in rows if r["strategy"] == name)
        if len(points) < 2:
            continue
        best, n = max(p[1] for p in points), rows[0]["n"]
        tokens, acc, size = next(p for p in points if p[1] >= best - 1 / n)
        if size == points[-1][2]:
            out.append(f"{name}: still paying at its largest size {size} (~{tokens:.0f} generated "
                       f"tokens/question, accuracy {acc:.2f})")
        else:
            out.append(f"{name}: stops paying at size {size} (~{tokens:.0f} generated tokens/question, accuracy "
                       f"{acc:.2f}; within one question of its best, {best:.2f})")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic1")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--tree", action="store_true", help="also tree of thoughts and self-refine (slow)")
    ap.add_argument("--tree-breadths", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3],
                    help="with --tree: the breadths to run (comma-separated)")
    ap.add_argument("--fewshot", action="store_true", help="also 2-shot chain of thought")
    ap.add_argument("--int4", action="store_true", help="decode batches of <= 4 rows through 4-bit weight copies")
    args = ap.parse_args()

    from llmlab.client import connect
    from llmlab.reason import make_items
    from llmlab.reason.run import evaluate

    client = connect(model="smollm2", int4=args.int4)
    items = make_items(args.task, args.questions, seed=0)
    n, rows, t0 = len(items), [], time.perf_counter()
    tag = f"{args.task}-q{n}-k{args.k}-t{args.max_tokens}-T{args.temperature}{'-int4' if args.int4 else ''}"
    pool = sample_pool(client, items, args.k, args.max_tokens, args.temperature, tag)
    pool_seconds = pool_time(tag) / n  # what sampling it cost, even when it was read from the cache

    def add(strategy, size, correct, tokens, seconds):
        rows.append({"strategy": strategy, "size": size, **accuracy_row(correct, n), "generated_tokens": tokens,
                     "seconds": seconds})
        print(f"{strategy:>30} {size!s:>3}: accuracy {correct / n:.3f}, {tokens:.0f} generated tokens/question",
              flush=True)

    for k in [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.k]:
        tokens = sum(sum(rec["tokens"][:k]) for rec in pool) / n
        for name, correct in vote_counts(pool, k).items():
            add(name, k, correct, tokens, pool_seconds * k / args.k)
    write_self_consistency(rows, args, n)

    stages = [("cot (zero-shot, greedy)", 1, "cot", {"max_tokens": args.max_tokens}),
              ("direct", 1, "direct", {"max_tokens": 12})]
    if args.fewshot:
        stages.append(("cot (2-shot, greedy)", 1, "cot", {"shots": 2, "max_tokens": args.max_tokens}))
    if args.tree:
        for breadth in args.tree_breadths:
            stages.append(("tree of thoughts (beam 2, likelihood)", breadth, "tree",
                           {"breadth": breadth, "beam": 2, "max_steps": 3, "step_tokens": 24,
                            "temperature": args.temperature}))
        stages.append(("self-refine", 1, "revise", {"rounds": 1, "max_tokens": args.max_tokens,
                                                    "critique_tokens": 32}))
    for label, size, name, options in stages:
        s = evaluate(name, client, items, **options)
        add(label, size, sum(r["correct"] for r in s["rows"]), s["completion_tokens"], s["seconds"])
        save(rows, args, n, time.perf_counter() - t0)
    save(rows, args, n, time.perf_counter() - t0)
    print(f"wrote {OUT}/frontier.{{md,json,png}} and {SC_OUT}/self_consistency.{{md,json,png}}")


def save(rows, args, n, seconds):
    note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF, in-process{', --int4' if args.int4 else ''}), task `{args.task}`, "
            f"n = {n} questions (seed 0), at most {args.max_tokens} tokens per sample, temperature "
            f"{args.temperature} for sampled strategies; {seconds:.0f} s in all on a shared 2-core machine. "
            "accuracy with its 95% Wilson interval (ci_low, ci_high). Generated tokens are per question (prompt "
            "tokens not counted: a shared prompt is prefilled once).\n\n"
            "Where each strategy stops paying:\n\n" + "\n".join(f"- {s}" for s in stops_paying(rows))
            + f"\n\nPaper: {SNELL}.")
    write_results(OUT, "frontier", rows, note)
    series = {}
    for r in rows:
        series.setdefault(r["strategy"], []).append((max(r["generated_tokens"], 1.0), r["accuracy"], r["ci_low"],
                                                     r["ci_high"]))
    line_plot(OUT / "frontier.png", series, f"SmolLM2-135M on {args.task} (n={n}): accuracy vs test-time compute",
              "generated tokens per question (log)", logx=True)


def write_self_consistency(rows, args, n):
    picked = [r for r in rows if r["strategy"] in ("self-consistency", "self-consistency (weighted)",
                                                   "best-of-n (verifier = pass@k)")]
    table = [{"k": r["size"], "aggregation": r["strategy"], "accuracy": r["accuracy"], "ci_low": r["ci_low"],
              "ci_high": r["ci_high"], "n": n, "generated_tokens": r["generated_tokens"]} for r in picked]
    one = next(r["accuracy"] for r in picked if r["size"] == 1 and r["strategy"] == "self-consistency")
    top = max(r["accuracy"] for r in picked if r["strategy"] == "self-consistency")
    note = (f"Self-consistency on `{args.task}` with SmolLM2-135M-Instruct: n = {n} questions, k sampled chains of "
            f"thought (temperature {args.temperature}, at most {args.max_tokens} tokens) per question, majority "
            f"vote and probability-weighted vote; pass@k (any sample right) is the ceiling a vote can reach. "
            f"Ours: one sample {one:.2f} -> best majority vote {top:.2f}.\n\n"
            "Wang et al. 2022 (GSM8K, greedy chain of thought -> self-consistency over 40 paths): "
            + "; ".join(f"{m} {a:.1f}% -> {b:.1f}%" for m, a, b in WANG) + ".")
    write_results(SC_OUT, "self_consistency", table, note)
    series = {}
    for r in picked:
        series.setdefault(r["strategy"], []).append((r["size"], r["accuracy"], r["ci_low"], r["ci_high"]))
    line_plot(SC_OUT / "self_consistency.png", series,
              f"Self-consistency, SmolLM2-135M on {args.task} (n={n})", "samples k (log)", logx=True)


if __name__ == "__main__":
    main()
