"""Accuracy against generated tokens for test-time strategies on one arithmetic set with SmolLM2 (a compute
frontier, as in Snell et al. 2024), and self-consistency accuracy as k grows (Wang et al. 2022).

    .venv/bin/python experiments/reason_frontier.py [--task arithmetic1] [--questions 24] [--k 16] [--max-tokens 48]

Every point is a llmlab.reason strategy on the same questions. Self-consistency, its weighted vote and best-of-N
(by the model's likelihood; by the task's verifier = pass@k, the ceiling) for k = 1, 2, 4, ... are all read from
one request of k_max samples per question: sample i uses seed + i, so the first k samples of that request are
exactly what the strategy draws with k (tests/test_reason.py checks it). Writes
experiments/results/reason_frontier/{frontier.md,frontier.json,frontier.png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_results  # noqa: E402

OUT = Path(__file__).parent / "results" / "reason_frontier"

# Wang et al. 2022 (Table 2, GSM8K): chain of thought greedy -> self-consistency with 40 sampled paths
WANG = [("PaLM 540B", 56.5, 74.4), ("code-davinci-002", 60.1, 78.0), ("LaMDA 137B", 17.1, 27.7)]


def vote_curves(items, traces, k: int) -> dict[str, int]:
    """Questions right when each aggregation reads the first k samples of every question's trace."""
    from llmlab.reason.scorers import verifier
    from llmlab.reason.tasks import is_correct
    from llmlab.reason.vote import majority_vote, weighted_vote
    right = dict.fromkeys(["self-consistency", "self-consistency (weighted)", "best-of-n (likelihood)",
                           "best-of-n (verifier = pass@k)"], 0)
    for item, t in zip(items, traces):
        answers, texts, lps = t.answers[:k], t.samples[:k], t.scores[:k]  # scores: mean token logprobs
        right["self-consistency"] += is_correct(majority_vote(answers)[0], item)
        right["self-consistency (weighted)"] += is_correct(weighted_vote(answers, lps)[0], item)
        right["best-of-n (likelihood)"] += is_correct(answers[lps.index(max(lps))], item)
        right["best-of-n (verifier = pass@k)"] += int(max(verifier(item, texts)))
    return right


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic1")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--tree", action="store_true", help="also tree of thoughts and revision (slow)")
    ap.add_argument("--fewshot", action="store_true", help="also 2-shot chain of thought")
    ap.add_argument("--int4", action="store_true", help="decode batches of <= 4 rows through 4-bit weight copies")
    args = ap.parse_args()

    from llmlab.client import connect
    from llmlab.reason import make_items
    from llmlab.reason.run import evaluate, frontier_plot

    client = connect(model="smollm2", int4=args.int4)
    items = make_items(args.task, args.questions, seed=0)
    rows, t0 = [], time.perf_counter()

    def add(strategy, size, summary):
        rows.append({"strategy": strategy, "size": size, "accuracy": summary["accuracy"],
                     "generated_tokens": summary["completion_tokens"], "seconds": summary["seconds"]})
        print(f"{strategy:>22} {size!s:>3}: accuracy {summary['accuracy']:.3f}, "
              f"{summary['completion_tokens']:.0f} generated tokens/question", flush=True)

    def save():
        note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF, in-process{', --int4' if args.int4 else ''}), task "
                f"`{args.task}`, {len(items)} questions (seed 0), max {args.max_tokens} tokens per sample, temperature "
                f"{args.temperature} for sampled strategies; {time.perf_counter() - t0:.0f} s in all on a shared "
                "2-core machine. "
                "Generated tokens are per question (prompt tokens not counted: a shared prompt is prefilled once).\n\n"
                "Wang et al. 2022, GSM8K, CoT greedy -> self-consistency over 40 paths: "
                + "; ".join(f"{m} {a:.1f} -> {b:.1f}" for m, a, b in WANG) + ".")
        write_results(OUT, "frontier", rows, note)
        series = {}
        for r in rows:
            series.setdefault(r["strategy"], []).append((max(r["generated_tokens"], 1.0), r["accuracy"]))
        frontier_plot(OUT / "frontier.png", series, f"SmolLM2-135M on {args.task}: accuracy vs test-time compute")

    # one request of k samples per question; the k' < k strategies are its prefixes (same seeds)
    from llmlab.reason.strategies import best_of_n
    t1, traces = time.perf_counter(), []
    for i, item in enumerate(items):  # the seeds evaluate() gives question i
        traces.append(best_of_n(client, item, n=args.k, scorer="likelihood", temperature=args.temperature,
                                max_tokens=args.max_tokens, seed=100_000 * i).trace)
    seconds = (time.perf_counter() - t1) / len(items)
    for k in [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.k]:
        tokens = sum(sum(t.sample_tokens[:k]) for t in traces) / len(items)
        for name, correct in vote_curves(items, traces, k).items():
            add(name, k, {"accuracy": correct / len(items), "completion_tokens": tokens,
                          "seconds": seconds * k / args.k})
    save()

    stages = [("cot (zero-shot)", "", "cot", {"max_tokens": args.max_tokens}),
              ("direct", "", "direct", {"max_tokens": 12})]
    if args.fewshot:
        stages.append(("cot (2-shot)", "", "cot", {"shots": 2, "max_tokens": args.max_tokens}))
    if args.tree:
        stages += [("tree (breadth 2, beam 2)", 2, "tree", {"breadth": 2, "beam": 2, "max_steps": 4,
                                                             "step_tokens": 24, "temperature": args.temperature}),
                   ("revise (1 round)", 1, "revise", {"rounds": 1, "max_tokens": args.max_tokens,
                                                      "critique_tokens": 32})]
    for label, size, name, options in stages:
        add(label, size, evaluate(name, client, items, **options))
        save()
    print(f"wrote {OUT}/frontier.{{md,json,png}}")


if __name__ == "__main__":
    main()
