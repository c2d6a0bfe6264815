"""Retrieval with a model (the real SmolLM2, in-process and behind llmlab serve): the reranker and cited answers."""

import json
import math

import pytest

from llmlab.client import EndpointClient, LocalClient
from llmlab.errors import LLMLabError
from llmlab.rag.answer import RERANK_PROMPT, ask, rerank, resolve_citations
from llmlab.rag.embed import Embedder
from llmlab.rag.index import RagIndex, build_index

DOCS = [
    {"id": "paris", "text": "Paris is the capital of France. The city lies on the river Seine."},
    {"id": "cats", "text": "Cats are small carnivorous mammals. They purr when they are content."},
    {"id": "rome", "text": "Rome is the capital of Italy and was the centre of the Roman Empire."},
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    d = tmp_path_factory.mktemp("rag")
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    build_index([str(d / "docs.jsonl")], d / "idx", embedder=Embedder())
    return RagIndex.load(d / "idx")


def test_resolve_citations():
    text, cited, invalid = resolve_citations("Paris [2], on the Seine [2]. Big [1, 2]; odd [7].", ["a:0-5", "b:0-9"])
    assert text == "Paris [b:0-9], on the Seine [b:0-9]. Big [a:0-5, b:0-9]; odd [7]."
    assert cited == ["b:0-9", "a:0-5"] and invalid == [7]


def test_rerank_scores_are_normalised_yes_likelihoods(smollm2, index):
    client = LocalClient(smollm2)
    question = "What is the capital of France?"
    hits = index.search(question, k=2, method="hybrid")
    reranked = rerank(client, question, hits, scorer="yes")
    assert [h.rank for h in reranked] == [1, 2]
    assert reranked[0].score >= reranked[1].score
    prompts = [client.chat_text(RERANK_PROMPT.format(passage=h.chunk.text, question=question)) for h in reranked]
    logliks = client.loglikelihood([(p, word) for p in prompts for word in ("Yes", "No")])
    for i, h in enumerate(reranked):  # score = log P(Yes) - log(P(Yes) + P(No)), from the model's own likelihoods
        yes, no = logliks[2 * i].logprob, logliks[2 * i + 1].logprob
        assert h.score == pytest.approx(yes - math.log(math.exp(yes) + math.exp(no)), abs=1e-4)
        assert h.score < 0
    with pytest.raises(LLMLabError, match="unknown rerank scorer"):
        rerank(client, question, hits, scorer="vibes")


def test_ask_orders_passages_and_cites_chunk_ids(smollm2, index):
    client = LocalClient(smollm2)
    hits = index.search("What is the capital of France?", k=3)
    answer = ask(index, client, "What is the capital of France?", k=3, max_tokens=32)
    # best first, second best last: the middle of the context holds the weakest passage
    assert [h.chunk.chunk_id for h in answer.passages] == [hits[0].chunk.chunk_id, hits[2].chunk.chunk_id,
                                                           hits[1].chunk.chunk_id]
    assert "Paris" in answer.text
    shown = {h.chunk.chunk_id for h in answer.passages}
    assert set(answer.cited) <= shown
    assert answer.text == resolve_citations(answer.raw_text, [h.chunk.chunk_id for h in answer.passages])[0]
    with pytest.raises(LLMLabError, match="at least k"):
        ask(index, client, "What is the capital of France?", k=3, rerank_candidates=2)


def test_question_likelihood_rerank_through_an_endpoint_matches_in_process(smollm2, index):
    from llmlab.serve.testing import running_server

    question = "Which animal purrs?"
    hits = index.search(question, k=2, method="dense")
    local = rerank(LocalClient(smollm2), question, hits, scorer="question")
    with running_server(smollm2, model_name="rag-test") as url:
        remote = rerank(EndpointClient(url + "/v1", "rag-test"), question, hits, scorer="question")
    assert [h.chunk.chunk_id for h in remote] == [h.chunk.chunk_id for h in local]
    # the server scores the same tokens with the same weights, batched differently: float32 rounding only
    assert [h.score for h in remote] == pytest.approx([h.score for h in local], abs=1e-3)
