"""The ReAct style (Yao et al. 2022): the model writes Thought / Action / Action Input as plain text, the loop runs
the action and answers "Observation: ...". For models and endpoints without tool calling; parsed leniently, since
small models drift from the format (markdown bold, a call written as `tool(args)`, bare text for JSON)."""

from __future__ import annotations

import json
import re

from llmlab.agent.tools import Tool, ToolCall
from llmlab.client.base import GenParams

# a filled-in example, not placeholders (why: SmolLM2-135M copied "Action: the tool to use, one of [...]" verbatim)
FORMAT = """Answer in this format, one action at a time (the tools: {names}):
Thought: I should use {first}.
Action: {first}
Action Input: {example}

You will then see "Observation:" with the result. When you know the answer, write:
Thought: I know the answer.
Action: final_answer
Action Input: {{"answer": "..."}}"""

STOP = ["Observation:", "\nObservation"]
PREFIX = "Thought:"  # the model's turn is started with it, so it continues in the format
LABEL = r"[*_`#\s]*"  # markdown around a label: **Action:**, ### Action:
ACTION = re.compile(rf"^{LABEL}action{LABEL}(?:\d+{LABEL})?:{LABEL}(.*)$", re.I | re.M)
INPUT = re.compile(rf"^{LABEL}action[ _]?input{LABEL}(?:\d+{LABEL})?:{LABEL}(.*)", re.I | re.M | re.S)
FINAL = re.compile(rf"^{LABEL}final[ _]?answer{LABEL}:{LABEL}(\S.*)", re.I | re.M | re.S)
CALL = re.compile(r"^([A-Za-z_][\w-]*)\s*\((.*)\)\s*$", re.S)  # calculate("2 + 2") or calculate(expression="2+2")


def describe(tool: Tool) -> str:
    params = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in tool.parameters.get("properties", {}).items())
    return f"- {tool.name}({params}): {tool.description}"


def react_system(tools: list[Tool], system: str | None = None) -> str:
    first = next((t for t in tools if t.name != "final_answer"), tools[0])
    example = json.dumps({k: "..." for k in first.parameters.get("properties", {})}) if first else "{}"
    intro = system or "You are an agent. Solve the task step by step with these tools:"
    return (f"{intro}\n" + "\n".join(describe(t) for t in tools) + "\n\n"
            + FORMAT.format(names=", ".join(t.name for t in tools), first=first.name, example=example))


def _clean(text: str) -> str:
    return text.strip().strip("`*_").strip()


def _first_json_object(text: str):
    """The first JSON object in text, or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _arguments(raw: str, tool: Tool | None) -> dict | str:
    """Arguments from an Action Input: a JSON object; or, for a tool with one parameter, the bare value."""
    raw = _clean(raw.split("\nThought")[0].split("\nAction")[0])
    obj = _first_json_object(raw)
    if isinstance(obj, dict):
        return obj
    props = (tool.parameters.get("properties") or {}) if tool else {}
    if len(props) != 1:
        return raw
    (name, schema), = props.items()
    m = re.match(rf"^{re.escape(name)}\s*=\s*(.*)$", raw, re.S)  # expression="2+2"
    raw = m.group(1).strip() if m else raw
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if schema.get("type") == "string" and not isinstance(value, str):
        value = raw  # 42 for a string parameter is the text "42"
    return {name: value.strip("'\"") if isinstance(value, str) else value}


def _known(name: str, by_name: dict[str, Tool]) -> str:
    """A tool's own name when `name` differs from it only in case ("Search" for search)."""
    return next((n for n in by_name if n.lower() == name.lower()), name)


def parse_react(text: str, by_name: dict[str, Tool]):
    """(thought, ToolCall or None) from one ReAct turn. A Final Answer line is a call of final_answer."""
    action_m, final_m = ACTION.search(text), FINAL.search(text)
    cut = min(m.start() for m in (action_m, final_m) if m) if action_m or final_m else len(text)
    thought = re.sub(rf"^{LABEL}thought{LABEL}:{LABEL}", "", text[:cut], flags=re.I).strip()
    if final_m and (not action_m or final_m.start() < action_m.start()):
        return thought, ToolCall("final_answer", {"answer": _clean(final_m.group(1).split("\n\n")[0])})
    if not action_m:
        return thought, None
    name = _clean(action_m.group(1))
    call = CALL.match(name)
    if call:  # the input written inline, as a function call
        name, inline = _known(call.group(1), by_name), call.group(2)
        return thought, ToolCall(name, _arguments(inline, by_name.get(name)))
    name = name.split()[0].strip("`*_:.,'\"[]") if name.split() else ""
    name = _known(name, by_name)
    input_m = INPUT.search(text, action_m.end())
    raw = input_m.group(1) if input_m else ""
    return thought, ToolCall(name, _arguments(raw, by_name.get(name)) if raw.strip() else {})


class ReAct:
    """The text style of the agent loop (loop.run_agent(style="react"))."""
    name = "react"

    def system(self, tools: list[Tool], system: str | None) -> str:
        return react_system(tools, system)

    def act(self, client, messages, tools: list[Tool], max_tokens: int, first: bool = False):
        params = GenParams(max_tokens=max_tokens, temperature=0, stop=list(STOP))
        prompt = client.chat_text(messages)
        if prompt is None:  # an endpoint that does not publish its template: plain chat
            g = client.generate([messages], params)[0]
            text = g.text.strip()
        else:  # the answer starts with "Thought:" (why: without it SmolLM2-135M wrote no Action line in 36 steps)
            g = client.generate([prompt + PREFIX], params, chat=False)[0]
            text = (PREFIX + g.text).strip()
        _, action = parse_react(text, {t.name: t for t in tools})
        return {"role": "assistant", "content": text}, [action] if action else [], g

    def results(self, actions, observations: list[str]) -> list[dict]:
        if not actions:
            return [{"role": "user", "content": "Observation: Error: no action found. Write a Thought, then "
                                                "Action: <tool> and Action Input: <JSON object>."}]
        return [{"role": "user", "content": f"Observation: {o}"} for o in observations]
