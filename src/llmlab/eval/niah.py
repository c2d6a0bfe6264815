"""Needle in a haystack: a fact inserted at several depths of filler text of several lengths; can the model
retrieve it? Scored by exact and fuzzy match of the needle's value (no judge needed), drawn as a heatmap."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.client import GenParams, as_client
from llmlab.eval.metrics import fuzzy_contains, normalize_answer
from llmlab.io import atomic_write_text

FILLER = [
    "The grass is green and the sky is blue.", "The sun rises in the east and sets in the west.",
    "Rivers flow downhill toward the sea.", "Many birds fly south when the winter comes.",
    "Bread is made from flour, water, salt and yeast.", "A week has seven days and a year has twelve months.",
    "Trains run on rails between the towns.", "The library opens at nine in the morning.",
    "Mountains are colder at the top than at the bottom.", "Cats often sleep for most of the day.",
    "The old bridge crosses the river near the mill.", "Farmers harvest wheat at the end of the summer.",
]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Nairobi", "Lima", "Perth", "Tunis", "Riga", "Dakar"]
WORDS = ["amber", "falcon", "granite", "harbor", "lantern", "meadow", "orchid", "pepper", "quartz", "willow"]


def make_needle(seed: int, number: bool = False) -> tuple[str, str, str]:
    """(needle sentence, question, expected answer). number=True: the code is the number alone (same seed, same
    city and digits), which a small model retrieves more often than a word-number code."""
    rng = random.Random(seed)
    word, digits = rng.choice(WORDS), rng.randint(100, 999)
    value = str(digits) if number else f"{word}-{digits}"
    city = rng.choice(CITIES)
    return (f"The secret code for the trip to {city} is {value}.",
            f"What is the secret code for the trip to {city}?", value)


def haystack(tokenizer_count, n_tokens: int, needle: str, depth: float, seed: int = 0) -> str:
    """Filler sentences adding up to about n_tokens, with the needle placed at `depth` (0 start, 1 end)
    on a sentence boundary."""
    rng = random.Random(seed)
    sentences: list[str] = []
    total = tokenizer_count(needle)
    while total < n_tokens:
        s = rng.choice(FILLER)
        sentences.append(s)
        total += tokenizer_count(" " + s)
    at = round(depth * len(sentences))
    sentences.insert(at, needle)
    return " ".join(sentences)


def run_niah(backend, lengths=(256, 512, 1024), depths=(0.0, 0.25, 0.5, 0.75, 1.0), out_dir=None,
             max_tokens: int = 24, seed: int = 0, first_needle: int = 0, number_needles: bool = False) -> dict:
    """Score every (depth, length) cell; writes items.jsonl, summary.json and heatmap.png when out_dir is given.
    Cell (depth i, length j) gets needle number first_needle + 1000 seed + 100 j + i (make_needle)."""
    backend = as_client(backend)
    if not lengths or not depths:
        raise LLMLabError("needle in a haystack needs at least one length and one depth")
    for d in depths:
        if not 0 <= d <= 1:
            raise LLMLabError(f"needle depth must be in [0, 1], got {d}")
    prompts, cells = [], []
    for j, n in enumerate(lengths):
        for i, d in enumerate(depths):
            needle, question, answer = make_needle(first_needle + seed * 1000 + j * 100 + i, number_needles)
            context = haystack(backend.count_tokens, n, needle, d, seed=seed + j)
            prompts.append(f"{context}\n\nBased only on the text above, answer the question. {question} "
                           f"Reply with the code only.")
            cells.append({"depth": d, "length": n, "needle": needle, "question": question, "answer": answer})
    t0 = time.perf_counter()
    gens = backend.generate(prompts, GenParams(max_tokens=max_tokens, temperature=0.0))
    seconds = time.perf_counter() - t0
    records = []
    for cell, prompt, g in zip(cells, prompts, gens):
        exact = float(normalize_answer(cell["answer"]) in normalize_answer(g.text))
        # fuzzy: partial credit for a near miss, e.g. the right word with a wrong digit
        fuzzy = max(exact, _char_fuzzy(g.text, cell["answer"]))
        records.append({**cell, "prompt": prompt, "output": g.text, "exact": exact, "fuzzy": fuzzy,
                        "tokens": g.prompt_tokens + g.completion_tokens})
    grid = {k: [[next(r[k] for r in records if r["depth"] == d and r["length"] == n) for n in lengths]
                for d in depths] for k in ("exact", "fuzzy")}
    summary = {"lengths": list(lengths), "depths": list(depths), "exact": grid["exact"], "fuzzy": grid["fuzzy"],
               "exact_mean": sum(r["exact"] for r in records) / len(records),
               "fuzzy_mean": sum(r["fuzzy"] for r in records) / len(records),
               "tokens": sum(r["tokens"] for r in records), "seconds": seconds, "model": backend.name}
    if out_dir:
        out = Path(out_dir)
        atomic_write_text(out / "items.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        from llmlab.eval.report import plot_heatmap
        plot_heatmap(grid["fuzzy"], depths, lengths, out / "heatmap.png")
    summary["records"] = records
    return summary


# ---- passkey retrieval (Mohtashami & Jaggi 2023; the test of the Self-Extend paper) -------------------------
# Raw text, no chat template: a short header, filler with the needle at a depth, and a prompt the key completes.
# The key is a number from 10 to 99 (one token for a tokenizer trained with them): a small model trained on this
# format retrieves by one attention head, which is what context extension has to keep working.

PASSKEY_HEADER = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
PASSKEY_QUESTION = " What is the pass key? The pass key is "


def passkey_prompt(tokenizer_count, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """(prompt of about n_tokens filler tokens plus header and question, the key it should be completed with)."""
    key = str(random.Random(seed).randint(10, 99))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return f"{PASSKEY_HEADER} {haystack(tokenizer_count, n_tokens, needle, depth, seed)}{PASSKEY_QUESTION}", key


def run_passkey(llm, n_tokens: int, depths, samples: int, seed: int = 0) -> list[float]:
    """Exact retrieval per depth over `samples` keys (greedy, one raw completion each) for an llmlab LLM."""
    count = lambda text: len(llm.tokenizer.encode(text))  # noqa: E731
    cells = [(d, *passkey_prompt(count, n_tokens, d, seed * 100_000 + 1000 * i + s))
             for i, d in enumerate(depths) for s in range(samples)]
    outputs = llm.generate([prompt for _, prompt, _ in cells], raw=True, max_new_tokens=2, temperature=0.0)
    hits = [out.strip().startswith(key) for (_, _, key), out in zip(cells, outputs)]
    return [sum(hits[i * samples:(i + 1) * samples]) / samples for i in range(len(depths))]


def _char_fuzzy(text: str, answer: str) -> float:
    """Best character-level similarity of `answer` to any equally long span of `text`."""
    import difflib
    t, a = text.lower(), answer.lower()
    if not t:
        return 0.0
    best = 0.0
    for start in range(max(1, len(t) - len(a) + 1)):
        best = max(best, difflib.SequenceMatcher(None, t[start:start + len(a)], a).ratio())
    return best


def format_niah(summary: dict) -> str:
    lengths = summary["lengths"]
    lines = ["needle in a haystack (fuzzy score; exact in brackets)",
             "depth  " + "".join(f"{n:>12}" for n in lengths)]
    for i, d in enumerate(summary["depths"]):
        lines.append(f"{d:5.0%}  " + "".join(f"{summary['fuzzy'][i][j]:6.2f} ({summary['exact'][i][j]:.0f})  "
                                            for j in range(len(lengths))))
    lines.append(f"mean exact {summary['exact_mean']:.2f}, fuzzy {summary['fuzzy_mean']:.2f}; "
                 f"{summary['tokens']} tokens in {summary['seconds']:.1f}s")
    return "\n".join(lines)


__all__ = ["run_niah", "haystack", "make_needle", "format_niah", "fuzzy_contains", "passkey_prompt", "run_passkey"]
