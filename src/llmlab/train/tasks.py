"""Small task families with checkable answers, generated from a seed: SFT demonstrations, preference pairs
(correct vs. subtly wrong answers) and verifiable rewards, with no download. Also the bios QA conversations.

Each item is {"family", "messages": [user turn], "answer": the correct reply text}; check(reply, item) says
whether a model's reply is right, leniently (surrounding whitespace and a trailing period are ignored).
"""

from __future__ import annotations

import json
import random
import re

from llmlab.errors import LLMLabError

WORDS = """apple banana cherry strawberry mississippi bookkeeper balloon coffee committee letter success
butterfly grammar parallel necessary occurrence address possession tomorrow embarrass accommodate rhythm
assessment bottleneck cappuccino""".split()


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*" if max(a, b) < 20 else "+-")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"family": "arithmetic", "question": f"What is {a} {op} {b}? Reply with the number only.",
            "answer": str(value), "value": value}


def _count_letters(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return {"family": "count_letters",
            "question": f"How many times does the letter '{letter}' appear in the word '{word}'? Reply with the number only.",
            "answer": str(n), "value": n}


def _json_format(rng: random.Random) -> dict:
    key = rng.choice(["answer", "result", "value", "total"])
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return {"family": "json_format",
            "question": f'Answer in JSON with the key "{key}": what is {a} + {b}?',
            "answer": json.dumps({key: a + b}), "key": key, "value": a + b}


def _sort_list(rng: random.Random) -> dict:
    xs = rng.sample(range(1, 100), rng.randint(3, 5))
    return {"family": "sort_list",
            "question": f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}. "
                        "Reply with the sorted list only, comma-separated.",
            "answer": ", ".join(map(str, sorted(xs))), "value": sorted(xs)}


FAMILIES = {"arithmetic": _arithmetic, "count_letters": _count_letters, "json_format": _json_format,
            "sort_list": _sort_list}


def make_tasks(family: str, n: int, seed: int = 0) -> list[dict]:
    """n items of one family ("all": round-robin over every family), a pure function of (family, n, seed)."""
    if family != "all" and family not in FAMILIES:
        raise LLMLabError(f"unknown task family {family!r} (choose from all, {', '.join(FAMILIES)})")
    rng = random.Random(f"{family}/{seed}")
    names = list(FAMILIES) if family == "all" else [family]
    items = []
    for i in range(n):
        item = FAMILIES[names[i % len(names)]](rng)
        item["messages"] = [{"role": "user", "content": item.pop("question")}]
        items.append(item)
    return items


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip()


def check(reply: str, item: dict) -> bool:
    """Is the reply correct? JSON replies must parse and hold exactly the key asked for."""
    if item["family"] == "json_format":
        try:
            obj = json.loads(reply.strip())
        except json.JSONDecodeError:
            return False
        return isinstance(obj, dict) and list(obj) == [item["key"]] and obj[item["key"]] == item["value"]
    if item["family"] == "sort_list":
        return [s.strip() for s in normalise(reply).split(",")] == [str(v) for v in item["value"]]
    return normalise(reply) == item["answer"]


def reward(reply: str, item: dict) -> float:
    """The verifiable reward: 1 for a correct reply, 0 otherwise."""
    return float(check(reply, item))


def wrong_answer(item: dict, rng: random.Random) -> str:
    """A subtly wrong reply: off by one, two numbers swapped, the wrong JSON key."""
    family = item["family"]
    if family in ("arithmetic", "count_letters"):
        return str(item["value"] + rng.choice([-1, 1]))
    if family == "json_format":
        if rng.random() < 0.5:
            wrong_key = "answer" if item["key"] != "answer" else "result"
            return json.dumps({wrong_key: item["value"]})
        return json.dumps({item["key"]: item["value"] + rng.choice([-1, 1])})
    xs = list(item["value"])
    i = rng.randrange(len(xs) - 1)
    xs[i], xs[i + 1] = xs[i + 1], xs[i]
    return ", ".join(map(str, xs))


def sft_conversations(items: list[dict]) -> list[dict]:
    """JSONL records {"messages": [user, assistant]} demonstrating the correct answers."""
    return [{"messages": item["messages"] + [{"role": "assistant", "content": item["answer"]}]} for item in items]


def preference_pairs(items: list[dict], seed: int = 0) -> list[dict]:
    """JSONL records {"messages", "chosen", "rejected"}: the correct answer against a subtly wrong one."""
    rng = random.Random(f"pairs/{seed}")
    return [{"messages": item["messages"], "chosen": item["answer"], "rejected": wrong_answer(item, rng)}
            for item in items]


# ---- bios QA -----------------------------------------------------------------------------------------------


def bios_qa_items(world, split: str) -> list[dict]:
    """QA of the bios world as task items (family "bios_qa"), checked by exact match of the attribute."""
    return [{"family": "bios_qa", "messages": [{"role": "user", "content": qa["question"]}], "answer": qa["answer"],
             "person": qa["person"], "attribute": qa["attribute"]} for qa in world.qa(split)]


def extract_number(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None
