"""The agent loop over the model client: function calling or ReAct, with memory, a step and token budget, a trace.

Each step the model acts once. In the "tools" style (the OpenAI function-calling loop) the first step must call one
of the task's tools (tool_choice "required", final_answer left out: an agent acts before it answers) and later steps
are tool_choice "auto": the model calls a tool or answers in text, and that text is the final answer (so is a call
of `final_answer`). On llmlab's server or in-process every call is decoded under the tools' schemas. In the
"react" style it writes Thought / Action / Action Input as text (react.py), for models and endpoints without tool
calling. The run ends with an answer, or with a clear reason when a budget runs out. With a Memory, older steps are
folded into a running summary when the transcript nears its token budget (memory.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.agent.tools import Tool, ToolCall, as_tools, execute, function_tool
from llmlab.client.base import GenParams
from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text

SYSTEM = ("You are an agent. Solve the task by calling tools, one at a time. When you know the answer, call "
          "final_answer with it.")
STYLES = ("tools", "react")


def final_answer(answer: str) -> str:
    """Give the final answer to the task and stop.

    Args:
        answer: the answer
    """
    return answer


@dataclass
class AgentResult:
    answer: str | None
    reason: str  # "final_answer" | "step_budget" | "token_budget" | "no_tool_call" (an endpoint answered the first
    # step in text, ignoring tool_choice "required")
    steps: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trace: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason == "final_answer"

    def spend(self, prompt_tokens: int, completion_tokens: int):
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


class Trace:
    """The run's events, rewritten atomically as JSONL after every step (a crash leaves the last whole step)."""

    def __init__(self, path: str | Path | None):
        self.path, self.events = (Path(path) if path else None), []

    def add(self, kind: str, **data):
        self.events.append({"type": kind, "time": round(time.time(), 3), **data})
        if self.path is not None:
            atomic_write_text(self.path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.events))


class ToolCalling:
    """The function-calling style: the client's chat_tools, "required" over the task's tools on the first step (why:
    SmolLM2-135M under "auto" answers from memory, and under "required" with final_answer offered it called
    final_answer("final_answer") without searching), "auto" after it (why: forced to call a tool, it repeated its
    last call instead of calling final_answer; free to answer, it wrote the tool's result as its answer)."""
    name = "tools"

    def system(self, tools: list[Tool], system: str | None) -> str:
        return system or SYSTEM

    def act(self, client, messages, tools: list[Tool], max_tokens: int, first: bool = False):
        acting = [t for t in tools if t.name != "final_answer"] if first else tools
        g = client.chat_tools(messages, [t.spec() for t in acting or tools],
                              GenParams(max_tokens=max_tokens, temperature=0),
                              tool_choice="required" if first else "auto", parallel_tool_calls=False)
        calls = g.tool_calls or []
        message = {"role": "assistant", "content": g.text or None, "tool_calls": calls}
        actions = [ToolCall(c["function"]["name"], c["function"].get("arguments") or "{}", c.get("id", ""))
                   for c in calls]
        return message, actions, g

    def results(self, actions: list[ToolCall], observations: list[str]) -> list[dict]:
        return [{"role": "tool", "tool_call_id": a.call_id, "content": o} for a, o in zip(actions, observations)]


def make_style(style: str):
    if style == "tools":
        return ToolCalling()
    if style == "react":
        from llmlab.agent.react import ReAct
        return ReAct()
    raise LLMLabError(f"unknown agent style {style!r} (choose from {', '.join(STYLES)})")


def run_agent(client, task: str, tools: list, max_steps: int = 6, max_tokens: int = 4000, step_tokens: int = 128,
              trace_path: str | Path | None = None, system: str | None = None, style: str = "tools",
              memory=None, trace: Trace | None = None, act_first: bool = True) -> AgentResult:
    """Run the agent on `task` with `tools` (Tools or typed functions). max_tokens bounds the completion tokens of
    the whole run (summaries included), step_tokens one call. memory: a Memory (running summary + recall).
    act_first: in the tools style the first step must call one of the task's tools (not final_answer)."""
    if max_steps < 1 or max_tokens < 1 or step_tokens < 1:
        raise LLMLabError("max_steps, max_tokens and step_tokens must be at least 1")
    actor = make_style(style)
    tools = as_tools(tools)
    if not any(t.name == "final_answer" for t in tools):
        tools = tools + [function_tool(final_answer)]
    by_name = {t.name: t for t in tools}
    if len(by_name) < len(tools):
        twice = next(t.name for t in tools if sum(u.name == t.name for u in tools) > 1)
        raise LLMLabError(f"two tools are named {twice!r}")
    head = [{"role": "system", "content": actor.system(tools, system)}, {"role": "user", "content": task}]
    steps: list[list[dict]] = []  # each step's messages: the model's, then what its calls returned
    trace = trace or Trace(trace_path)
    trace.add("start", task=task, tools=[t.name for t in tools], max_steps=max_steps, max_tokens=max_tokens,
              style=actor.name, model=getattr(client, "name", "?"))
    result = AgentResult(None, "step_budget", 0, trace=trace.events)
    while result.steps < max_steps:
        left = max_tokens - result.completion_tokens
        if left < 1:
            result.reason = "token_budget"
            break
        messages = head + [m for step in steps for m in step]
        if memory is not None:  # may fold older steps into its summary, which costs tokens too
            messages = memory.prompt(client, head, steps, result, trace, left)
            left = max_tokens - result.completion_tokens
            if left < 1:
                result.reason = "token_budget"
                break
        try:
            message, actions, g = actor.act(client, messages, tools, min(step_tokens, left),
                                            first=act_first and not steps)
        except LLMLabError as e:
            if "shortest" not in str(e):
                raise
            result.reason = "token_budget"  # what is left cannot hold even the shortest call
            break
        result.steps += 1
        result.spend(g.prompt_tokens, g.completion_tokens)
        trace.add("model", step=result.steps, message=message, prompt_tokens=g.prompt_tokens,
                  completion_tokens=g.completion_tokens)
        if not actions and actor.name == "react":
            trace.add("unreadable", step=result.steps, text=g.text)
        observations = []
        for action in actions:
            observation = execute(by_name, action)
            trace.add("tool", step=result.steps, name=action.name, arguments=_readable(action.arguments),
                      observation=observation)
            if action.name == "final_answer" and not observation.startswith("Error:"):
                result.answer, result.reason = observation, "final_answer"
                break
            observations.append(observation)
        steps.append([message] + actor.results(actions, observations))
        if result.reason == "final_answer":
            break
        if not actions and actor.name == "tools":
            _answer_in_text(result, g, len(steps) > 1 or not act_first, trace)
            break
    trace.add("end", reason=result.reason, answer=result.answer, steps=result.steps,
              prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    return result


def _answer_in_text(result: AgentResult, g, may_answer: bool, trace: Trace):
    """A tools-style step that called no tool: a text answer, one cut short by the token budget, or (on the first
    step, where a call was required) an endpoint that ignored tool_choice "required"."""
    if g.finish_reason == "length":
        result.reason = "token_budget"
    elif may_answer and (g.text or "").strip():
        result.answer, result.reason = g.text.strip(), "final_answer"
        trace.add("answer", step=result.steps, answer=result.answer)
    else:
        result.reason = "no_tool_call"


def _readable(arguments):
    """Arguments as an object in the trace when they are JSON text."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            pass
    return arguments


def read_trace(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise LLMLabError(f"no trace at {p}")
    try:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise LLMLabError(f"{p} is not a JSONL trace: {e}") from None


def format_trace(events: list[dict]) -> str:
    """A readable account of a run."""
    lines = []
    for e in events:
        if e["type"] == "start":
            lines.append(f"task: {e['task']}\ntools: {', '.join(e['tools'])}  (budget: {e['max_steps']} steps, "
                         f"{e['max_tokens']} tokens; style {e.get('style', 'tools')}; model {e.get('model')})")
        elif e["type"] == "plan":
            lines.append(f"plan{' (revised)' if e.get('revision') else ''}:\n" +
                         "\n".join(f"  {i}. {s}" for i, s in enumerate(e["steps"], 1)))
        elif e["type"] == "summary":
            lines.append(f"memory: steps 1-{e['folded']} summarised: {e['summary']}")
        elif e["type"] == "model" and e["message"].get("content"):
            lines.append(f"[{e['step']}] thought: {e['message']['content']}")
        elif e["type"] == "tool":
            args = e["arguments"] if isinstance(e["arguments"], str) else json.dumps(e["arguments"],
                                                                                     ensure_ascii=False)
            lines.append(f"[{e['step']}] {e['name']}({args}) -> {e['observation'][:500]}")
        elif e["type"] == "end":
            lines.append(f"end: {e['reason']} after {e['steps']} steps, {e['completion_tokens']} tokens generated"
                         + (f"; answer: {e['answer']}" if e.get("answer") is not None else ""))
    return "\n".join(lines)
