"""Questions with checkable answers for test-time reasoning, and per-task answer extraction.

An item is {"task", "question" (no answer-format instruction: each strategy adds its own), "answer" (canonical
text), "kind" ("number" | "list" | "text" | "bios:<attribute>"), "solution" (worked steps, when known)}.
extract_answer(text, item) reads a model's reply into the same canonical form, so answers can be voted on
and compared with `==`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmlab.errors import LLMLabError

# ---- multi-step arithmetic -----------------------------------------------------------------------------------


def arithmetic_item(rng: random.Random, ops: int = 2, low: int = 1, high: int = 9) -> dict:
    """a op b op c ... evaluated left to right (the question says so: no precedence to get wrong), with the
    worked steps as the solution."""
    value = rng.randint(low, high)
    text, steps = str(value), []
    for _ in range(ops):
        op, x = rng.choice("+-*" if high <= 12 else "+-"), rng.randint(low, high)
        new = {"+": value + x, "-": value - x, "*": value * x}[op]
        steps.append(f"{value} {op} {x} = {new}.")
        text, value = f"{text} {op} {x}", new
    question = f"Compute {text}, working from left to right." if ops > 1 else f"What is {text}?"
    return {"question": question, "answer": str(value), "kind": "number",
            "solution": steps + [f"The answer is {value}."]}


# ---- GSM8K-like word problems --------------------------------------------------------------------------------

NAMES = ["Tom", "Anna", "Ravi", "Mia", "Lena", "Omar", "Sara", "Ken", "Eva", "Luis"]
THINGS = ["apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "books"]


def _buy_and_give(rng, name, thing):
    a, bags, per, give = rng.randint(2, 20), rng.randint(2, 5), rng.randint(2, 6), rng.randint(1, 5)
    total = a + bags * per
    return (f"{name} has {a} {thing}. {name} buys {bags} bags with {per} {thing} in each bag, then gives {give} "
            f"{thing} to a friend. How many {thing} does {name} have now?",
            [f"The bags hold {bags} * {per} = {bags * per} {thing}.", f"{a} + {bags * per} = {total}.",
             f"After giving {give} away: {total} - {give} = {total - give}."], total - give)


def _share(rng, name, thing):
    friends, each, left = rng.randint(2, 6), rng.randint(2, 8), rng.randint(0, 5)
    start = friends * each + left
    return (f"{name} has {start} {thing} and shares them equally among {friends} friends, keeping the "
            f"{left} left over. How many {thing} does each friend get?",
            [f"{start} - {left} = {start - left} {thing} are shared.",
             f"{start - left} / {friends} = {each}."], each)


def _earn_and_spend(rng, name, _thing):
    hours, rate, spend = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 15)
    earned = hours * rate
    return (f"{name} works {hours} hours and earns {rate} dollars per hour, then spends {spend} dollars on "
            f"lunch. How many dollars does {name} have left?",
            [f"{name} earns {hours} * {rate} = {earned} dollars.", f"{earned} - {spend} = {earned - spend}."],
            earned - spend)


def _rows(rng, name, thing):
    rows, per, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    return (f"{name} puts {thing} in {rows} rows of {per}, and then adds {extra} more. How many {thing} are "
            f"there in total?",
            [f"{rows} * {per} = {rows * per}.", f"{rows * per} + {extra} = {rows * per + extra}."],
            rows * per + extra)


WORD_PROBLEMS = [_buy_and_give, _share, _earn_and_spend, _rows]


def word_problem_item(rng: random.Random) -> dict:
    question, steps, value = rng.choice(WORD_PROBLEMS)(rng, rng.choice(NAMES), rng.choice(THINGS))
    return {"question": question, "answer": str(value), "kind": "number",
            "solution": steps + [f"The answer is {value}."]}


# ---- the verifiable families RL uses (llmlab.train.tasks) ----------------------------------------------------

FORMAT_INSTRUCTION = re.compile(r"\s*Reply with .*$")


def _train_family(family: str, kind: str):
    def make(rng: random.Random) -> dict:
        from llmlab.train.tasks import FAMILIES
        item = FAMILIES[family](rng)
        return {"question": FORMAT_INSTRUCTION.sub("", item["question"]), "answer": item["answer"], "kind": kind}
    return make


# ---- registry ------------------------------------------------------------------------------------------------

GENERATORS = {
    "arithmetic": lambda rng: arithmetic_item(rng, ops=2),
    "arithmetic1": lambda rng: arithmetic_item(rng, ops=1),
    "arithmetic3": lambda rng: arithmetic_item(rng, ops=3, low=2, high=20),
    "word_problems": word_problem_item,
    "add": _train_family("arithmetic", "number"),
    "count_letters": _train_family("count_letters", "number"),
    "sort_list": _train_family("sort_list", "list"),
}
TASKS = list(GENERATORS) + ["bios", "PATH.jsonl", "PATH.yaml (an lm-eval task)"]


def make_items(task: str, n: int, seed: int = 0) -> list[dict]:
    """n questions of a task (a pure function of task, n and seed), or the first n of a JSONL file or of an
    lm-eval task YAML's test split (PATH.yaml, or PATH.yaml#FILTER to pick its answer filter)."""
    if n < 1:
        raise LLMLabError(f"the number of questions must be at least 1, got {n}")
    if task.partition("#")[0].endswith((".yaml", ".yml")):
        from llmlab.reason.lm_eval_task import load_task
        return load_task(task, n)
    if task.endswith(".jsonl"):
        return load_jsonl(task)[:n]
    if task == "bios":
        return bios_items(n, seed)
    if task not in GENERATORS:
        raise LLMLabError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    rng = random.Random(f"reason/{task}/{seed}")
    return [{"task": task, **GENERATORS[task](rng)} for _ in range(n)]


def bios_items(n: int, seed: int = 0, people: int = 200) -> list[dict]:
    """Questions about the synthetic bios world's people (llmlab.data.bios): only a model trained on that
    world can know them (e.g. `llmlab speedrun`'s); the answer is read from the reply against the closed set of
    values the world uses, so votes compare like with like."""
    from llmlab.data.bios import make_bios_world
    qa = make_bios_world(max(people, n), seed).qa("all")
    rng = random.Random(f"reason/bios/{seed}")
    return [{"task": "bios", "question": q["question"], "answer": q["answer"], "kind": f"bios:{q['attribute']}"}
            for q in rng.sample(qa, min(n, len(qa)))]


def load_jsonl(path: str | Path) -> list[dict]:
    """Items from a JSONL file of {"question", "answer"} records (a numeric answer is compared as a number)."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such task file: {path}")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise LLMLabError(f"{path}:{i}: not valid JSON") from None
        if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
            raise LLMLabError(f"{path}:{i}: a record needs \"question\" and \"answer\"")
        answer = str(rec["answer"]).strip()
        kind = "number" if normalise_number(answer) is not None else "text"
        canonical = normalise_number(answer) if kind == "number" else normalise_text(answer)
        items.append({"task": path.stem, "question": str(rec["question"]), "answer": canonical, "kind": kind})
    if not items:
        raise LLMLabError(f"{path} holds no questions")
    return items


# ---- answer extraction -----------------------------------------------------------------------------------------

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# where a reply states its final answer, most explicit first; the last such statement wins
FINAL_MARKERS = [r"answer is[:\s]*", r"####\s*", r"\\boxed\{", r"answer:\s*"]
# a line that states the final answer (it ends a chain of thought in tree search, and is checked, not rolled out,
# by Math-Shepherd labels)
FINAL = re.compile(r"answer is|####|\\boxed", re.IGNORECASE)


def normalise_number(text: str) -> str | None:
    """"1,234" -> "1234", "7.0" -> "7", "3.50" -> "3.5"; None when the text is not a number."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def normalise_text(text: str) -> str:
    """Lower case, no punctuation, articles or surrounding spaces (as SQuAD's exact match)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _final_part(text: str) -> str:
    """The text after the last explicit "the answer is" / "####" / "\\boxed{" / "Answer:" (else all of it)."""
    for marker in FINAL_MARKERS:
        found = list(re.finditer(marker, text, flags=re.IGNORECASE))
        if found:
            return text[found[-1].end():]
    return text


def extract_number(text: str) -> str | None:
    """The final answer of a reply as a canonical number: the first number on the line of the last explicit
    answer statement, else the last number written (as Wang et al. read GSM8K samples)."""
    part = _final_part(text)
    if part is not text:
        m = re.search(NUMBER, part.split("\n", 1)[0])
        if m:
            return normalise_number(m.group())
    numbers = re.findall(NUMBER, text)
    return normalise_number(numbers[-1]) if numbers else None


def extract_list(text: str) -> str | None:
    """A list of numbers: those after the last answer statement, else those on the last line that has two or more."""
    part = _final_part(text)
    lines = [part] if part is not text else reversed(text.splitlines())
    for line in lines:
        numbers = [normalise_number(x) for x in re.findall(r"-?\d+(?:\.\d+)?", line)]
        if len(numbers) >= 2 or (numbers and part is not text):
            return ", ".join(numbers)
    return None


def extract_bios(text: str, attribute: str) -> str | None:
    """The value of a bios attribute the reply names (the last one named, after the answer statement if any)."""
    from llmlab.data import bios
    part = _final_part(text)
    if attribute == "birth_date":
        months = "|".join(bios.calendar.month_name[1:])
        found = re.findall(rf"(?:{months}) \d{{1,2}}, \d{{4}}", part)
        return found[-1] if found else None
    values = {"birth_city": bios.CITIES, "university": bios.UNIVERSITIES, "major": bios.MAJORS,
              "employer": list(bios.EMPLOYERS), "employer_city": list(bios.EMPLOYERS.values())}[attribute]
    lower = part.lower()
    found = [(lower.rfind(v.lower()), v) for v in set(values) if v.lower() in lower]
    return max(found)[1] if found else None


def extract_answer(text: str, item: dict) -> str | None:
    """The reply's final answer in the item's canonical form, or None when it states none."""
    kind = item["kind"]
    if kind == "lm-eval":
        from llmlab.reason.lm_eval_task import extract
        return extract(text, item)
    if kind == "number":
        return extract_number(text)
    if kind == "list":
        return extract_list(text)
    if kind.startswith("bios:"):
        return extract_bios(text, kind.split(":", 1)[1])
    part = _final_part(text).strip().splitlines()
    return normalise_text(part[0]) if part and part[0].strip() else None


def is_correct(answer: str | None, item: dict) -> bool:
    return answer is not None and answer == item["answer"]
