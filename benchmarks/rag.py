"""Retrieval speed: indexing throughput (chunks/s) and query latency, llmlab against plain peers in one run.

    python benchmarks/rag.py [--docs 2000] [--queries 200] [--rounds 3] [--vectors 100000]

Sparse: llmlab's BM25 (bm25s) against rank_bm25's BM25Okapi on the same tokens. Embedding: llmlab's own BERT
encoder against sentence-transformers (when installed) on the same all-MiniLM-L6-v2 weights, batch 32. Dense
search: exact numpy against faiss HNSW on random unit vectors, to check the size where llmlab switches
(llmlab.rag.search.HNSW_THRESHOLD). Corpus: bios-world biographies (no download). Best of `rounds` for each
timing. Prints a table with ratios and writes benchmarks/results/rag.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "rag.json"


def best_time(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def corpus(n_docs: int, n_queries: int) -> tuple[list[str], list[str]]:
    from llmlab.rag.evalset import bios_evalset
    docs, questions = bios_evalset(n_people=n_docs, seed=0)
    return [d["text"] for d in docs], [q["question"] for q in questions[:n_queries]]


def bench_sparse(texts, queries, rounds) -> dict:
    from rank_bm25 import BM25Okapi

    from llmlab.rag.search import SparseIndex, bm25_tokenize

    # both sides start from raw text with the same tokenizer (bm25s': lowercase, words, English stopwords)
    ours = SparseIndex.build(texts)
    peer = BM25Okapi(bm25_tokenize(texts))

    def peer_search(q):
        return np.argsort(-peer.get_scores(bm25_tokenize([q])[0]))[:10]
    return {
        "index_chunks_per_s": {"llmlab (bm25s)": len(texts) / best_time(lambda: SparseIndex.build(texts), rounds),
                               "rank_bm25": len(texts) / best_time(lambda: BM25Okapi(bm25_tokenize(texts)), rounds)},
        "query_ms": {"llmlab (bm25s)": 1000 * best_time(lambda: [ours.search(q, 10) for q in queries], rounds) / len(queries),
                     "rank_bm25": 1000 * best_time(lambda: [peer_search(q) for q in queries], rounds) / len(queries)},
    }


def bench_embedding(texts, queries, rounds) -> dict:
    from llmlab.rag.embed import Embedder, pull_embedding_model

    ours = Embedder(batch_size=32)
    out = {"index_chunks_per_s": {"llmlab encoder": len(texts) / best_time(lambda: ours.encode(texts), rounds)},
           "query_ms": {"llmlab encoder": 1000 * best_time(lambda: [ours.encode([q]) for q in queries], rounds) / len(queries)}}
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers is not installed: no embedding peer")
        return out
    peer = SentenceTransformer(str(pull_embedding_model()), device="cpu")
    out["index_chunks_per_s"]["sentence-transformers"] = len(texts) / best_time(
        lambda: peer.encode(texts, batch_size=32), rounds)
    out["query_ms"]["sentence-transformers"] = 1000 * best_time(
        lambda: [peer.encode([q]) for q in queries], rounds) / len(queries)
    return out


def bench_dense_search(n_vectors: int, n_queries: int, rounds: int) -> dict:
    from llmlab.rag.search import DenseIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_vectors, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(n_vectors, n_queries)] + 0.1 * rng.standard_normal((n_queries, 384)).astype(np.float32)
    exact = DenseIndex.build(vectors, hnsw_threshold=n_vectors)
    t0 = time.perf_counter()
    hnsw = DenseIndex.build(vectors, hnsw_threshold=0)
    build_s = time.perf_counter() - t0
    truth = [exact.search(q, 10) for q in queries]
    found = [hnsw.search(q, 10) for q in queries]
    recall = np.mean([len({r for r, _ in a} & {r for r, _ in b}) / 10 for a, b in zip(truth, found)])
    return {"vectors": n_vectors, "hnsw_build_s": build_s, "hnsw_recall@10": float(recall),
            "query_ms": {"exact numpy": 1000 * best_time(lambda: [exact.search(q, 10) for q in queries], rounds) / n_queries,
                         "faiss HNSW": 1000 * best_time(lambda: [hnsw.search(q, 10) for q in queries], rounds) / n_queries}}


def bench_build(texts, rounds) -> dict:
    from llmlab.rag.embed import Embedder
    from llmlab.rag.index import build_index

    embedder = Embedder()
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        docs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))

        def build():
            out = Path(tmp) / "idx"
            build_index([str(docs)], out, embedder=embedder, chunking="tokens")
            docs.write_text(docs.read_text() + "\n")  # a changed file: the next round re-embeds everything
        return {"chunks_per_s": len(texts) / best_time(build, rounds)}


def table(name: str, rows: dict, unit: str, higher_is_better: bool) -> str:
    base = list(rows.values())[-1]
    lines = [f"{name} ({unit})"]
    for engine, value in rows.items():
        ratio = value / base if higher_is_better else base / value
        lines.append(f"  {engine:24s} {value:12.2f}   {ratio:5.2f}x")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    texts, queries = corpus(args.docs, args.queries)
    results = {"docs": len(texts), "queries": len(queries)}
    results["sparse"] = bench_sparse(texts, queries, args.rounds)
    results["embedding"] = bench_embedding(texts, queries, args.rounds)
    results["dense_search"] = bench_dense_search(args.vectors, args.queries, args.rounds)
    results["build"] = bench_build(texts, 1)
    for part in ("sparse", "embedding"):
        print(table(f"{part} indexing", results[part]["index_chunks_per_s"], "chunks/s, ratio vs the last row", True))
        print(table(f"{part} query", results[part]["query_ms"], "ms per query, speed ratio vs the last row", False))
    d = results["dense_search"]
    print(table(f"dense search over {d['vectors']:,} vectors", d["query_ms"], "ms per query, speed ratio", False))
    print(f"  HNSW build {d['hnsw_build_s']:.1f} s, recall@10 against exact {d['hnsw_recall@10']:.3f}")
    print(f"full index build (chunk + embed + BM25 + write): {results['build']['chunks_per_s']:.1f} chunks/s")
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
