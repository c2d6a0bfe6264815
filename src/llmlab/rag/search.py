"""Ranking chunks: BM25 (bm25s), dense vectors (exact numpy, or faiss HNSW for large indexes), reciprocal rank
fusion, and the ordering that keeps the best passages away from the middle of a prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Exact search multiplies the query by every stored vector and never misses; at 100,000 chunks that streams
# 154 MB of float32 per query (~10 ms at this machine's ~20 GB/s; benchmarks/rag.py measures both). Past this many chunks an HNSW graph (faiss) answers in well under a
# millisecond at a small loss of recall; below it the graph's build time and approximation buy nothing.
HNSW_THRESHOLD = 100_000
HNSW_NEIGHBOURS = 32  # M: edges per node; faiss' default efSearch of 16 is raised to this many x 4 at query time

# Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): score(d) = sum over rankings of
# 1 / (k + rank of d), ranks counted from 1. k = 60 is the paper's value; it damps the weight of the very top
# ranks so that one ranking's confident first place does not outvote agreement lower down.
RRF_K = 60


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class SparseIndex:
    """BM25 (Lucene's variant, k1=1.5, b=0.75) over chunk texts."""

    def __init__(self, retriever):
        self.retriever = retriever

    @classmethod
    def build(cls, texts: list[str]) -> "SparseIndex":
        import bm25s
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        return cls(retriever)

    def save(self, directory: Path) -> None:
        self.retriever.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: Path) -> "SparseIndex":
        import bm25s
        return cls(bm25s.BM25.load(str(directory), show_progress=False))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(row, score) best first; chunks sharing no term with the query are not ranked at all."""
        tokens = bm25_tokenize([query])[0]
        if not tokens:
            return []
        scores = self.retriever.get_scores(tokens)
        return [(i, s) for i, s in top_k(scores, k) if s > 0]


class DenseIndex:
    """Unit vectors searched by inner product (= cosine similarity)."""

    def __init__(self, vectors: np.ndarray, hnsw=None):
        self.vectors, self.hnsw = vectors, hnsw

    @classmethod
    def build(cls, vectors: np.ndarray, hnsw_threshold: int = HNSW_THRESHOLD) -> "DenseIndex":
        hnsw = None
        if len(vectors) > hnsw_threshold:
            import faiss
            hnsw = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            hnsw.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(vectors, hnsw)

    def save(self, directory: Path) -> None:
        np.save(directory / "embeddings.npy", self.vectors)
        if self.hnsw is not None:
            import faiss
            faiss.write_index(self.hnsw, str(directory / "hnsw.faiss"))

    @classmethod
    def load(cls, directory: Path) -> "DenseIndex":
        vectors = np.load(directory / "embeddings.npy", mmap_mode="r")
        hnsw = None
        if (directory / "hnsw.faiss").is_file():
            import faiss
            hnsw = faiss.read_index(str(directory / "hnsw.faiss"))
        return cls(vectors, hnsw)

    @property
    def backend(self) -> str:
        return "hnsw" if self.hnsw is not None else "exact"

    def search(self, query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self.hnsw is not None:
            self.hnsw.hnsw.efSearch = max(4 * HNSW_NEIGHBOURS, k)
            scores, rows = self.hnsw.search(query_vector[None, :].astype(np.float32), k)
            return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        return top_k(self.vectors @ query_vector, k)


def top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Rows of the k highest scores, best first (ties by row, so results are the same on every run)."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    rows = sorted(rows.tolist(), key=lambda r: (-float(scores[r]), r))
    return [(r, float(scores[r])) for r in rows]


def reciprocal_rank_fusion(rankings: list[list[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Fuse rankings of ids (best first) into one: an id in several rankings is one entry with summed scores."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        seen = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:  # an id twice in one ranking counts at its best rank only
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def order_for_context(items_best_first: list) -> list:
    """Best passages at the two ends of the context, the weakest in the middle.

    Models use the start and end of a long context best and lose what sits in the middle (Liu et al. 2023,
    "Lost in the Middle"), so ranks 1, 3, 5, ... go at the front and ..., 6, 4, 2 at the back.
    """
    front = items_best_first[0::2]
    back = items_best_first[1::2]
    return front + back[::-1]
