"""Retrieval with a model: an LLM reranker and answers grounded in retrieved passages, with citations.

Both go through llmlab.client, so they run on the in-process model and on any OpenAI-compatible endpoint.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from llmlab.client import GenParams, ModelClient
from llmlab.errors import LLMLabError
from llmlab.rag.index import Hit, RagIndex
from llmlab.rag.search import order_for_context

RERANK_PROMPT = ("Passage:\n{passage}\n\nQuestion: {question}\n\n"
                 "Does the passage answer the question? Answer Yes or No.")
QUESTION_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
RERANK_SCORERS = ("yes", "question")
ANSWER_PROMPT = ("Answer the question using only the numbered passages below. After each fact, cite the "
                 "passage it comes from by its number in square brackets, like [1]. If the passages do not "
                 "contain the answer, say that you do not know.\n\n{passages}\n\nQuestion: {question}")
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")  # [2] or [1, 3]


def _as_prompt(client: ModelClient, user_text: str) -> str:
    """The raw text a chat model sees for this user message (plain text for a model without a template)."""
    rendered = client.chat_text(user_text)
    return rendered if rendered is not None else user_text + "\nAnswer:"


def rerank(client: ModelClient, question: str, hits: list[Hit], scorer: str = "question") -> list[Hit]:
    """Hits re-ordered by the model.

    scorer="yes": the model's belief that the passage answers the question, log P(Yes) - log(P(Yes) + P(No))
    for the answer's first word: the likelihood of "Yes" normalised against "No", so that a model's general taste
    for one word does not decide. scorer="question": the mean log-likelihood per token of the question given the
    passage (query likelihood, as in UPR, Sachan et al. 2022): pure language modelling, which a small model
    does better than judging. Measured with SmolLM2-135M on 16 bios questions, reranking dense retrieval's top 4:
    top-1 accuracy 0.75 with "question", 0.125 with "yes", 0.625 without reranking; hence the default."""
    if scorer not in RERANK_SCORERS:
        raise LLMLabError(f"unknown rerank scorer {scorer!r} (choose from {', '.join(RERANK_SCORERS)})")
    if not hits:
        return []
    scored = []
    if scorer == "yes":
        prompts = [_as_prompt(client, RERANK_PROMPT.format(passage=h.chunk.text, question=question)) for h in hits]
        logliks = client.loglikelihood([(p, word) for p in prompts for word in ("Yes", "No")])
        for i, h in enumerate(hits):
            yes, no = logliks[2 * i].logprob, logliks[2 * i + 1].logprob
            scored.append(Hit(h.chunk, yes - _logaddexp(yes, no), 0))
    else:
        logliks = client.loglikelihood([(QUESTION_PROMPT.format(passage=h.chunk.text), " " + question) for h in hits])
        scored = [Hit(h.chunk, ll.logprob / ll.n_tokens, 0) for h, ll in zip(hits, logliks)]
    scored.sort(key=lambda h: -h.score)  # stable: ties keep the retriever's order
    for rank, h in enumerate(scored, start=1):
        h.rank = rank
    return scored


def _logaddexp(a: float, b: float) -> float:
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


@dataclass
class Answer:
    question: str
    text: str  # the model's answer with [n] replaced by [chunk id]
    raw_text: str  # the model's own words, with its [n] markers
    passages: list[Hit]  # in the order they were shown to the model
    cited: list[str] = field(default_factory=list)  # chunk ids the answer cites, in order of first citation
    invalid_citations: list[int] = field(default_factory=list)  # numbers that name no passage

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "cited": self.cited,
                "invalid_citations": self.invalid_citations,
                "passages": [{"n": n, **h.to_dict()} for n, h in enumerate(self.passages, start=1)]}


def ask(index: RagIndex, client: ModelClient, question: str, k: int = 4, method: str = "hybrid",
        rerank_candidates: int = 0, max_tokens: int = 200, seed: int | None = None,
        rerank_scorer: str = "question") -> Answer:
    """Retrieve, optionally rerank the best `rerank_candidates`, put the best passages at the edges of the
    context, and generate an answer that cites passages by number; the numbers become chunk ids."""
    return ask_many(index, client, [question], k, method, rerank_candidates, max_tokens, seed, rerank_scorer)[0]


def ask_many(index: RagIndex, client: ModelClient, questions: list[str], k: int = 4, method: str = "hybrid",
             rerank_candidates: int = 0, max_tokens: int = 200, seed: int | None = None,
             rerank_scorer: str = "question", query_vectors=None) -> list[Answer]:
    """ask() for many questions, their answers generated in one client call (the in-process model batches them).
    query_vectors: the questions' embeddings when the caller has them."""
    if rerank_candidates and rerank_candidates < k:
        raise LLMLabError(f"--rerank {rerank_candidates} must be at least k={k} (it picks the k best of that many)")
    shown_lists, prompts = [], []
    for i, question in enumerate(questions):
        hits = index.search(question, k=max(k, rerank_candidates), method=method,
                            query_vector=None if query_vectors is None else query_vectors[i])
        if rerank_candidates:
            hits = rerank(client, question, hits, rerank_scorer)
        shown = order_for_context(hits[:k])
        shown_lists.append(shown)
        prompts.append(answer_prompt(question, shown))
    generations = client.generate(prompts, GenParams(max_tokens=max_tokens, temperature=0, seed=seed))
    answers = []
    for question, shown, g in zip(questions, shown_lists, generations):
        raw = g.text.strip()
        text, cited, invalid = resolve_citations(raw, [h.chunk.chunk_id for h in shown])
        answers.append(Answer(question, text, raw, shown, cited, invalid))
    return answers


def answer_prompt(question: str, shown: list[Hit]) -> str:
    """The numbered passages and the question, as the model is asked to answer them."""
    passages = "\n\n".join(f"[{n}] {h.chunk.indexed_text}" for n, h in enumerate(shown, start=1))
    return ANSWER_PROMPT.format(passages=passages, question=question)


def resolve_citations(raw: str, shown_ids: list[str]) -> tuple[str, list[str], list[int]]:
    """The answer with each [n] replaced by [chunk id of passage n], the chunk ids cited (in order of first
    citation) and the numbers that name no passage (left as they are)."""
    cited, invalid = [], []

    def to_chunk_ids(m):
        numbers = [int(x) for x in m.group(1).split(",")]
        bad = [n for n in numbers if not 1 <= n <= len(shown_ids)]
        if bad:
            invalid.extend(bad)
            return m.group(0)
        ids = [shown_ids[n - 1] for n in numbers]
        cited.extend(i for i in dict.fromkeys(ids) if i not in cited)
        return "[" + ", ".join(ids) + "]"

    return CITATION.sub(to_chunk_ids, raw), cited, invalid
