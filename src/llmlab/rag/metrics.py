"""Retrieval metrics over ranked document ids: recall@k, MRR and nDCG@k (binary relevance), and a runner that
scores an index against a JSONL of questions with their relevant document ids."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmlab.errors import LLMLabError


def recall_at_k(ranked: list[str], relevant: set[str], k: int) -> float:
    """The share of the relevant documents found among the first k."""
    return len(set(ranked[:k]) & relevant) / len(relevant)


def reciprocal_rank(ranked: list[str], relevant: set[str]) -> float:
    """1 / the rank of the first relevant document; 0 when none was retrieved."""
    for rank, doc in enumerate(ranked, start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """DCG = sum of 1 / log2(rank + 1) over relevant documents in the first k, divided by the DCG of an ideal
    ranking (all relevant documents first)."""
    dcg = sum(1.0 / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1) if doc in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def documents_ranked(chunk_doc_ids: list[str]) -> list[str]:
    """Chunk hits to a document ranking: each document at the rank of its best chunk."""
    return list(dict.fromkeys(chunk_doc_ids))


def read_questions(path: str | Path) -> list[dict]:
    """JSONL lines {"question": str, "relevant": [document ids]} (extra fields, e.g. "kind", are kept)."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such questions file: {path}")
    questions = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if (not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("relevant"), list)
                or not q["relevant"]):
            raise LLMLabError(f"{path}:{lineno}: need {{\"question\": str, \"relevant\": [at least one document id]}}")
        q["relevant"] = [str(r) for r in q["relevant"]]
        questions.append(q)
    if not questions:
        raise LLMLabError(f"{path} has no questions")
    return questions


def evaluate(index, questions: list[dict], methods=("bm25", "dense", "hybrid"), ks=(1, 5, 10),
             depth: int = 50, group_by: str | None = "kind", embedder=None) -> dict:
    """{method: {group: {"recall@k": ..., "mrr": ..., "ndcg@10": ..., "n": ...}}} with group "all" always present
    (and one group per value of each question's `group_by` field, when they have one)."""
    unknown = [m for m in methods if m not in ("bm25", "dense", "hybrid")]
    if unknown:
        raise LLMLabError(f"unknown search method {unknown[0]!r} (choose from bm25, dense, hybrid)")
    if not ks or min(ks) < 1:
        raise LLMLabError(f"recall cut-offs must be at least 1, got {list(ks)}")
    vectors = None
    if any(m != "bm25" for m in methods):  # one batched encoding instead of one call per question
        vectors = index.embedder(embedder).encode([q["question"] for q in questions])
    results = {}
    for method in methods:
        rows: dict[str, list[dict]] = {}
        for i, q in enumerate(questions):
            hits = index.search(q["question"], k=max(depth, *ks), method=method,
                                query_vector=None if vectors is None else vectors[i])
            ranked = documents_ranked([h.chunk.doc_id for h in hits])
            relevant = set(q["relevant"])
            scores = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in ks}
            scores["mrr"] = reciprocal_rank(ranked, relevant)
            scores["ndcg@10"] = ndcg_at_k(ranked, relevant, 10)
            for group in ["all"] + ([str(q[group_by])] if group_by and group_by in q else []):
                rows.setdefault(group, []).append(scores)
        results[method] = {g: {**{m: sum(r[m] for r in rs) / len(rs) for m in rs[0]}, "n": len(rs)}
                           for g, rs in rows.items()}
    return results


def format_table(results: dict) -> str:
    """A Markdown table: one row per (group, method)."""
    methods = list(results)
    groups = list(next(iter(results.values())))
    metrics = [m for m in results[methods[0]]["all"] if m != "n"]
    lines = ["| questions | method | " + " | ".join(metrics) + " |", "|---|---|" + "---:|" * len(metrics)]
    for g in groups:
        for m in methods:
            row = results[m][g]
            lines.append(f"| {g} ({row['n']}) | {m} | " + " | ".join(f"{row[x]:.3f}" for x in metrics) + " |")
    return "\n".join(lines)
