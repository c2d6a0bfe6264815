"""Judge runs that write every judgment as it completes (a rerun resumes), repeat themselves for the
self-report, and compute win rates, ratings and human agreement from the judgments."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.client import GenParams, as_client
from llmlab.eval.judge import agreement as agr
from llmlab.eval.judge import ratings as rt
from llmlab.eval.judge import winrate as wr
from llmlab.eval.judge.judge import Judge
from llmlab.eval.judge.selfreport import format_self_report, self_preference_probe, self_report, verbosity_probe
from llmlab.eval.tasks import ItemLog, _key, read_jsonl
from llmlab.io import atomic_write_text

MODES = ("pointwise", "pairwise", "geval")


def judge_items(judge: Judge, mode: str, items: list[dict], log: ItemLog | None = None, chunk: int = 8,
                **kw) -> list[dict]:
    """Judgments of `items` (already-logged ids are reused, new ones appended to `log` as they complete)."""
    if mode not in MODES:
        raise LLMLabError(f"unknown judge mode {mode!r} (one of {', '.join(MODES)})")
    for i, it in enumerate(items):
        it.setdefault("id", i)
    done = log.done if log else {}
    todo = [it for it in items if _key(it["id"]) not in done]
    fn = {"pointwise": judge.pointwise, "pairwise": judge.pairwise, "geval": judge.geval}[mode]
    fresh = {}
    for start in range(0, len(todo), chunk):
        recs = fn(todo[start:start + chunk], **kw)
        if log:
            log.add(recs)
        fresh.update({_key(r["id"]): r for r in recs})
    return [done.get(_key(it["id"])) or fresh[_key(it["id"])] for it in items]


def judge_identity(judge: Judge, mode: str) -> dict:
    """What makes a judge's records what they are: a resumed run with anything else is refused."""
    return {"judge": getattr(judge.backend, "model_id", judge.name), "mode": mode,
            "temperature": judge.temperature, "seed": judge.seed,
            "max_tokens": judge.max_tokens, "rubric": judge._rubric(), "force_verdict": judge.force_verdict}


def run_judge(judge: Judge, mode: str, items: list[dict], out_dir: str | Path | None = None, repeat: bool = True,
              verbosity: bool = False, self_model: str | None = None, **kw) -> dict:
    """Judge items, then judge them again (seed + 1) for the repeat agreement; returns
    {"records", "repeat_records", "report"} and writes judgments.jsonl, repeat.jsonl, report.json, report.md."""
    out = Path(out_dir) if out_dir else None
    if mode == "geval" and "steps" not in kw:
        steps_file = out / "geval_steps.txt" if out else None
        if steps_file and steps_file.exists():
            kw["steps"] = steps_file.read_text(encoding="utf-8")
        else:
            kw["steps"] = judge.geval_steps(kw["criterion"])
            if steps_file:
                atomic_write_text(steps_file, kw["steps"])
    log = ItemLog(out / "judgments.jsonl", judge_identity(judge, mode)) if out else None
    try:
        records = judge_items(judge, mode, items, log, **kw)
    finally:
        if log:
            log.close()
    repeat_records = None
    if repeat:
        again = copy.copy(judge)
        again.seed = judge.seed + 1
        log2 = ItemLog(out / "repeat.jsonl", judge_identity(again, mode)) if out else None
        try:
            repeat_records = judge_items(again, mode, [dict(it) for it in items], log2, **kw)
        finally:
            if log2:
                log2.close()
    report = self_report(records, repeat_records)
    report["judge"] = judge.name
    report["temperature"] = judge.temperature
    report["prompt_versions"] = sorted({f"{mode}:{r.get('domain', '')}:v{r['prompt_version']}" for r in records})
    if verbosity:
        report["verbosity"] = {k: v for k, v in verbosity_probe(judge, items).items() if k != "records"}
    if self_model and mode == "pairwise":
        report["self_preference"] = self_preference_probe(records, self_model)
    if out:
        atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        from llmlab.eval.report import judge_markdown
        atomic_write_text(out / "report.md", judge_markdown(report, records, out))
    return {"records": records, "repeat_records": repeat_records, "report": report}


def generate_answers(backend, prompts: list[str], max_tokens: int = 256, temperature: float = 0.0) -> list[str]:
    backend = as_client(backend)
    return [g.text for g in backend.generate(prompts, GenParams(max_tokens=max_tokens, temperature=temperature))]


def win_rate(judge: Judge, questions: list[str], model_answers: list[str], baseline_answers: list[str],
             out_dir: str | Path | None = None, repeat: bool = True, **kw) -> dict:
    """Win rate (and length-controlled win rate) of model_answers over baseline_answers, plus the self-report."""
    if not (len(questions) == len(model_answers) == len(baseline_answers)):
        raise LLMLabError("questions, model answers and baseline answers must be equally many")
    items = [{"id": i, "question": q, "answer_a": a, "answer_b": b, "model_a": "model", "model_b": "baseline"}
             for i, (q, a, b) in enumerate(zip(questions, model_answers, baseline_answers))]
    res = run_judge(judge, "pairwise", items, out_dir, repeat=repeat, **kw)
    res["win_rate"] = wr.win_rate_report(res["records"])
    if out_dir:
        atomic_write_text(Path(out_dir) / "winrate.json", json.dumps(res["win_rate"], indent=2) + "\n")
    return res


def tournament_items(questions: list[str], answers: dict[str, list[str]], seed: int = 0) -> list[dict]:
    """Every pair of models on every question (which model is A alternates)."""
    models = sorted(answers)
    items = []
    for qi, q in enumerate(questions):
        for k, (m1, m2) in enumerate(itertools.combinations(models, 2)):
            a, b = (m1, m2) if (qi + k + seed) % 2 == 0 else (m2, m1)
            items.append({"id": f"{qi}:{a}:{b}", "question": q, "answer_a": answers[a][qi],
                          "answer_b": answers[b][qi], "model_a": a, "model_b": b})
    return items


def ratings(judge: Judge, questions: list[str], answers: dict[str, list[str]], out_dir=None, repeat=False,
            n_boot: int = 200, **kw) -> dict:
    """Bradley-Terry leaderboard of several models from pairwise judgments of all pairs on all questions."""
    res = run_judge(judge, "pairwise", tournament_items(questions, answers), out_dir, repeat=repeat, **kw)
    battles = rt.battles_from_records(res["records"])
    if not battles:  # every judgment failed to parse: the self-report says so, there is nothing to rate
        res["leaderboard"] = None
        return res
    res["leaderboard"] = rt.leaderboard(battles, n_boot=n_boot)
    if out_dir:
        atomic_write_text(Path(out_dir) / "leaderboard.json", json.dumps(res["leaderboard"], indent=2) + "\n")
        from llmlab.eval.report import plot_ratings
        plot_ratings(res["leaderboard"], Path(out_dir) / "ratings.png")
    return res


def human_agreement(judge: Judge, pairs: list[dict] | str | Path, out_dir=None, repeat: bool = True, **kw) -> dict:
    """Agreement of the judge's pairwise verdicts with human labels (A, B or tie) from a pairs file."""
    if not isinstance(pairs, list):
        pairs = read_jsonl(Path(pairs))
    for i, p in enumerate(pairs):
        for k in ("question", "answer_a", "answer_b", "label"):
            if k not in p:
                raise LLMLabError(f"pair {p.get('id', i)} has no field {k!r}")
        label = str(p["label"]).strip()
        p["label"] = "tie" if label.lower() in ("tie", "c") else label.upper()
        if p["label"] not in ("A", "B", "tie"):
            raise LLMLabError(f"pair {p.get('id', i)}: label must be A, B or tie, got {label!r}")
    res = run_judge(judge, "pairwise", pairs, out_dir, repeat=repeat, **kw)
    judged = [r["verdict"] for r in res["records"]]
    human = [p["label"] for p in pairs]
    res["agreement"] = agr.agreement_with_ties(judged, human)
    res["agreement"]["parse_failures"] = sum(v is None for v in judged)
    if out_dir:
        atomic_write_text(Path(out_dir) / "agreement.json", json.dumps(res["agreement"], indent=2) + "\n")
    return res


__all__ = ["run_judge", "win_rate", "ratings", "human_agreement", "generate_answers", "format_self_report",
           "judge_items", "tournament_items"]
