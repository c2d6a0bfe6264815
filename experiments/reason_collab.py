"""Model collaboration on SmolLM2: the router's accuracy-vs-cost curve against always-cheap and always-strong, and
multi-agent debate against a single model (Du et al. 2023).

    .venv/bin/python experiments/reason_collab.py [--task arithmetic1] [--questions 24] [--max-tokens 48]

Cheap = SmolLM2-135M decoding through its 4-bit weight copies (`--int4`), 4 sampled chains of thought whose
agreement is the routing signal (their majority is its answer). Strong = the same SmolLM2 with fp32 weights and
self-consistency over 8 samples: there is no larger model offline, so "strong" is more test-time compute on the
same network, and the two differ mostly in cost. For every question both are run once with the seeds
llmlab.reason.evaluate gives it; the router at threshold t keeps the cheap answer when agreement >= t, else pays
for the strong one, which is exactly what `router(cheap, strong, k=4, strong_k=8, threshold=t)` does with those
seeds (checked on the first `--check` questions). Debate: two SmolLM2 agents (fp32, different seeds), one round
of reading each other, majority of the final answers and a judge's verdict, against one greedy chain of thought
and self-consistency over as many samples. Writes experiments/results/reason_router/router.{md,json,png} and
experiments/results/reason_debate/debate.{md,json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import bar_plot, write_results  # noqa: E402
from reason_common import accuracy_row, line_plot  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROUTELLM = ("RouteLLM (Ong et al. 2024) reports routers that keep the strong model's quality while sending it "
            "well under half of the queries (over 2x cheaper on MT-Bench)")
DU = ("Du et al. 2023, Table 1 (ChatGPT, 3 agents, 2 rounds): arithmetic 67.0% single agent -> 81.8% debate; "
      "GSM8K 77.0% -> 85.0%")


SHORT = ["1 model\nCoT", "1 model\nSC k=2", "1 model\nSC k=4", "2 agents\nno debate", "2 agents\n1 round",
         "+ judge"]  # plot labels of the debate table's rows


def run_question(cheap, strong, item, seed: int, max_tokens: int) -> dict:
    from llmlab.reason.strategies import cot, debate, self_consistency
    from llmlab.reason.tasks import is_correct
    from llmlab.reason.vote import majority_vote
    c = self_consistency(cheap, item, k=4, max_tokens=max_tokens, seed=seed).trace
    s = self_consistency(strong, item, k=8, max_tokens=max_tokens, seed=seed).trace
    g = cot(strong, item, max_tokens=max_tokens, seed=seed).trace
    d = debate([strong, strong], item, rounds=1, judge=strong, max_tokens=max_tokens, seed=seed).trace
    rounds = [st["answers"] for st in d.steps if "round" in st]
    right = lambda a: bool(is_correct(a, item))
    return {
        "cheap": {"correct": right(majority_vote(c.answers)[0]), "agreement": c.steps[-1]["agreement"],
                  "tokens": c.completion_tokens, "seconds": c.seconds},
        "strong": {"correct": right(majority_vote(s.answers)[0]), "tokens": s.completion_tokens, "seconds": s.seconds},
        "cot": {"correct": right(g.answers[0]), "tokens": g.completion_tokens},
        "sc2": {"correct": right(majority_vote(s.answers[:2])[0]), "tokens": sum(s.sample_tokens[:2])},
        "sc4": {"correct": right(majority_vote(s.answers[:4])[0]), "tokens": sum(s.sample_tokens[:4])},
        "debate0": {"correct": right(majority_vote(rounds[0])[0]), "tokens": sum(d.sample_tokens[:2])},
        "debate1": {"correct": right(majority_vote(rounds[-1])[0]), "tokens": sum(d.sample_tokens[:4])},
        "judge": {"correct": right(d.steps[-1].get("judge")), "tokens": d.completion_tokens},
    }


def router_rows(results, thresholds):
    n = len(results)
    rows = []
    for t in thresholds:
        routed = [r["cheap"]["agreement"] < t for r in results]
        correct = sum(r["strong"]["correct"] if go else r["cheap"]["correct"] for r, go in zip(results, routed))
        tokens = sum(r["cheap"]["tokens"] + (r["strong"]["tokens"] if go else 0) for r, go in zip(results, routed))
        seconds = sum(r["cheap"]["seconds"] + (r["strong"]["seconds"] if go else 0) for r, go in zip(results, routed))
        rows.append({"policy": f"router t={t:.2f}", "to_strong": sum(routed) / n, **accuracy_row(correct, n),
                     "generated_tokens": tokens / n, "seconds": seconds / n})
    for name in ("cheap", "strong"):
        correct = sum(r[name]["correct"] for r in results)
        rows.append({"policy": f"always {name}", "to_strong": float(name == "strong"), **accuracy_row(correct, n),
                     "generated_tokens": sum(r[name]["tokens"] for r in results) / n,
                     "seconds": sum(r[name]["seconds"] for r in results) / n})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic1")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--check", type=int, default=4, help="questions on which to run router() itself and compare")
    args = ap.parse_args()

    from llmlab.client import connect
    from llmlab.reason import make_items
    from llmlab.reason.strategies import router
    from llmlab.reason.tasks import is_correct

    t0 = time.perf_counter()
    cheap, strong = connect(model="smollm2", int4=True), connect(model="smollm2")
    items = make_items(args.task, args.questions, seed=0)
    results = []
    for q, item in enumerate(items):
        results.append(run_question(cheap, strong, item, 100_000 * q, args.max_tokens))
        print(f"question {q + 1}/{len(items)}: {time.perf_counter() - t0:.0f} s", flush=True)
    n = len(results)

    checked = 0
    for q, item in enumerate(items[:args.check]):
        r = router(cheap, strong, item, k=4, strong_k=8, threshold=0.75, max_tokens=args.max_tokens, seed=100_000 * q)
        went = r.trace.steps[-1]["route"] == "strong"
        expected = results[q]["strong" if results[q]["cheap"]["agreement"] < 0.75 else "cheap"]["correct"]
        checked += (went == (results[q]["cheap"]["agreement"] < 0.75)) and (is_correct(r.answer, item) == expected)
    check = f"router() itself agreed with the simulation on {checked} of {min(args.check, n)} questions"

    rows = router_rows(results, [0.0, 0.5, 0.75, 1.0, 1.01])
    common = (f"SmolLM2-135M-Instruct on `{args.task}`, n = {n} questions (seed 0), at most {args.max_tokens} "
              f"tokens per sample; 95% Wilson intervals; {time.perf_counter() - t0:.0f} s in all on a shared 2-core "
              "machine.")
    write_results(RESULTS / "reason_router", "router", rows,
                  f"{common} Cheap: int4 decode, 4 samples (agreement = routing signal). Strong: fp32, "
                  f"self-consistency over 8 samples (same network: more compute, not a bigger model). Cost = "
                  f"generated tokens per question (the router pays the cheap samples for every question). {check}."
                  f"\n\nPaper: {ROUTELLM}.")
    series = {"router (thresholds)": [(r["generated_tokens"], r["accuracy"], r["ci_low"], r["ci_high"])
                                      for r in rows if r["policy"].startswith("router")]}
    for r in rows[-2:]:
        series[r["policy"]] = [(r["generated_tokens"], r["accuracy"], r["ci_low"], r["ci_high"])]
    line_plot(RESULTS / "reason_router" / "router.png", series, f"Router on {args.task} (n={n})",
              "generated tokens per question")

    labels = {"cot": "single, greedy CoT", "sc2": "single, SC k=2", "sc4": "single, SC k=4",
              "debate0": "2 agents, no debate (majority)", "debate1": "2 agents, 1 round (majority)",
              "judge": "2 agents, 1 round + judge"}
    drows = [{"setup": label, **accuracy_row(sum(r[key]["correct"] for r in results), n),
              "generated_tokens": sum(r[key]["tokens"] for r in results) / n} for key, label in labels.items()]
    write_results(RESULTS / "reason_debate", "debate", drows,
                  f"{common} All fp32, temperature 0.7 for sampled answers (greedy CoT at 0); the two agents are the "
                  f"same model with different seeds; the judge is the same model reading both final solutions."
                  f"\n\nPaper: {DU}.")
    bar_plot(RESULTS / "reason_debate" / "debate.png", SHORT,
             {"accuracy": [r["accuracy"] for r in drows]}, f"Debate vs a single model, {args.task} (n={n})",
             "accuracy")
    print(check)


if __name__ == "__main__":
    main()
