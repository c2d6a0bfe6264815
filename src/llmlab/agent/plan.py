"""Plan-then-execute: the model writes a numbered plan, each step runs as a short agent run (tools or ReAct), and
a step that fails (ends without an answer) makes the model replan what remains, within one shared budget."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from llmlab.agent.loop import AgentResult, Trace, run_agent
from llmlab.agent.tools import as_tools
from llmlab.client.base import GenParams
from llmlab.errors import LLMLabError

PLAN = ("Write a short numbered plan to solve the task below with these tools: {tools}. At most {n} steps, one "
        "line each, the last one giving the answer. Write only the plan.\n\nTask: {task}")
REPLAN = ("{plan}\n\nStep {i} ({step}) failed: {why}.\nResults so far:\n{done}\n\nWrite a new numbered plan for what "
          "remains of the task (at most {n} steps, one line each). Write only the plan.\n\nTask: {task}")
ITEM = re.compile(r"^\s*(?:\*\*)?(?:step\s*)?\d+\s*[.):]\s*(?:\*\*)?\s*(.+?)\s*$", re.I)


def parse_plan(text: str, max_items: int) -> list[str]:
    """The plan's steps from numbered lines ("1. ...", "Step 2: ..."); unnumbered text is one step."""
    items = [m.group(1) for m in map(ITEM.match, text.splitlines()) if m and m.group(1)]
    if not items and text.strip():
        items = [" ".join(text.split())]
    return list(dict.fromkeys(items))[:max_items]


def _numbered(items: list[str]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(items, 1))


def _ask_plan(client, prompt: str, result: AgentResult, max_items: int, plan_tokens: int) -> list[str]:
    g = client.generate([prompt], GenParams(max_tokens=plan_tokens, temperature=0))[0]
    result.spend(g.prompt_tokens, g.completion_tokens)
    return parse_plan(g.text, max_items)


def run_planned(client, task: str, tools: list, max_steps: int = 8, max_tokens: int = 4000, step_tokens: int = 128,
                plan_items: int = 4, plan_tokens: int = 96, steps_per_item: int = 3, max_replans: int = 1,
                style: str = "tools", memory=None, system: str | None = None,
                trace_path: str | Path | None = None) -> AgentResult:
    """Plan, then run each step of the plan as its own agent run; max_steps and max_tokens bound everything
    (planning included). The answer is the last step's."""
    if min(max_steps, max_tokens, plan_items, plan_tokens, steps_per_item) < 1 or max_replans < 0:
        raise LLMLabError("the plan's budgets must be at least 1 (max_replans at least 0)")
    tools = as_tools(tools)
    names = ", ".join(t.name for t in tools)
    trace = Trace(trace_path)
    result = AgentResult(None, "step_budget", 0, trace=trace.events)
    trace.add("start", task=task, tools=[t.name for t in tools], max_steps=max_steps, max_tokens=max_tokens,
              style=f"plan+{style}", model=getattr(client, "name", "?"))
    plan = _ask_plan(client, PLAN.format(tools=names, n=plan_items, task=task), result, plan_items,
                     min(plan_tokens, max_tokens)) or [task]  # no plan written: the task is the one step
    trace.add("plan", steps=plan, revision=0)
    done: list[tuple[str, str]] = []
    replans = 0
    while len(done) < len(plan):
        steps_left, tokens_left = max_steps - result.steps, max_tokens - result.completion_tokens
        if steps_left < 1 or tokens_left < 1:
            result.reason = "step_budget" if steps_left < 1 else "token_budget"
            break
        i, last = len(done), len(done) == len(plan) - 1
        results = "\n".join(f"- {s}: {a}" for s, a in done) or "(none yet)"
        sub = (f"Task: {task}\nPlan:\n{_numbered(plan)}\nResults so far:\n{results}\n\nNow do step {i + 1}: "
               f"{plan[i]}\nThen call final_answer with " + ("the answer to the task." if last else
                                                             "what this step found."))
        r = run_agent(client, sub, tools, max_steps=min(steps_per_item, steps_left), max_tokens=tokens_left,
                      step_tokens=step_tokens, system=system, style=style, trace=trace, act_first=False,
                      memory=replace(memory, summary="", folded=0, notes=[]) if memory is not None else None)
        result.steps += r.steps
        result.spend(r.prompt_tokens, r.completion_tokens)
        if r.ok:
            done.append((plan[i], r.answer))
            continue
        tokens_left = max_tokens - result.completion_tokens
        if replans >= max_replans or result.steps >= max_steps or tokens_left < 1:
            result.reason = r.reason
            break
        replans += 1
        why = {"step_budget": "it ran out of steps", "token_budget": "it ran out of tokens"}.get(r.reason, r.reason)
        prompt = REPLAN.format(plan=f"Plan:\n{_numbered(plan)}", i=i + 1, step=plan[i], why=why,
                               done="\n".join(f"- {s}: {a}" for s, a in done) or "(none)", n=plan_items, task=task)
        rest = _ask_plan(client, prompt, result, plan_items, min(plan_tokens, tokens_left))
        if not rest:  # nothing left to try
            result.reason = r.reason
            break
        plan = [s for s, _ in done] + rest
        trace.add("plan", steps=plan, revision=replans)
    if plan and len(done) == len(plan):
        result.answer, result.reason = done[-1][1], "final_answer"
    trace.add("end", reason=result.reason, answer=result.answer, steps=result.steps,
              prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    return result
