"""The function-calling agent loop over the model client, with a step and token budget and a JSONL trace.

Each step the model must call a tool (tool_choice "required", decoded under the tools' schemas); the run ends when
it calls `final_answer`, or with a clear reason when a budget runs out. In-process (LocalClient) the calls are
decoded with the server's own grammar (serve/tools.py); through an endpoint they go as OpenAI `tools`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.agent.tools import Tool, as_tools, function_tool
from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text

SYSTEM = ("You are an agent. Solve the task by calling tools, one at a time. When you know the answer, call "
          "final_answer with it.")


def final_answer(answer: str) -> str:
    """Give the final answer to the task and stop.

    Args:
        answer: the answer
    """
    return answer


@dataclass
class AgentResult:
    answer: str | None
    reason: str  # "final_answer" | "step_budget" | "token_budget"
    steps: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trace: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason == "final_answer"


def call_model(client, messages: list[dict], tools: list[Tool], max_tokens: int) -> tuple[dict, int, int]:
    """(assistant message with tool_calls, prompt tokens, completion tokens) for one required call."""
    specs = [t.spec() for t in tools]
    if hasattr(client, "llm"):  # in-process: the same grammar the server uses
        return _local_call(client.llm, messages, specs, max_tokens)
    body = {"model": client.model, "messages": messages, "tools": specs, "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": max_tokens, "temperature": 0}
    r = client._post("/chat/completions", body)
    usage = r.get("usage") or {}
    message = r["choices"][0]["message"]
    return message, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)


def _local_call(llm, messages, specs, max_tokens):
    from llmlab.engine.constraint import TokenVocab
    from llmlab.serve.tools import check_tools, parse_tool_calls, render_messages, tool_constraint_factory, \
        tool_grammar
    tools = check_tools(specs)
    ids = llm.prompt_ids(render_messages(messages, tools))
    if not hasattr(llm, "_tool_vocab"):
        llm._tool_vocab = TokenVocab(llm.tokenizer)  # built once per model (about a second)
    factory = tool_constraint_factory(llm._tool_vocab, tool_grammar("required", tools, parallel=False), max_tokens)
    done = llm.engine.generate([ids], llm.params(max_new_tokens=max_tokens, temperature=0), constraint_factory=factory)
    content, calls = parse_tool_calls(done[0].text)
    return {"role": "assistant", "content": content, "tool_calls": calls}, len(ids), done[0].completion_tokens


class Trace:
    """The run's events, rewritten atomically as JSONL after every step (a crash leaves the last whole step)."""

    def __init__(self, path: str | Path | None):
        self.path, self.events = (Path(path) if path else None), []

    def add(self, kind: str, **data):
        self.events.append({"type": kind, "time": round(time.time(), 3), **data})
        if self.path is not None:
            atomic_write_text(self.path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.events))


def run_agent(client, task: str, tools: list, max_steps: int = 6, max_tokens: int = 4000, step_tokens: int = 128,
              trace_path: str | Path | None = None, system: str = SYSTEM) -> AgentResult:
    """Run the function-calling loop on `task` with `tools` (Tools or typed functions). max_tokens bounds the
    completion tokens of the whole run, step_tokens one call."""
    if max_steps < 1 or max_tokens < 1:
        raise LLMLabError("max_steps and max_tokens must be at least 1")
    tools = as_tools(tools)
    if not any(t.name == "final_answer" for t in tools):
        tools = tools + [function_tool(final_answer)]
    by_name = {t.name: t for t in tools}
    messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
    trace = Trace(trace_path)
    trace.add("start", task=task, tools=[t.name for t in tools], max_steps=max_steps, max_tokens=max_tokens,
              model=getattr(client, "name", "?"))
    result = AgentResult(None, "step_budget", 0, trace=trace.events)
    while result.steps < max_steps:
        left = max_tokens - result.completion_tokens
        if left < 1:
            result.reason = "token_budget"
            break
        try:
            message, p, c = call_model(client, messages, tools, min(step_tokens, left))
        except LLMLabError as e:
            if "shortest" not in str(e):
                raise
            result.reason = "token_budget"  # what is left cannot hold even the shortest call
            break
        result.steps += 1
        result.prompt_tokens, result.completion_tokens = result.prompt_tokens + p, result.completion_tokens + c
        messages.append({"role": "assistant", "content": message.get("content"),
                         "tool_calls": message.get("tool_calls") or []})
        trace.add("model", step=result.steps, message=message, prompt_tokens=p, completion_tokens=c)
        for call in message.get("tool_calls") or []:
            name, args = call["function"]["name"], json.loads(call["function"]["arguments"] or "{}")
            observation = by_name[name](args)
            trace.add("tool", step=result.steps, name=name, arguments=args, observation=observation)
            if name == "final_answer":
                result.answer, result.reason = observation, "final_answer"
                break
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": observation})
        if result.reason == "final_answer":
            break
        if not message.get("tool_calls"):  # cut short by the token budget: no whole call
            result.reason = "token_budget"
            break
    trace.add("end", reason=result.reason, answer=result.answer, steps=result.steps,
              prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    return result


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
                         f"{e['max_tokens']} tokens; model {e.get('model')})")
        elif e["type"] == "model" and e["message"].get("content"):
            lines.append(f"[{e['step']}] thought: {e['message']['content']}")
        elif e["type"] == "tool":
            lines.append(f"[{e['step']}] {e['name']}({json.dumps(e['arguments'], ensure_ascii=False)}) -> "
                         f"{e['observation'][:500]}")
        elif e["type"] == "end":
            lines.append(f"end: {e['reason']} after {e['steps']} steps, {e['completion_tokens']} tokens generated"
                         + (f"; answer: {e['answer']}" if e.get("answer") is not None else ""))
    return "\n".join(lines)
