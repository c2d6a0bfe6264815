"""Retrieval with a model (the real SmolLM2, in-process and behind llmlab serve): the reranker and cited answers."""

import json
import math

import pytest

from llmlab.client import EndpointClient, LocalClient
from llmlab.errors import LLMLabError
from llmlab.rag.answer import RERANK_PROMPT, Answer, ask, rerank, resolve_citations
from llmlab.rag.faithfulness import CALIBRATION, answer_correct, claims, faithfulness
from llmlab.rag.embed import Embedder
from llmlab.rag.index import RagIndex, build_index
from llmlab.safety.hallucination import yes_probabilities

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


def test_answer_correctness_and_claims():
    assert answer_correct("She studied at Rice University [1].", ["Rice University"])
    assert answer_correct("Born on August 13, 1982.", ["august 13 1982"])  # case and punctuation do not count
    assert not answer_correct("Rice", ["Rice University"])
    assert not answer_correct("Price University", ["Rice University"])  # whole words only
    assert answer_correct("It was Hugo.", ["Clara", "Hugo"])  # any gold answer
    assert claims("Paris is the capital [1]. It lies on the Seine [1, 2].") == ["Paris is the capital.",
                                                                                "It lies on the Seine."]
    assert claims("I do not know. The passages do not say.") == ["The passages do not say."]
    assert claims("I don't know [2].") == []


def test_faithfulness_counts_supported_claims(smollm2, index):
    client = LocalClient(smollm2)
    shown = index.search("What is the capital of France?", k=1, method="bm25")
    answers = [Answer("q", "", "Paris is the capital of France [1]. Paris lies on the river Seine [1].", shown),
               Answer("q", "", "I do not know.", shown)]
    rows = faithfulness(client, answers)
    assert rows[1] == {"claims": [], "faithfulness": None}  # an abstention makes no claim
    claims_ = rows[0]["claims"]
    assert [c["claim"] for c in claims_] == ["Paris is the capital of France.", "Paris lies on the river Seine."]
    # the judge's probabilities are the grounding check's own, and the share counts those at 0.5 or more
    expected = yes_probabilities(client, [(shown[0].chunk.indexed_text, c["claim"]) for c in claims_])
    assert [c["support"] for c in claims_] == pytest.approx(expected, abs=1e-5)
    assert rows[0]["faithfulness"] == sum(p >= 0.5 for p in expected) / 2


def test_rag_eval_answers_through_an_endpoint(smollm2, index, tmp_path, capsys):
    from llmlab.cli.main import main
    from llmlab.serve.testing import running_server

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is the capital of France?", "relevant": ["paris"],
                                     "answers": ["Paris"]}) + "\n"
                         + json.dumps({"question": "Which city was the centre of the Roman Empire?",
                                       "relevant": ["rome"]}) + "\n")  # no gold answer: retrieval only
    assert main(["rag", "eval", str(index.path), str(questions), "--answers", "--n-answers", "0"]) == 2
    assert "--n-answers must be at least 1" in capsys.readouterr().err
    with running_server(smollm2, model_name="rag-test") as url:
        code = main(["rag", "eval", str(index.path), str(questions), "--answers", "--answer-k", "2", "--json",
                     "--endpoint", url + "/v1", "--endpoint-model", "rag-test", "--max-tokens", "24"])
    assert code == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["retrieval"]["bm25"]["all"]["recall@1"] == 1.0
    answers = out["answers"]
    assert answers["n"] == 1 and answers["records"][0]["correct"] and answers["accuracy"] == 1.0
    assert answers["records"][0]["retrieved_relevant"]
    lo, hi = answers["accuracy_ci95"]
    assert 0 < lo < 1.0 <= hi + 1e-9  # Wilson's interval for 1 of 1
    judge = answers["judge"]
    assert judge["n"] == len(CALIBRATION) == 32 and judge["labelled_supported"] == 16
    assert judge["agreement_ci95"][0] <= judge["agreement"] <= judge["agreement_ci95"][1]
