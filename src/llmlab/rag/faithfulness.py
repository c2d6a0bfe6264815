"""Measured answers: correctness against gold answers, faithfulness to the retrieved passages, and how far the
model judging faithfulness can be trusted (its agreement with a small hand-labelled calibration set).

Faithfulness of one answer is the share of its claims (sentences, citation markers removed) that the passages it
was shown support, as judged by a model through the client: P(Yes) / (P(Yes) + P(No)) to "is the sentence
supported by the context?" (llmlab.safety.hallucination, the same check as `llmlab check-grounding`), a claim
counting as supported at 0.5 or more. An answer that abstains ("I do not know") makes no claim and has no
faithfulness; it is counted apart.
"""

from __future__ import annotations

import re

import numpy as np

from llmlab.client import ModelClient
from llmlab.errors import LLMLabError
from llmlab.rag.answer import CITATION, Answer, ask_many
from llmlab.safety.hallucination import split_claims, yes_probabilities
from llmlab.safety.stats import auroc, wilson_interval

SUPPORTED = 0.5  # P(Yes) at or above this is a "supported" verdict
ABSTAIN = re.compile(r"\b(do not know|don't know|not (?:mentioned|stated|given|provided)|cannot answer|no information)\b",
                     re.I)

# Hand-labelled (passage, claim, supported?) pairs in the style of the bios world: half supported (stated or
# restated), half not (contradicted by the passage, or absent from it). Labels by the author of this module.
_PASSAGES = [
    "Clara Dale Pemberton was born on August 13, 1982, in Sioux Falls, SD. She studied Biology at Rice University "
    "and worked for Helix Genomics in San Diego, CA.",
    "Hugo Reed Galloway was born on March 2, 1975, in Boise, ID. He graduated in Economics from Duke University. "
    "He was employed by Granite Harbor Bank in Charlotte, NC.",
    "Iris Moss Sterling came into the world on June 30, 1990, in Ithaca, NY. She majored in Music at Brown "
    "University and later joined Brightwave Media in Los Angeles, CA.",
    "Felix Oak Whitlock was born in Reno, NV on January 9, 1968. He studied Geology at Purdue University and worked "
    "at Keystone Steel, based in Cleveland, OH.",
]
_CLAIMS = [
    (["Clara Dale Pemberton was born in Sioux Falls, SD.", "She studied Biology.",
      "Clara Dale Pemberton worked for Helix Genomics.", "Clara Dale Pemberton attended Rice University."],
     ["Clara Dale Pemberton was born in Boise, ID.", "She studied Physics at Rice University.",
      "Clara Dale Pemberton worked for Meta Platforms.", "Clara Dale Pemberton was born in 1975."]),
    (["Hugo Reed Galloway was born on March 2, 1975.", "He studied Economics at Duke University.",
      "Hugo Reed Galloway worked in Charlotte, NC.", "Hugo Reed Galloway was born in Boise, ID."],
     ["Hugo Reed Galloway studied at Stanford University.", "Hugo Reed Galloway worked for Redwood Energy.",
      "Hugo Reed Galloway was born in Savannah, GA.", "He won a Nobel Prize in Economics."]),
    (["Iris Moss Sterling was born in Ithaca, NY.", "Iris Moss Sterling majored in Music.",
      "She worked for Brightwave Media.", "Iris Moss Sterling was born on June 30, 1990."],
     ["Iris Moss Sterling majored in Chemistry.", "Iris Moss Sterling studied at Cornell University.",
      "She has two children.", "Iris Moss Sterling was born on June 30, 1985."]),
    (["Felix Oak Whitlock was born in Reno, NV.", "Felix Oak Whitlock studied Geology at Purdue University.",
      "He worked at Keystone Steel.", "Felix Oak Whitlock's employer is based in Cleveland, OH."],
     ["Felix Oak Whitlock was born in Lincoln, NE.", "Felix Oak Whitlock studied Nursing.",
      "He worked at Stonegate Motors in Detroit, MI.", "Felix Oak Whitlock was born in 1990."]),
]
CALIBRATION = [{"context": passage, "claim": claim, "supported": label}
               for passage, (yes, no) in zip(_PASSAGES, _CLAIMS)
               for claims, label in ((yes, True), (no, False)) for claim in claims]


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def answer_correct(answer: str, gold: list[str]) -> bool:
    """Whether any gold answer appears in the answer, words compared without case or punctuation (the accuracy of
    Liu et al. 2023 and of open-domain QA evaluations: a short fact named anywhere in the answer)."""
    said = f" {normalise(answer)} "
    return any(f" {normalise(g)} " in said for g in gold if normalise(g))


def claims(answer_text: str) -> list[str]:
    """The answer's claims: its sentences without citation markers; none when it abstains."""
    text = re.sub(r"\s+([.,;:!?])", r"\1", CITATION.sub("", answer_text))  # "capital [1]." -> "capital."
    return [c for c in split_claims(text) if not ABSTAIN.search(c) and re.search(r"\w", c)]


def faithfulness(client: ModelClient, answers: list[Answer]) -> list[dict]:
    """For each answer: its claims, each with the judge's P(supported by the passages shown), and the share
    supported (None when the answer makes no claim)."""
    jobs, owners = [], []
    per_answer = []
    for i, a in enumerate(answers):
        context = "\n\n".join(h.chunk.indexed_text for h in a.passages)
        cs = claims(a.raw_text)
        per_answer.append(cs)
        jobs += [(context, c) for c in cs]
        owners += [i] * len(cs)
    support = yes_probabilities(client, jobs) if jobs else []
    out = [{"claims": [], "faithfulness": None} for _ in answers]
    for i, claim, p in zip(owners, (c for cs in per_answer for c in cs), support):
        out[i]["claims"].append({"claim": claim, "support": p, "supported": p >= SUPPORTED})
    for row in out:
        if row["claims"]:
            row["faithfulness"] = sum(c["supported"] for c in row["claims"]) / len(row["claims"])
    return out


def judge_reliability(client: ModelClient, items: list[dict] | None = None) -> dict:
    """The judge against hand labels: agreement and Cohen's kappa of its verdicts (bootstrap 95% intervals, as the
    judge commands report them), and the AUROC of its P(supported), which needs no threshold."""
    from llmlab.eval.judge.agreement import agreement

    items = CALIBRATION if items is None else items
    p = yes_probabilities(client, [(it["context"], it["claim"]) for it in items])
    verdicts = [x >= SUPPORTED for x in p]
    labels = [bool(it["supported"]) for it in items]
    out = agreement(verdicts, labels)
    pos = [x for x, l in zip(p, labels) if l]
    neg = [x for x, l in zip(p, labels) if not l]
    out["auroc"] = auroc(pos, neg) if pos and neg else None
    out["said_supported"] = sum(verdicts)
    out["labelled_supported"] = sum(labels)
    return out


def evaluate_answers(index, client: ModelClient, questions: list[dict], k: int = 4, method: str = "hybrid",
                     max_tokens: int = 64, judge: ModelClient | None = None, calibrate: bool = True) -> dict:
    """Answer every question with a gold answer ("answers": [...] or "answer": str) from the index, and report
    correctness (with a Wilson interval), faithfulness (mean over answers that make claims, bootstrap interval)
    and the judge's reliability. judge: the model that judges faithfulness (default: the answering one)."""
    gold = [_gold(q) for q in questions]
    asked = [(q, g) for q, g in zip(questions, gold) if g]
    if not asked:
        raise LLMLabError("no question has a gold answer (\"answer\" or \"answers\"): answer correctness needs one")
    judge = judge or client
    answers = ask_many(index, client, [q["question"] for q, _ in asked], k=k, method=method, max_tokens=max_tokens,
                       seed=0)
    faith = faithfulness(judge, answers)
    records = []
    for (q, g), a, f in zip(asked, answers, faith):
        records.append({"question": q["question"], "gold": g, "answer": a.text, "correct": answer_correct(a.raw_text, g),
                        "faithfulness": f["faithfulness"], "claims": f["claims"], "cited": a.cited,
                        "retrieved_relevant": bool(set(q.get("relevant", [])) & {h.chunk.doc_id for h in a.passages})})
    n, right = len(records), sum(r["correct"] for r in records)
    scored = [r["faithfulness"] for r in records if r["faithfulness"] is not None]
    out = {"n": n, "k": k, "method": method, "accuracy": right / n, "accuracy_ci95": list(wilson_interval(right, n)),
           "answers_with_claims": len(scored), "faithfulness": float(np.mean(scored)) if scored else None,
           "faithfulness_ci95": _bootstrap_mean(scored), "records": records}
    if calibrate:
        out["judge"] = judge_reliability(judge)
    return out


def _gold(q: dict) -> list[str]:
    if isinstance(q.get("answers"), list):
        return [str(a) for a in q["answers"]]
    return [str(q["answer"])] if q.get("answer") is not None else []


def _bootstrap_mean(values: list[float], n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    if not values:
        return None
    rng = np.random.default_rng(seed)
    x = np.asarray(values, float)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n_boot)]
    return np.quantile(means, [0.025, 0.975]).tolist()


def format_answers(res: dict) -> str:
    lo, hi = res["accuracy_ci95"]
    lines = [f"answers ({res['method']}, k={res['k']}, n={res['n']}): correct {res['accuracy']:.3f} "
             f"(95% CI {lo:.3f}-{hi:.3f})"]
    if res["faithfulness"] is None:
        lines.append("  faithfulness: no answer made a claim")
    else:
        flo, fhi = res["faithfulness_ci95"]
        lines.append(f"  faithfulness {res['faithfulness']:.3f} (95% CI {flo:.3f}-{fhi:.3f}) over "
                     f"{res['answers_with_claims']} answers that make claims ({res['n'] - res['answers_with_claims']} "
                     "abstained)")
    j = res.get("judge")
    if j:
        if j.get("agreement") is None:
            lines.append("  judge: no calibration verdicts")
        else:
            alo, ahi = j["agreement_ci95"]
            lines.append(f"  judge reliability on {j['n']} hand-labelled claims: agreement {j['agreement']:.3f} "
                         f"(95% CI {alo:.3f}-{ahi:.3f}), kappa {j['kappa']:.2f}, AUROC "
                         f"{'n/a' if j['auroc'] is None else format(j['auroc'], '.3f')}; said supported "
                         f"{j['said_supported']} of {j['n']} ({j['labelled_supported']} are)")
    return "\n".join(lines)
