"""The agent task suite: tasks with checkable end states (compute with the calculator or Python, write a file, look
up facts in an index, two-hop questions over the bios world), run by any agent style, reported as a success rate
with a Wilson interval, steps and tokens, and why each run ended."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from llmlab.agent.loop import AgentResult, run_agent
from llmlab.agent.tools import builtin_tools
from llmlab.errors import LLMLabError

SUITES = ("builtin",)


@dataclass
class AgentTask:
    name: str
    kind: str  # "compute" | "file" | "lookup" | "multihop"
    prompt: str
    tools: list[str]
    expected: str
    check: Callable[[AgentResult, Path], bool]  # (the run, its workspace) -> success


def answer_has(expected: str) -> Callable[[AgentResult, Path], bool]:
    """The answer contains the expected text (case-insensitive); a city is matched without its state."""
    want = expected.split(",")[0].strip().lower()
    return lambda r, _ws: r.answer is not None and want in r.answer.lower()


def answer_number(expected: float) -> Callable[[AgentResult, Path], bool]:
    def check(r: AgentResult, _ws: Path) -> bool:
        numbers = re.findall(r"-?\d+(?:\.\d+)?", (r.answer or "").replace(",", ""))
        return any(abs(float(x) - expected) < 1e-6 for x in numbers)
    return check


def file_holds(name: str, text: str) -> Callable[[AgentResult, Path], bool]:
    return lambda _r, ws: (ws / name).is_file() and text.lower() in (ws / name).read_text().lower()


def bios_corpus(directory: Path, n_people: int = 12, seed: int = 0) -> tuple[list, dict[str, object]]:
    """Biographies of a small bios world and one page per employer naming its chief executive (another person
    of the world), written as JSONL under `directory`. Returns (people, {company: chief executive})."""
    from llmlab.data.bios import EMPLOYERS, make_bios_world
    world = make_bios_world(n_people, seed)
    people = world.people
    companies = sorted({p.employer for p in people})
    ceos = {c: people[(i * 5 + 3) % len(people)] for i, c in enumerate(companies)}
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": p.name, "text": bio} for p, bio in zip(people, world.biographies())]
    rows += [{"id": c, "text": f"{c} is a company headquartered in {EMPLOYERS[c]}. The chief executive of {c} is "
                               f"{ceo.name}."} for c, ceo in ceos.items()]
    (directory / "bios.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return people, ceos


def builtin_suite(people: list, ceos: dict) -> list[AgentTask]:
    """Twelve tasks: four compute, one file, four lookups, three two-hop questions."""
    tasks = [
        AgentTask("calc-mul", "compute", "What is 37 * 43? Use calculate.", ["calculate"], "1591",
                  answer_number(1591)),
        AgentTask("calc-expr", "compute", "What is (1234 + 4321) / 5? Use calculate.", ["calculate"], "1111",
                  answer_number(1111)),
        AgentTask("py-squares", "compute", "Use run_python to compute the sum of the squares of the integers from "
                  "1 to 20.", ["run_python"], "2870", answer_number(2870)),
        AgentTask("py-primes", "compute", "Use run_python to count the prime numbers below 100.", ["run_python"],
                  "25", answer_number(25)),
        AgentTask("file-write", "file", "Write the text 'hello agent' to the file greeting.txt with write_file, "
                  "then give the final answer done.", ["write_file"], "greeting.txt holds 'hello agent'",
                  file_holds("greeting.txt", "hello agent")),
    ]
    for i, p in enumerate(people[:2], 1):
        tasks.append(AgentTask(f"lookup-university-{i}", "lookup",
                               f"Which university did {p.name} study at? Use search.", ["search"], p.university,
                               answer_has(p.university)))
        tasks.append(AgentTask(f"lookup-birthcity-{i}", "lookup",
                               f"In which city was {p.name} born? Use search.", ["search"], p.birth_city,
                               answer_has(p.birth_city)))
    for i, (company, ceo) in enumerate(list(ceos.items())[:3], 1):
        tasks.append(AgentTask(f"multihop-{i}", "multihop",
                               f"In which city was the chief executive of {company} born? Use search to find who "
                               "the chief executive is, then search for that person.", ["search"], ceo.birth_city,
                               answer_has(ceo.birth_city)))
    return tasks


def prepare_suite(workdir: str | Path, name: str = "builtin", only: list[str] | None = None):
    """(tasks, index directory) for suite `name`, its documents and index built under `workdir`."""
    from llmlab.rag.index import build_index
    if name not in SUITES:
        raise LLMLabError(f"unknown agent suite {name!r} (choose from {', '.join(SUITES)})")
    workdir = Path(workdir)
    people, ceos = bios_corpus(workdir / "docs")
    tasks = builtin_suite(people, ceos)
    if only:
        known = {t.name for t in tasks}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise LLMLabError(f"unknown task {unknown[0]!r} in suite {name} (tasks: {', '.join(sorted(known))})")
        tasks = [t for t in tasks if t.name in only]
    index = workdir / "index"
    if any("search" in t.tools for t in tasks):
        build_index([str(workdir / "docs")], index)
    return tasks, index


def run_suite(client, tasks: list[AgentTask], workdir: str | Path, index: str | Path | None = None,
              style: str = "tools", plan: bool = False, memory=None, trace_dir: str | Path | None = None,
              **budget) -> dict:
    """Run every task in a fresh workspace; the report has one row per task and the totals.
    budget: max_steps, max_tokens, step_tokens (and the plan's options with plan=True)."""
    workdir = Path(workdir)
    rows = []
    for task in tasks:
        ws = workdir / "workspaces" / task.name
        ws.mkdir(parents=True, exist_ok=True)
        tools = builtin_tools(ws, task.tools, index=index if "search" in task.tools else None)
        trace = Path(trace_dir) / f"{task.name}.jsonl" if trace_dir else None
        fresh = replace(memory, summary="", folded=0, notes=[]) if memory is not None else None
        t0 = time.perf_counter()
        if plan:
            from llmlab.agent.plan import run_planned
            r = run_planned(client, task.prompt, tools, style=style, memory=fresh, trace_path=trace, **budget)
        else:
            r = run_agent(client, task.prompt, tools, style=style, memory=fresh, trace_path=trace, **budget)
        rows.append({"task": task.name, "kind": task.kind, "ok": bool(task.check(r, ws)), "reason": r.reason,
                     "steps": r.steps, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                     "answer": r.answer, "expected": task.expected, "seconds": round(time.perf_counter() - t0, 2)})
    return summarize(rows, style=("plan+" if plan else "") + style, model=getattr(client, "name", "?"))


def summarize(rows: list[dict], **about) -> dict:
    from llmlab.safety.stats import wilson_interval
    if not rows:
        raise LLMLabError("no agent tasks were run")
    n, ok = len(rows), sum(r["ok"] for r in rows)
    lo, hi = wilson_interval(ok, n)
    return {**about, "tasks": n, "succeeded": ok, "success_rate": ok / n, "wilson95": [lo, hi],
            "mean_steps": sum(r["steps"] for r in rows) / n,
            "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / n,
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / n,
            "reasons": dict(Counter(r["reason"] for r in rows)),
            "by_kind": {k: f"{sum(r['ok'] for r in rows if r['kind'] == k)}/{sum(r['kind'] == k for r in rows)}"
                        for k in dict.fromkeys(r["kind"] for r in rows)},
            "rows": rows}


def format_report(report: dict) -> str:
    lines = [f"{'task':32} {'kind':9} {'ok':3} {'reason':13} {'steps':>5} {'tokens':>7}  answer"]
    for r in report["rows"]:
        answer = (r["answer"] or "")[:40].replace("\n", " ")
        lines.append(f"{r['task']:32} {r['kind']:9} {'yes' if r['ok'] else 'no':3} {r['reason']:13} "
                     f"{r['steps']:>5} {r['completion_tokens']:>7}  {answer!r} (expected {r['expected']!r})")
    lo, hi = report["wilson95"]
    lines.append(f"success {report['succeeded']}/{report['tasks']} = {report['success_rate']:.0%} "
                 f"(Wilson 95% {lo:.0%}-{hi:.0%}); by kind {report['by_kind']}; mean {report['mean_steps']:.1f} "
                 f"steps, {report['mean_completion_tokens']:.0f} generated + {report['mean_prompt_tokens']:.0f} "
                 f"prompt tokens per task; ended by {report['reasons']}  ({report['style']}, {report['model']})")
    return "\n".join(lines)
