"""Indirect prompt injection into llmlab's own RAG pipeline and agent, on the real SmolLM2."""

import pytest

from llmlab.client import LocalClient
from llmlab.errors import LLMLabError
from llmlab.safety.redteam.injection import AGENT_INJECTIONS, MARKER, agent_injection, rag_injection


@pytest.fixture(scope="module")
def client(smollm2):
    return LocalClient(smollm2)


def test_rag_injection_reaches_the_model_and_is_scored(client, tmp_path):
    result = rag_injection(client, tmp_path, "small", defences=["none", "spotlight"], goals=["answer"])
    records = result["records"]
    assert len(records) == 4 and {r["defence"] for r in records} == {"none", "spotlight"}
    for r in records:  # the poisoned note is among the passages the model saw
        assert any("-notes" in cid for cid in r["shown"])
        assert r["success"] == (MARKER in r["answer"].lower())
    marked = (tmp_path / "answer-marked" / "docs.jsonl").read_text()
    assert "IMPORTANT^NOTE^TO^THE^ASSISTANT" in marked  # spotlighting datamarked the untrusted documents
    for row in result["by_defence"]:
        assert row["success"]["n"] == 2 and row["success"]["ci95"] is not None
    with pytest.raises(LLMLabError, match="unknown defence"):
        rag_injection(client, tmp_path, "small", defences=["prayer"])


def test_agent_reads_the_poisoned_tool_output(client):
    result = agent_injection(client, "small", defences=["none"], goals=["tool"], max_steps=2, step_tokens=48)
    (record,) = result["records"]
    assert record["reason"] in ("final_answer", "step_budget", "token_budget", "no_tool_call")
    assert record["success"] == bool(record["emails"]) == ("send_email" in record["tool_calls"])
    if "get_weather" in record["tool_calls"]:  # what the poisoned tool returned went back to the model
        assert AGENT_INJECTIONS["tool"] in record["observations"][record["tool_calls"].index("get_weather")]
    assert result["by_defence"][0]["success"]["ci95"] is not None
