"""The agent task suite: the bios world's index answers each lookup and both hops of a two-hop task through the
`search` tool; a run on SmolLM2 is reported with a Wilson interval, steps, tokens and why each task ended."""

import pytest

from llmlab.agent.suite import format_report, prepare_suite, run_suite, summarize
from llmlab.agent.tools import builtin_tools, search_tool
from llmlab.cli.main import main
from llmlab.client import LocalClient
from llmlab.errors import LLMLabError


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("suite")
    tasks, index = prepare_suite(workdir, only=["calc-mul", "file-write", "multihop-1"])
    return workdir, {t.name: t for t in tasks}, index


def test_search_tool_answers_both_hops_of_a_multihop_task(suite):
    workdir, tasks, index = suite
    search = search_tool(index)
    company = tasks["multihop-1"].prompt.split("chief executive of ")[1].split(" born?")[0]
    first = search({"query": f"{company} chief executive"})
    assert first.startswith(f"[{company}:") and "The chief executive of" in first.splitlines()[0]
    ceo = first.splitlines()[0].split("The chief executive of " + company + " is ")[1].rstrip(".")
    second = search({"query": ceo}).splitlines()  # the CEO's biography, which holds the birth city
    assert any(line.startswith(f"[{ceo}:") and tasks["multihop-1"].expected in line for line in second), second
    assert [t.name for t in builtin_tools(index=index, names=["search"])] == ["search"]
    with pytest.raises(LLMLabError, match="needs an index"):
        builtin_tools(names=["search"])
    with pytest.raises(LLMLabError, match="no index"):
        search_tool(workdir / "nowhere")


def test_suite_on_smollm2_reports_success_steps_tokens_and_reasons(suite, smollm2):
    workdir, tasks, index = suite
    report = run_suite(LocalClient(smollm2), list(tasks.values()), workdir, index, max_steps=2, max_tokens=100,
                       step_tokens=40)
    rows = {r["task"]: r for r in report["rows"]}
    assert report["tasks"] == 3 and report["succeeded"] == sum(r["ok"] for r in rows.values())
    lo, hi = report["wilson95"]
    # (1e-9: the interval's arithmetic leaves ~1e-17 at 0 successes)
    assert 0 <= lo <= report["success_rate"] + 1e-9 and report["success_rate"] <= hi <= 1 and hi - lo > 0.3
    for r in rows.values():
        assert r["reason"] in ("final_answer", "step_budget", "token_budget") and 1 <= r["steps"] <= 2
        assert r["completion_tokens"] <= 100
    greeting = workdir / "workspaces" / "file-write" / "greeting.txt"  # checked by its end state, not the answer
    assert rows["file-write"]["ok"] == (greeting.is_file() and "hello agent" in greeting.read_text().lower())
    assert "success" in format_report(report) and "Wilson 95%" in format_report(report)
    # a budget that cannot finish any task ends each with a clear reason, not a hang
    cut = run_suite(LocalClient(smollm2), [tasks["calc-mul"]], workdir, max_steps=3, max_tokens=5, step_tokens=48)
    assert cut["rows"][0]["reason"] == "token_budget" and not cut["rows"][0]["ok"]


def test_summary_counts():
    rows = [{"task": "a", "kind": "compute", "ok": True, "reason": "final_answer", "steps": 2, "prompt_tokens": 10,
             "completion_tokens": 30}, {"task": "b", "kind": "lookup", "ok": False, "reason": "step_budget",
                                        "steps": 4, "prompt_tokens": 20, "completion_tokens": 50}]
    s = summarize(rows, style="tools", model="m")
    assert s["success_rate"] == 0.5 and s["mean_steps"] == 3 and s["mean_completion_tokens"] == 40
    assert s["reasons"] == {"final_answer": 1, "step_budget": 1} and s["by_kind"] == {"compute": "1/1",
                                                                                     "lookup": "0/1"}
    assert s["wilson95"][0] == pytest.approx(0.0945, abs=1e-3) and s["wilson95"][1] == pytest.approx(0.9055, abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["agent", "suite", "--tasks", "nope"], "unknown task 'nope'"),
    (["agent", "suite", "other"], "unknown agent suite 'other'"),
    (["agent", "run", "x", "--style", "nope"], "unknown agent style 'nope'"),
    (["agent", "run", "x", "--tools", "search"], "needs an index"),
    (["agent", "run", "x", "--mcp", "/nonexistent/server"], "did not start"),
])
def test_cli_refuses_bad_input_before_loading_a_model(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
