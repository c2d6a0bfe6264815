"""Built-in tasks that run offline: each YAML here names a generator below, which writes its JSONL from a seed."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmlab.data.bios import ATTRIBUTES, QUESTIONS, make_bios_world

HERE = Path(__file__).parent


def _world(n: int, seed: int):
    world = make_bios_world(max(n, 4), seed=seed, test_fraction=0.0)
    bios = list(world.biographies())
    return world, bios


def bios_qa(n: int, seed: int) -> list[dict]:
    """Open-book QA: a biography, then a question about it; the answer is a span of the biography."""
    world, bios = _world(n, seed)
    rng = random.Random(seed)
    out = []
    for i, (person, bio) in enumerate(zip(world.people[:n], bios)):
        attr = rng.choice(ATTRIBUTES)
        out.append({"id": i, "biography": bio, "question": QUESTIONS[attr].format(name=person.name),
                    "answer": getattr(person, attr)})
    return out


def bios_mc(n: int, seed: int) -> list[dict]:
    """Open-book multiple choice: the biography, a question, four candidates of the same kind."""
    world, bios = _world(max(n, 8), seed)
    rng = random.Random(seed)
    out = []
    for i, (person, bio) in enumerate(zip(world.people[:n], bios)):
        attr = rng.choice(["birth_city", "university", "major", "employer"])
        right = getattr(person, attr)
        pool = sorted({getattr(p, attr) for p in world.people} - {right})
        from llmlab.data import bios as b
        extra = {"birth_city": b.CITIES, "university": b.UNIVERSITIES, "major": b.MAJORS, "employer": sorted(b.EMPLOYERS)}
        pool = sorted(set(pool) | set(extra[attr]) - {right})
        choices = rng.sample(pool, 3) + [right]
        rng.shuffle(choices)
        out.append({"id": i, "biography": bio, "question": QUESTIONS[attr].format(name=person.name),
                    "choices": choices, "gold": choices.index(right)})
    return out


def arithmetic(n: int, seed: int) -> list[dict]:
    """Two- and three-operand integer arithmetic."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        expr = f"{a} {op} {b}"
        out.append({"id": i, "question": f"What is {expr}?", "answer": str(eval(expr))})
    return out


FORMAT_RULES = [
    ("lowercase", "Write your whole answer in lowercase letters only."),
    ("three_bullets", "Answer with exactly three bullet points, each line starting with '- '."),
    ("ends_done", "End your answer with the word DONE."),
    ("json_key", 'Answer with a JSON object that has the key "answer".'),
    ("max_words", "Answer in at most ten words."),
]
TOPICS = ["the moon", "bread", "rivers", "chess", "bicycles", "volcanoes", "libraries", "honey bees", "winter",
          "the ocean", "trains", "tea"]


def format_following(n: int, seed: int) -> list[dict]:
    """Instructions with a verifiable format rule; checked by `check_format`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rule, text = FORMAT_RULES[i % len(FORMAT_RULES)]
        topic = rng.choice(TOPICS)
        out.append({"id": i, "instruction": f"Tell me something about {topic}. {text}", "rule": rule})
    return out


def check_format(output: str, item: dict) -> float:
    """1.0 if `output` follows the item's format rule, else 0.0."""
    text = output.strip()
    rule = item["rule"]
    if rule == "lowercase":
        return float(bool(text) and text == text.lower() and any(c.isalpha() for c in text))
    if rule == "three_bullets":
        lines = [l for l in text.splitlines() if l.strip()]
        return float(len(lines) == 3 and all(l.lstrip().startswith("- ") for l in lines))
    if rule == "ends_done":
        return float(re.sub(r"[\s.!]+$", "", text).endswith("DONE"))
    if rule == "json_key":
        m = re.search(r"\{.*\}", text, re.S)
        try:
            return float(m is not None and "answer" in json.loads(m.group(0)))
        except ValueError:
            return 0.0
    if rule == "max_words":
        return float(0 < len(text.split()) <= 10)
    raise ValueError(f"unknown format rule {rule!r}")


def _summary(person) -> str:
    return (f"{person.name} was born on {person.birth_date} in {person.birth_city}, studied {person.major} at "
            f"{person.university} and worked for {person.employer} in {person.employer_city}.")


def bios_summary(n: int, seed: int) -> list[dict]:
    """Summarize a (shuffled, reworded) biography in one sentence; the reference is the canonical sentence."""
    world = make_bios_world(max(n, 4), seed=seed, test_fraction=0.0)
    bios = list(world.biographies(augment="permute"))
    return [{"id": i, "biography": bio, "summary": _summary(p)} for i, (p, bio) in enumerate(zip(world.people[:n], bios))]


def bios_facts(n: int, seed: int) -> list[dict]:
    """Facts as `key: value` lines to be written as one sentence (a tiny data-to-text 'translation')."""
    world = make_bios_world(max(n, 4), seed=seed, test_fraction=0.0)
    out = []
    for i, p in enumerate(world.people[:n]):
        facts = "\n".join(f"{a.replace('_', ' ')}: {getattr(p, a)}" for a in ("birth_date", "birth_city", "university",
                                                                                "major", "employer", "employer_city"))
        out.append({"id": i, "name": p.name, "facts": facts, "sentence": _summary(p)})
    return out


def bios_text(n: int, seed: int) -> str:
    """Plain text for perplexity: n biographies, one paragraph each."""
    world = make_bios_world(max(n, 1), seed=seed)
    return "\n\n".join(list(world.biographies())[:n]) + "\n"


GENERATORS = {"bios_qa": bios_qa, "bios_mc": bios_mc, "arithmetic": arithmetic, "format_following": format_following,
              "bios_summary": bios_summary, "bios_facts": bios_facts, "bios_text": bios_text}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))
