"""The ReAct style (its lenient parser, and the loop on the real SmolLM2), memory (a running summary written by the
model, BM25 recall of earlier observations) and plan-then-execute with replanning."""

import pytest

from llmlab.agent.loop import AgentResult, Trace, read_trace, run_agent
from llmlab.agent.memory import Memory
from llmlab.agent.plan import parse_plan, run_planned
from llmlab.agent.react import parse_react
from llmlab.agent.tools import builtin_tools
from llmlab.client import LocalClient
from llmlab.errors import LLMLabError

TOOLS = {t.name: t for t in builtin_tools(names=["calculate"])}


@pytest.mark.parametrize("text, name, arguments", [
    ('Thought: multiply\nAction: calculate\nAction Input: {"expression": "6 * 7"}', "calculate",
     {"expression": "6 * 7"}),
    ('**Thought:** multiply\n**Action:** `calculate`\n**Action Input:** {"expression": "6*7"} then stop',
     "calculate", {"expression": "6*7"}),
    ("Action: calculate\nAction Input: 6 * 7", "calculate", {"expression": "6 * 7"}),  # a bare value
    ('Action: calculate("6 * 7")', "calculate", {"expression": "6 * 7"}),  # a call written inline
    ("Action: calculate(expression=6*7)", "calculate", {"expression": "6*7"}),
    ("Thought: done\nFinal Answer: 42\n\nmore text", "final_answer", {"answer": "42"}),
    ("Action: search\nAction Input: {\"query\": \"x\"}", "search", {"query": "x"}),  # unknown: execute says so
    ("Action: Calculate\nAction Input: 6 * 7", "calculate", {"expression": "6 * 7"}),  # a tool's name in other case
    ('Action: CALCULATE("6 * 7")', "calculate", {"expression": "6 * 7"}),
])
def test_react_parser_reads_what_small_models_write(text, name, arguments):
    thought, call = parse_react(text, TOOLS)
    assert call.name == name and call.arguments == arguments


def test_react_parser_finds_no_action_in_prose():
    assert parse_react("I think the answer is probably 42.", TOOLS) == ("I think the answer is probably 42.", None)
    assert parse_react("Final Answer:", TOOLS)[1] is None  # an empty answer is no answer


@pytest.fixture(scope="module")
def local(smollm2):
    return LocalClient(smollm2)


def test_react_loop_on_smollm2_runs_actions_and_shows_observations(local, tmp_path):
    r = run_agent(local, "What is 12 * 12?", builtin_tools(names=["calculate"]), style="react", max_steps=2,
                  step_tokens=48, trace_path=tmp_path / "t.jsonl")
    events = read_trace(tmp_path / "t.jsonl")
    steps = [e for e in events if e["type"] == "model"]
    assert events[0]["style"] == "react" and 1 <= len(steps) == r.steps <= 2
    for e in steps:  # every step either ran a parsed action or told the model it wrote none
        assert any(x["type"] in ("tool", "unreadable") and x["step"] == e["step"] for x in events)
    assert events[-1]["reason"] == r.reason in ("final_answer", "step_budget")


def test_memory_folds_old_steps_into_a_summary_and_recalls_observations(local):
    head = [{"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Find the values stored under alpha and beta."}]
    steps = [[{"role": "assistant", "content": f"Thought: look up {k}\nAction: lookup\nAction Input: {k}"},
              {"role": "user", "content": f"Observation: the value stored under {k} is {v}."}]
             for k, v in [("alpha", 7391), ("gamma", 12), ("beta", 5580)]]
    memory, result = Memory(budget_tokens=40, keep_steps=1, recall_k=1, summary_tokens=40), AgentResult(None, "", 0)
    trace = Trace(None)
    messages = memory.prompt(local, head, steps, result, trace, left=100)
    assert memory.folded == 2 and memory.summary and trace.events[0]["type"] == "summary"
    assert 0 < result.completion_tokens <= 40  # the model wrote the summary, and it is charged to the run
    assert messages[0] == head[0] and messages[2:] == steps[2]  # the last step stays verbatim
    note = messages[1]["content"]
    assert note.startswith(head[1]["content"]) and f"Summary of steps 1-2: {memory.summary}" in note
    # recall: the folded observation sharing the most words with the task and the latest step, verbatim
    assert "Earlier observations:\n- Observation: the value stored under alpha is 7391." in note
    with pytest.raises(LLMLabError, match="memory"):
        Memory(budget_tokens=0)


def test_the_loop_uses_memory(local):
    # step 1 calls calculate (as in test_agent.py); before step 2 the 1-token budget folds it into a summary
    r = run_agent(local, "What is 123 * 45? Use calculate.", builtin_tools(names=["calculate"]), max_steps=2,
                  step_tokens=40, memory=Memory(budget_tokens=1, keep_steps=0, summary_tokens=30))
    kinds = [e["type"] for e in r.trace]
    assert kinds[:4] == ["start", "model", "tool", "summary"] and r.trace[3]["folded"] == 1, kinds


def test_parse_plan():
    assert parse_plan("1. Search for X.\n2) Read it\nStep 3: answer\nnoise", 5) == ["Search for X.", "Read it",
                                                                                  "answer"]
    assert parse_plan("1. a\n2. a\n3. b", 1) == ["a"]
    assert parse_plan("just do it", 3) == ["just do it"]


def test_plan_then_execute_replans_when_a_step_fails(local):
    # 3 tokens per step are too few for any ReAct action: the first step fails and the model must replan
    r = run_planned(local, "What is 12 * 12?", builtin_tools(names=["calculate"]), style="react", step_tokens=3,
                    steps_per_item=1, max_steps=3, max_tokens=400, plan_items=2, plan_tokens=40, max_replans=1)
    plans = [e for e in r.trace if e["type"] == "plan"]
    assert plans[0]["steps"] and plans[0]["revision"] == 0
    assert [p["revision"] for p in plans] == [0, 1] and r.reason == "step_budget" and r.answer is None
    assert r.steps <= 3 and r.completion_tokens <= 400
