"""Test-time strategies end to end on the real SmolLM2, in-process and through a real `llmlab serve` endpoint."""

import json

import pytest

from llmlab.api import load
from llmlab.cli.main import main
from llmlab.client import EndpointClient, GenParams, LocalClient
from llmlab.errors import LLMLabError
from llmlab.reason import (best_of_n, cot, debate, direct, make_items, revise, router, self_consistency,
                           tree_of_thoughts)
from llmlab.reason.prompts import cot_prompt
from llmlab.serve.testing import running_server

TOKENS = 16  # tiny budgets: the point is that every strategy runs and counts, not that a 135M model is right


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return load(smollm2_gguf)


@pytest.fixture(scope="module")
def client(llm):
    return LocalClient(llm)


@pytest.fixture(scope="module")
def item():
    return make_items("arithmetic1", 1, seed=0)[0]


def check_trace(result, budget=None):
    t = result.trace
    assert t.samples and t.calls >= 1 and t.prompt_tokens > 0 and t.completion_tokens > 0 and t.seconds > 0
    assert result.answer is None or isinstance(result.answer, str)
    if budget is not None:
        assert t.completion_tokens <= budget


def test_direct_and_cot(client, item):
    r = direct(client, item, max_tokens=8)
    check_trace(r)
    assert r.trace.completion_tokens <= 8 and len(r.trace.samples) == 1
    r = cot(client, item, max_tokens=TOKENS, shots=2)
    check_trace(r)
    assert r.answer == r.trace.answers[0]


def test_self_consistency_shares_seeds_and_counts_tokens(client, item):
    four = self_consistency(client, item, k=4, max_tokens=TOKENS, seed=7)
    check_trace(four, budget=4 * TOKENS)
    assert len(four.trace.samples) == 4 and four.trace.calls == 1  # one request: the k samples share the prefill
    # sample i uses seed + i, so k=2 draws exactly the first two samples of k=4
    two = self_consistency(client, item, k=2, max_tokens=TOKENS, seed=7)
    assert two.trace.samples == four.trace.samples[:2]
    # the prompt is counted once for the four samples
    assert four.trace.prompt_tokens == client.count_tokens(client.chat_text(cot_prompt(item)))


def test_weighted_self_consistency_uses_the_samples_probabilities(client, item):
    r = self_consistency(client, item, k=3, weighted=True, max_tokens=TOKENS, seed=1)
    assert len(r.trace.scores) == 3 and all(s <= 0 for s in r.trace.scores)  # mean log-probabilities


def test_a_budget_caps_the_samples(client, item):
    r = self_consistency(client, item, k=8, max_tokens=TOKENS, budget=3 * TOKENS)
    assert len(r.trace.samples) == 3 and r.trace.completion_tokens <= 3 * TOKENS
    with pytest.raises(LLMLabError, match="too small for one sample"):
        self_consistency(client, item, k=8, max_tokens=TOKENS, budget=TOKENS - 1)
    with pytest.raises(LLMLabError, match="k must be at least 1"):
        self_consistency(client, item, k=0)


def test_best_of_n_picks_the_best_scored(client, item):
    for scorer in ("likelihood", "verifier"):
        r = best_of_n(client, item, n=3, scorer=scorer, max_tokens=TOKENS, seed=3)
        check_trace(r)
        scores = r.trace.scores
        best = scores.index(max(scores))
        assert r.answer == r.trace.answers[best]  # never a worse-scored candidate
    # with a verifier, best-of-N is right whenever any candidate is
    hand = {**item, "answer": r.trace.answers[-1] or "0"}
    r2 = best_of_n(client, hand, n=3, scorer="verifier", max_tokens=TOKENS, seed=3)
    assert r2.answer == hand["answer"] or hand["answer"] not in r2.trace.answers


def test_tree_of_thoughts_runs_within_budget(client, item):
    r = tree_of_thoughts(client, item, breadth=2, beam=1, max_steps=2, step_tokens=12, budget=60)
    check_trace(r, budget=60)
    assert r.trace.steps and r.trace.steps[0]["depth"] == 1


def test_tree_breadth_one_is_greedy_line_by_line(smollm2, item):
    """Breadth 1 at temperature 0 continues the greedy chain of thought one line at a time: its text is the start
    of one greedy generation from the same prompt (a line's newline is re-tokenized when the next line starts, so
    equality holds while the newline is its own token, as SmolLM2's single newlines are). Each line re-prefills
    what came before, where one generation decodes it: on the default 4-bit decode kernel those are two code paths
    (fp32 prefill, int4 decode) whose logits differ enough to flip a greedy digit, so this runs the fp32 eager
    model, where prefill and decode are one path and differ only by rounding."""
    client = LocalClient(smollm2)
    r = tree_of_thoughts(client, item, breadth=1, beam=1, temperature=0.0, max_steps=3, step_tokens=16)
    head = client.chat_text(cot_prompt(item))
    text = r.trace.samples[-1]
    greedy = client.generate([head], GenParams(max_tokens=48, temperature=0.0), chat=False)[0].text
    assert greedy.startswith(text.rstrip("\n")) or text.startswith(greedy)


def test_revise_router_and_debate(client, item):
    r = revise(client, item, rounds=1, max_tokens=TOKENS, critique_tokens=12)
    check_trace(r)
    assert len(r.trace.steps) == 1 and "critique" in r.trace.steps[0]
    r = router(client, client, item, k=2, threshold=1.0, max_tokens=TOKENS)
    check_trace(r)
    route = r.trace.steps[-1]
    assert route["route"] == ("cheap" if route["agreement"] >= 1.0 else "strong")
    assert r.trace.completion_tokens == route["cheap_tokens"] + route["strong_tokens"]
    r = debate([client, client], item, rounds=1, judge=client, max_tokens=16, budget=5 * 16)
    check_trace(r, budget=5 * 16)
    assert [s["round"] for s in r.trace.steps[:2]] == [0, 1] and "judge" in r.trace.steps[-1]
    with pytest.raises(LLMLabError, match="at least 2 agents"):
        debate([client], item)


def test_an_endpoint_run_equals_the_in_process_run(llm, client, item):
    """The same strategy through a real `llmlab serve` gives the same samples for the same seeds."""
    local = self_consistency(client, item, k=3, max_tokens=TOKENS, seed=11)
    with running_server(llm, model_name="smollm2", max_batch=4) as url:
        remote = self_consistency(EndpointClient(url, "smollm2"), item, k=3, max_tokens=TOKENS, seed=11)
    assert remote.trace.samples == local.trace.samples
    assert remote.answer == local.answer
    # the OpenAI API reports usage per request, not per choice: the endpoint client shares it out evenly
    # (integer division), so the sum may fall short of the true total by less than one token per sample
    assert 0 <= local.trace.completion_tokens - remote.trace.completion_tokens < 3


def test_cli_prints_accuracy_and_sweeps(smollm2_gguf, tmp_path, capsys):
    args = ["reason", "--task", "arithmetic1", "--questions", "1", "--max-tokens", "12", "--model", str(smollm2_gguf)]
    assert main(args + ["--strategy", "self-consistency", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "generated" in out and "s/question" in out
    assert main(args + ["--strategy", "best-of-n", "--scorer", "verifier", "--sweep", "1,2",
                        "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 2] and rows[1]["completion_tokens"] >= rows[0]["completion_tokens"]
    assert (tmp_path / "sweep.png").stat().st_size > 0 and "| n |" in (tmp_path / "sweep.md").read_text()
