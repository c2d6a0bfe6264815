"""The agent: tools from typed functions, the function-calling loop on the real SmolLM2 (in-process, and through
`llmlab serve` with the endpoint client), both clients' chat_tools, budgets that end a run with a reason, and the
JSONL trace."""

import json
from typing import Literal

import pytest

from llmlab.agent.loop import format_trace, read_trace, run_agent
from llmlab.agent.tools import ToolCall, builtin_tools, calculate, execute, function_tool, workspace_tools
from llmlab.client import EndpointClient, GenParams, LocalClient
from llmlab.errors import LLMLabError
from llmlab.serve.testing import running_server


def multiply(a: int, b: int, unit: Literal["m", "km"] = "m") -> str:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
            (any integer)
        unit: the unit of the result
    """
    return f"{a * b} {unit}"


def test_schema_from_type_hints_and_docstring():
    tool = function_tool(multiply)
    assert tool.description == "Multiply two integers."
    assert tool.parameters == {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "description": "the first factor"},
        "b": {"type": "integer", "description": "the second factor (any integer)"},
        "unit": {"enum": ["m", "km"], "description": "the unit of the result"}}}
    assert tool({"a": 6, "b": 7}) == "42 m"
    assert tool({"a": "6", "b": 7}).startswith("Error: bad arguments")
    with pytest.raises(LLMLabError, match="type hint"):
        function_tool(lambda x: x)


def test_calculator_and_workspace(tmp_path):
    assert calculate("(12 + 30) * 2") == "84" and calculate("sqrt(16)") == "4"
    with pytest.raises(ValueError):
        calculate("__import__('os').system('ls')")
    read, write = workspace_tools(tmp_path)
    assert write({"path": "notes/a.txt", "content": "hello"}).startswith("wrote 5")
    assert read({"path": "notes/a.txt"}) == "hello"
    assert "outside the workspace" in read({"path": "../../etc/passwd"})


@pytest.fixture(scope="module")
def local(smollm2):
    return LocalClient(smollm2)


def test_agent_calls_the_calculator_and_answers(local, tmp_path):
    trace = tmp_path / "run.jsonl"
    r = run_agent(local, "What is 123 * 45? Use calculate.", builtin_tools(names=["calculate"]), max_steps=3,
                  step_tokens=40, trace_path=trace)
    events = read_trace(trace)
    calls = [e for e in events if e["type"] == "tool"]
    # the expression's pattern constrains the call to arithmetic, so it evaluates (what SmolLM2 multiplies varies)
    assert calls[0]["name"] == "calculate" and float(calls[0]["observation"]) > 0, calls[0]
    assert events[-1]["type"] == "end" and events[-1]["reason"] == r.reason and r.steps == events[-1]["steps"]
    assert "calculate(" in format_trace(events)


def test_tools_agent_acts_first_then_answers_in_text(local):
    # regression: with tool_choice "required" on every step SmolLM2 never called final_answer; it repeated
    # calculate("1591") until the step budget. Now the first step must call a task tool (final_answer left out)
    # and later steps are "auto": SmolLM2 answers with the result in text.
    r = run_agent(local, "What is 37 * 43? Use calculate.", builtin_tools(names=["calculate"]), max_steps=3,
                  step_tokens=48)
    calls = [e for e in r.trace if e["type"] == "tool"]
    assert calls[0]["name"] == "calculate" and r.reason == "final_answer" and r.steps == 2, format_trace(r.trace)
    assert calls[0]["observation"] in r.answer  # what it computed, given back as the answer


def test_budgets_end_the_run_with_a_reason(local):
    r = run_agent(local, "What is 2 + 2?", builtin_tools(names=["calculate"]), max_tokens=5, step_tokens=40)
    assert r.reason == "token_budget" and r.answer is None and r.completion_tokens <= 5
    r = run_agent(local, "Compute 7 * 8 with calculate.", [calculate], max_steps=1, step_tokens=40)
    assert r.reason in ("step_budget", "final_answer") and r.steps == 1


ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers and return their sum.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def test_agent_through_the_server_and_chat_tools_on_both_clients(smollm2, local, tmp_path):
    question = [{"role": "user", "content": "What is 123 + 456? Use the add tool."}]
    params = GenParams(max_tokens=60, temperature=0)
    with running_server(smollm2, model_name="smollm2", max_len=2048) as url:
        client = EndpointClient(url, "smollm2")
        r = run_agent(client, "What is 123 * 45? Use calculate.", builtin_tools(names=["calculate"]), max_steps=1,
                      step_tokens=40)
        remote = client.chat_tools(question, [ADD], params, tool_choice="required")
        said = client.chat_tools(question, [ADD], params, tool_choice="none")
    assert r.steps == 1 and r.trace[1]["message"]["tool_calls"][0]["function"]["name"] in ("calculate",
                                                                                          "final_answer")
    json.loads(r.trace[1]["message"]["tool_calls"][0]["function"]["arguments"])
    here = local.chat_tools(question, [ADD], params, tool_choice="required")
    # the same prompt format and grammar in-process and on the server: greedy SmolLM2 copies the numbers
    for g in (remote, here):
        (call,) = g.tool_calls
        assert g.finish_reason == "tool_calls" and call["id"].startswith("call_") and call["function"]["name"] == "add"
        assert json.loads(call["function"]["arguments"]) == {"a": 123, "b": 456}
    assert said.tool_calls == [] and said.text  # tool_choice none: text, no calls
    with pytest.raises(LLMLabError, match="not valid JSON Schema"):
        local.chat_tools(question, [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
                         params)
    with pytest.raises(LLMLabError, match="'nope'"):
        local.chat_tools(question, [ADD], params, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_calls_the_tools_cannot_take_become_observations():
    by_name = {t.name: t for t in builtin_tools(names=["calculate"])}
    assert execute(by_name, ToolCall("search", {"query": "x"})) == "Error: there is no tool 'search' (tools: calculate)"
    assert "not valid JSON" in execute(by_name, ToolCall("calculate", "{expression: 2"))
    assert "must be a JSON object" in execute(by_name, ToolCall("calculate", "[1]"))
    assert execute(by_name, ToolCall("calculate", '{"expression": "2 + 2"}')) == "4"
    with pytest.raises(LLMLabError, match="two tools are named 'calculate'"):
        run_agent(None, "x", builtin_tools(names=["calculate"]) * 2)
