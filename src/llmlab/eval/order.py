"""Option-order sensitivity: rerun a multiple-choice task with its options permuted (lettered A, B, C...) and
report the accuracy spread and how often the chosen letter stays put while the content moves."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import numpy as np

from llmlab.client import as_client
from llmlab.io import atomic_write_text


def lettered_prompt(question_text: str, options: list[str]) -> str:
    lines = [question_text.rstrip()]
    lines += [f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def cyclic_permutations(k: int) -> list[list[int]]:
    """k rotations of the options: every option visits every position once."""
    return [[(i + s) % k for i in range(k)] for s in range(k)]


def order_sensitivity(backend, items: list[dict], question_field="question", choices_field="choices",
                      gold_field="gold", context_field: str | None = None, out_dir=None) -> dict:
    """Items {question, choices, gold}; each is asked under every rotation of its options, answered by the
    log-likelihood of the letters " A", " B", ..."""
    backend = as_client(backend)
    pairs, meta = [], []
    for it in items:
        opts = [str(c) for c in it[choices_field]]
        k = len(opts)
        q = (str(it[context_field]) + "\n" if context_field else "") + str(it[question_field])
        for r, perm in enumerate(cyclic_permutations(k)):
            shown = [opts[p] for p in perm]
            prompt = lettered_prompt(q, shown)
            meta.append((it, r, perm, len(pairs), k))
            pairs += [(prompt, f" {string.ascii_uppercase[i]}") for i in range(k)]
    lls = backend.loglikelihood(pairs)
    records = []
    for it, r, perm, start, k in meta:
        ll = [x.logprob for x in lls[start:start + k]]
        letter = int(np.argmax(ll))
        chosen = perm[letter]  # index of the chosen option in the original order
        records.append({"id": it.get("id"), "rotation": r, "letter": string.ascii_uppercase[letter],
                        "chosen": chosen, "correct": float(chosen == int(it[gold_field])), "logliks": ll})
    rotations = sorted({r["rotation"] for r in records})
    accs = [float(np.mean([r["correct"] for r in records if r["rotation"] == k])) for k in rotations]
    by_item: dict = {}
    for r in records:
        by_item.setdefault(json.dumps(r["id"]), []).append(r)
    same_letter = float(np.mean([len({r["letter"] for r in rs}) == 1 for rs in by_item.values()]))
    same_content = float(np.mean([len({r["chosen"] for r in rs}) == 1 for rs in by_item.values()]))
    summary = {"n_items": len(by_item), "rotations": len(rotations), "accuracy_per_rotation": accs,
               "accuracy_mean": float(np.mean(accs)), "accuracy_spread": max(accs) - min(accs),
               "accuracy_std": float(np.std(accs)),
               "same_letter_rate": same_letter,  # the letter followed the position, whatever moved there
               "same_content_rate": same_content,  # the answer followed the content (order-robust)
               "letter_counts": dict(sorted(Counter(r["letter"] for r in records).items()))}
    if out_dir:
        out = Path(out_dir)
        atomic_write_text(out / "order_items.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(out / "order.json", json.dumps(summary, indent=2) + "\n")
    summary["records"] = records
    return summary
