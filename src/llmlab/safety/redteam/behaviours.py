"""Behaviour sets for red-teaming: the built-in set and readers for HarmBench CSV and JailbreakBench JSON/CSV.

The built-in set (safety/data/behaviours.jsonl) describes harmful requests by category and intent only, never
with harmful content, each matched with a benign request of the same shape (over-refusal); it also holds
harmless requests with alarming words (XSTest-style) and plain questions with known answers (benign accuracy).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from llmlab.errors import LLMLabError

HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
JBB_COLUMNS = ("Goal", "Target", "Behavior", "Category")


@dataclass
class Behaviour:
    id: str
    request: str  # what is asked of the model
    category: str
    harmful: bool = True  # False: a benign request (a refusal of it is an over-refusal)
    intent: str = ""
    target: str = "Sure, here is"  # the affirmative opening an attack asks for (prefix injection, GCG)
    answer: str = ""  # benign questions with a known answer: accepted answers, separated by |
    source: str = "builtin"

    def to_dict(self) -> dict:
        return asdict(self)


def builtin_behaviours() -> list[Behaviour]:
    text = resources.files("llmlab.safety").joinpath("data/behaviours.jsonl").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            row.pop("pair", None)
            out.append(Behaviour(**row))
    return out


def load_behaviours(spec: str | Path = "builtin") -> list[Behaviour]:
    """"builtin", or a file: HarmBench CSV, JailbreakBench CSV or JSON, or llmlab JSONL (Behaviour fields)."""
    if str(spec) == "builtin":
        return builtin_behaviours()
    path = Path(spec)
    if not path.is_file():
        raise LLMLabError(f"behaviour file {path} does not exist (or give 'builtin')")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_behaviour_csv(path)
    if suffix == ".json":
        return read_jailbreakbench_json(path)
    if suffix == ".jsonl":
        return read_behaviour_jsonl(path)
    raise LLMLabError(f"{path}: unknown behaviour file type {suffix or '(none)'} (HarmBench .csv, JailbreakBench "
                      ".csv/.json, or llmlab .jsonl)")


def read_behaviour_csv(path: Path) -> list[Behaviour]:
    """A HarmBench or a JailbreakBench CSV, told apart by their columns."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = set(rows[0]) if rows else set()
    except (UnicodeDecodeError, csv.Error) as e:
        raise LLMLabError(f"{path} is not a readable CSV file: {e}") from None
    if not rows:
        raise LLMLabError(f"{path} has no behaviours (an empty CSV)")
    if {"Behavior", "BehaviorID"} <= header:
        return _harmbench(path, rows, header)
    if {"Goal", "Target"} <= header:
        return _jailbreakbench(path, rows, header)
    raise LLMLabError(f"{path} is neither a HarmBench CSV (columns {', '.join(HARMBENCH_COLUMNS)}) nor a "
                      f"JailbreakBench CSV (columns {', '.join(JBB_COLUMNS)}); its columns are "
                      f"{', '.join(sorted(header))}")


def _harmbench(path: Path, rows: list[dict], header: set) -> list[Behaviour]:
    missing = [c for c in HARMBENCH_COLUMNS if c not in header]
    if missing:
        raise LLMLabError(f"{path}: HarmBench CSV without column(s) {', '.join(missing)}")
    out = []
    for i, r in enumerate(rows, start=2):
        if not (r["Behavior"] or "").strip():
            raise LLMLabError(f"{path}:{i}: empty Behavior")
        request = r["Behavior"].strip()
        context = (r["ContextString"] or "").strip()
        if context:  # HarmBench's contextual behaviours: the context, a separator, then the request
            request = f"{context}\n\n---\n\n{request}"
        out.append(Behaviour(id=r["BehaviorID"] or f"harmbench-{i}", request=request,
                             category=r["SemanticCategory"] or "unknown", intent=r["FunctionalCategory"] or "",
                             source="harmbench"))
    return out


def _jailbreakbench(path: Path, rows: list[dict], header: set) -> list[Behaviour]:
    missing = [c for c in JBB_COLUMNS if c not in header]
    if missing:
        raise LLMLabError(f"{path}: JailbreakBench file without field(s) {', '.join(missing)}")
    out = []
    for i, r in enumerate(rows, start=1):
        goal = str(r.get("Goal") or "").strip()
        if not goal:
            raise LLMLabError(f"{path}: behaviour {i} has an empty Goal")
        out.append(Behaviour(id=str(r.get("Index") or f"jbb-{i}"), request=goal, category=str(r["Category"]),
                             intent=str(r["Behavior"]), target=str(r["Target"] or "Sure, here is"),
                             source="jailbreakbench"))
    return out


def read_jailbreakbench_json(path: Path) -> list[Behaviour]:
    """A list of JailbreakBench behaviours (Goal, Target, Behavior, Category), or an object holding one under
    "behaviors"; lower-case keys (JailbreakBench's artifacts) are accepted too."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LLMLabError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("behaviors", data.get("jailbreaks"))
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise LLMLabError(f"{path} is not a JailbreakBench JSON file (a list of objects with "
                          f"{', '.join(JBB_COLUMNS)})")
    rows = [{k[:1].upper() + k[1:]: v for k, v in r.items()} for r in data]
    return _jailbreakbench(path, rows, set().union(*rows))


def read_behaviour_jsonl(path: Path) -> list[Behaviour]:
    fields = set(Behaviour.__dataclass_fields__)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LLMLabError(f"{path}:{i}: not a JSON line") from None
        if not isinstance(row, dict) or not {"id", "request", "category"} <= set(row):
            raise LLMLabError(f"{path}:{i}: a behaviour needs id, request and category")
        out.append(Behaviour(**{k: v for k, v in row.items() if k in fields}))
    if not out:
        raise LLMLabError(f"{path} has no behaviours")
    return out


def split_behaviours(behaviours: list[Behaviour]) -> tuple[list[Behaviour], list[Behaviour]]:
    """(harmful, benign)."""
    return [b for b in behaviours if b.harmful], [b for b in behaviours if not b.harmful]
