"""The judge's report on itself, computed from its raw judgments: parse failures, position consistency,
agreement between two repeated runs, and on request a verbosity probe and a self-preference probe."""

from __future__ import annotations

from collections import Counter

import numpy as np

from llmlab.eval.judge.agreement import agreement


def self_report(records: list[dict], repeat: list[dict] | None = None) -> dict:
    n = len(records)
    failures = sum(bool(r["parse_error"]) for r in records)
    rep = {"mode": records[0]["mode"] if records else None, "n": n, "parse_failures": failures,
           "parse_failure_rate": failures / n if n else None}
    sources = verdict_sources(records)
    if sources:
        rep["verdict_sources"] = sources
        rep["forced_items"] = sum(r.get("verdict_source") == "logprob" for r in records)
    if rep["mode"] == "pairwise":
        parsed = [r for r in records if not r["parse_error"]]
        consistent = sum(bool(r["consistent"]) for r in parsed)
        rep["position_consistency"] = consistent / len(parsed) if parsed else None
        rep["position_inconsistent"] = len(parsed) - consistent
        # over single orders: how often the answer shown first won (0.5 for a judge blind to position)
        shown_first = [raw for r in records for raw in (r["verdicts"][0], _unswap(r["verdicts"][1]))
                       if raw in ("A", "B")]
        rep["first_position_win_rate"] = (shown_first.count("A") / len(shown_first)) if shown_first else None
        rep["verdicts"] = dict(Counter(r["verdict"] for r in parsed))
    else:
        scores = [r["score"] for r in records if r.get("score") is not None]
        rep["mean_score"] = float(np.mean(scores)) if scores else None
        rep["score_histogram"] = dict(sorted(Counter(round(s) for s in scores).items()))
    if repeat is not None:
        rep["repeat"] = repeat_agreement(records, repeat)
    return rep


def verdict_sources(records: list[dict]) -> dict | None:
    """Over single judge outputs (two per pairwise item): verdicts parsed from the marker, forced from
    log-probabilities because the marker was missing, and neither (failed). None for modes without verdicts."""
    singles = []
    for r in records:
        if "verdict_sources" in r:
            singles += r["verdict_sources"]
        elif "verdict_source" in r:
            singles.append(r["verdict_source"])
    if not singles:
        return None
    return {"judgments": len(singles), "parsed": singles.count("parsed"), "forced": singles.count("logprob"),
            "failed": singles.count(None)}


def _unswap(v):
    return {"A": "B", "B": "A"}.get(v, v)


def repeat_agreement(first: list[dict], second: list[dict]) -> dict:
    """How far two runs of the same judge on the same items agree (verdicts, or scores rounded to integers)."""
    by_id = {str(r["id"]): r for r in second}
    pairs = [(r, by_id[str(r["id"])]) for r in first if str(r["id"]) in by_id]
    if first and first[0]["mode"] == "pairwise":
        out = agreement([a["verdict"] for a, _ in pairs], [b["verdict"] for _, b in pairs])
    else:
        a = [None if x["score"] is None else round(x["score"]) for x, _ in pairs]
        b = [None if y["score"] is None else round(y["score"]) for _, y in pairs]
        out = agreement(a, b)
        both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        out["within_one"] = float(np.mean([abs(x - y) <= 1 for x, y in both])) if both else None
    return out


def pad_verbosely(question: str, answer: str) -> str:
    """The same answer, longer but with nothing new: restated question, answer, and a restatement of it."""
    return (f"To answer the question \"{question.strip()}\", let me restate it and answer carefully.\n\n{answer.strip()}"
            f"\n\nIn other words, to restate the answer in full: {answer.strip()}\n\n"
            f"To summarize, the answer above addresses the question \"{question.strip()}\".")


def verbosity_probe(judge, items: list[dict]) -> dict:
    """Pairwise-judge each answer against its padded copy (both orders): how often does the padded one win?

    A judge that rewards content, not length, gives ties or prefers the concise answer."""
    pairs = []
    for i, it in enumerate(items):
        answer = it.get("answer", it.get("answer_a"))
        pairs.append({"id": it.get("id", i), "question": it["question"], "answer_a": answer,
                      "answer_b": pad_verbosely(it["question"], answer)})
    recs = judge.pairwise(pairs)
    decided = [r for r in recs if r["verdict"] is not None]
    padded = sum(r["verdict"] == "B" for r in decided)
    concise = sum(r["verdict"] == "A" for r in decided)
    return {"n": len(recs), "parse_failures": len(recs) - len(decided),
            "forced": sum(r.get("verdict_source") == "logprob" for r in decided), "padded_wins": padded,
            "concise_wins": concise, "ties": len(decided) - padded - concise,
            "padded_win_rate": padded / len(decided) if decided else None, "records": recs}


def self_preference_probe(records: list[dict], self_model: str) -> dict:
    """From pairwise judgments naming model_a/model_b: the judge's win rate for answers of its own model, and
    the human win rate for the same pairs where labels exist (their difference is the self-preference)."""
    judged, human = [], []
    for r in records:
        if self_model not in (r.get("model_a"), r.get("model_b")) or r.get("model_a") == r.get("model_b"):
            continue
        me = "A" if r.get("model_a") == self_model else "B"
        if r.get("verdict") is not None:
            judged.append(1.0 if r["verdict"] == me else 0.5 if r["verdict"] == "tie" else 0.0)
        label = r.get("label")
        if label in ("A", "B", "tie"):
            human.append(1.0 if label == me else 0.5 if label == "tie" else 0.0)
    out = {"self_model": self_model, "pairs": len(judged),
           "judge_self_win_rate": float(np.mean(judged)) if judged else None,
           "human_self_win_rate": float(np.mean(human)) if human else None}
    if judged and human:
        out["self_preference"] = out["judge_self_win_rate"] - out["human_self_win_rate"]
    return out


def format_self_report(rep: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    lines = ["judge self-report:",
             f"  items {rep['n']}, parse failures {rep['parse_failures']} ({pct(rep['parse_failure_rate'])})"]
    if rep.get("verdict_sources"):
        v = rep["verdict_sources"]
        lines.append(f"  verdicts of {v['judgments']} judge outputs: {v['parsed']} parsed from the marker, "
                     f"{v['forced']} forced from log-probabilities (marker missing), {v['failed']} failed; "
                     f"{rep['forced_items']} items rest on a forced verdict")
    if "position_consistency" in rep:
        lines.append(f"  position consistency {pct(rep['position_consistency'])} "
                     f"({rep['position_inconsistent']} inconsistent pairs counted as ties); "
                     f"answer shown first wins {pct(rep['first_position_win_rate'])} of single-order verdicts")
    if "mean_score" in rep and rep["mean_score"] is not None:
        lines.append(f"  mean score {rep['mean_score']:.2f}; histogram {rep['score_histogram']}")
    if "repeat" in rep:
        r = rep["repeat"]
        if r.get("agreement") is None:
            lines.append("  repeated run: no item parsed in both runs")
        else:
            extra = f", within one point {pct(r['within_one'])}" if r.get("within_one") is not None else ""
            lines.append(f"  repeated run agreement {pct(r['agreement'])} (95% CI {pct(r['agreement_ci95'][0])}-"
                         f"{pct(r['agreement_ci95'][1])}), kappa {r['kappa']:.2f}{extra}, over {r['n']} items")
    if "verbosity" in rep:
        v = rep["verbosity"]
        lines.append(f"  verbosity probe: padded answer wins {pct(v['padded_win_rate'])} of decided pairs "
                     f"({v['padded_wins']} padded, {v['concise_wins']} concise, {v['ties']} ties, "
                     f"{v['parse_failures']} unparsed, {v.get('forced', 0)} with a forced verdict)")
    if "self_preference" in rep:
        s = rep["self_preference"]
        lines.append(f"  self-preference probe ({s['self_model']}): judge gives its own answers a win rate of "
                     f"{pct(s['judge_self_win_rate'])}; humans {pct(s['human_self_win_rate'])} over {s['pairs']} pairs")
    return "\n".join(lines)
