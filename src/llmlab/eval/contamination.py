"""Contamination check: given the first half of an item, how much of the second half does the model reproduce?
A model that has seen the item in training continues it verbatim; one that has not only guesses."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmlab.client import GenParams, as_client
from llmlab.eval.metrics import fuzzy_ratio
from llmlab.io import atomic_write_text


def item_text(item: dict, fields=None) -> str:
    fields = fields or [k for k in ("text", "question", "biography", "instruction", "prompt", "answer") if k in item]
    return " ".join(str(item[f]) for f in fields if f in item)


def words(text: str) -> list[str]:
    """Lowercased words without punctuation: 'Monday,' and 'monday' are the same word here."""
    return re.findall(r"\w+", text.lower())


def exact_overlap(generated: str, reference: str) -> float:
    """The fraction of the reference's words reproduced exactly, in order, from its start."""
    g, r = words(generated), words(reference)
    n = 0
    for a, b in zip(g, r):
        if a != b:
            break
        n += 1
    return n / len(r) if r else 1.0


def check_contamination(backend, texts: list[str], threshold: float = 0.8, out_dir=None,
                        max_tokens: int | None = None) -> dict:
    """Per text: prompt with its first half (raw, no chat template), greedy continuation as long as the second
    half; exact (prefix) and fuzzy (word-level ratio) overlap; flagged when fuzzy >= threshold."""
    backend = as_client(backend)
    prompts, rests = [], []
    for t in texts:
        split = t.split()
        half = max(1, len(split) // 2)
        prompts.append(" ".join(split[:half]))
        rests.append(" ".join(split[half:]))
    out = []
    for p, rest in zip(prompts, rests):  # one at a time: each needs its own length
        n = max_tokens or max(8, backend.count_tokens(" " + rest) + 4)
        out.append(backend.generate([p], GenParams(max_tokens=n, temperature=0.0), chat=False)[0])
    records = []
    for i, (p, rest, g) in enumerate(zip(prompts, rests, out)):
        cont = " ".join(words(g.text)[:len(words(rest))])
        ex, fz = exact_overlap(cont, rest), fuzzy_ratio(cont, " ".join(words(rest)))
        records.append({"id": i, "prompt": p, "reference": rest, "output": g.text, "exact": ex, "fuzzy": fz,
                        "flagged": fz >= threshold})
    summary = {"n": len(records), "threshold": threshold,
               "flagged": sum(r["flagged"] for r in records),
               "flagged_rate": sum(r["flagged"] for r in records) / len(records) if records else None,
               "mean_exact": sum(r["exact"] for r in records) / len(records) if records else None,
               "mean_fuzzy": sum(r["fuzzy"] for r in records) / len(records) if records else None}
    if out_dir:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "contamination.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(out_dir / "contamination.json", json.dumps(summary, indent=2) + "\n")
    summary["records"] = records
    return summary
