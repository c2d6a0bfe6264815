"""The retrieval index on disk: build it (incrementally), load it, search it by BM25, dense vectors or both.

An index is a directory:
    manifest.json    format, embedding model, chunking settings, every file's SHA-256 and its chunk rows
    chunks.jsonl     one chunk per line (id, document id, source, character offsets, heading, text)
    embeddings.npy   float32 unit vectors, one row per chunk
    hnsw.faiss       only past search.HNSW_THRESHOLD chunks
    bm25/            the bm25s index

It is built in a temp directory beside its destination and renamed into place when whole (llmlab.io), so a
build killed halfway leaves the previous index (or none), never a half-written one under the index's name.
Re-indexing reuses the chunks and embeddings of every file whose content hash is unchanged; BM25 is always
rebuilt, since its term statistics are global to the corpus (and it costs little next to embedding).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmlab.errors import LLMLabError
from llmlab.io import new_temp_dir, replace_dir
from llmlab.rag.chunk import CHUNK_MODES, Chunk, chunk_document
from llmlab.rag.documents import corpus_files, file_hash, read_documents
from llmlab.rag.embed import DEFAULT_EMBEDDING_MODEL, Embedder, embedding_model_name
from llmlab.rag.search import HNSW_THRESHOLD, DenseIndex, SparseIndex, reciprocal_rank_fusion

FORMAT = 1
METHODS = ("bm25", "dense", "hybrid")
FUSION_DEPTH = 50  # how many of each ranking's best enter the fusion


@dataclass
class Hit:
    chunk: Chunk
    score: float
    rank: int

    def to_dict(self) -> dict:
        return {"rank": self.rank, "chunk_id": self.chunk.chunk_id, "score": round(self.score, 6),
                **asdict(self.chunk)}


@dataclass
class BuildReport:
    files: int = 0
    reused_files: int = 0
    indexed_files: int = 0
    removed_files: int = 0
    chunks: int = 0
    embedded_chunks: int = 0
    seconds: float = 0.0
    dense_backend: str = "exact"


def build_index(paths: list[str], out: str | Path, embedding_model: str = DEFAULT_EMBEDDING_MODEL,
                chunking: str = "structure", chunk_size: int = 192, overlap: int = 32,
                hnsw_threshold: int = HNSW_THRESHOLD, embedder: Embedder | None = None) -> BuildReport:
    """Index the documents under `paths` into the directory `out`, reusing what an existing index there has for
    unchanged files. The index holds exactly the given files: files no longer given are dropped."""
    t0 = time.perf_counter()
    out = Path(out)
    files = corpus_files(paths)
    settings = {"mode": chunking, "size": chunk_size, "overlap": overlap}
    if chunking not in CHUNK_MODES:  # refused before the embedding model loads
        raise LLMLabError(f"unknown chunking mode {chunking!r} (choose from {', '.join(CHUNK_MODES)})")
    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise LLMLabError(f"chunk size must be >= 1 and overlap in [0, size), got size={chunk_size} overlap={overlap}")
    old = _reusable(out, embedding_model_name(embedding_model) if embedder is None else embedder.name, settings)
    embedder = embedder or Embedder(embedding_model)

    def spans(text):
        return embedder.tokenizer.encode(text, add_special_tokens=False).offsets

    report = BuildReport(files=len(files))
    chunks: list[Chunk] = []
    vectors: list[np.ndarray] = []
    file_entries = {}
    for f in files:
        digest = file_hash(f)
        previous = old.files.get(str(f)) if old else None
        if previous and previous["sha256"] == digest:
            rows = range(previous["first"], previous["first"] + previous["count"])
            new_chunks, new_vectors = [old.chunks[r] for r in rows], old.dense.vectors[rows.start:rows.stop]
            report.reused_files += 1
        else:
            new_chunks = [c for doc in read_documents(f)
                          for c in chunk_document(doc, spans, chunking, chunk_size, overlap)]
            new_vectors = embedder.encode([c.indexed_text for c in new_chunks])
            report.indexed_files += 1
            report.embedded_chunks += len(new_chunks)
        file_entries[str(f)] = {"sha256": digest, "first": len(chunks), "count": len(new_chunks)}
        chunks += new_chunks
        vectors.append(np.asarray(new_vectors, dtype=np.float32).reshape(-1, embedder.dim))
    if old:
        report.removed_files = len(set(old.files) - set(file_entries))
    if not chunks:
        raise LLMLabError(f"empty corpus: no text found in {len(files)} file(s) ({', '.join(paths)})")
    _check_unique_ids(chunks)
    dense = DenseIndex.build(np.concatenate(vectors), hnsw_threshold)
    report.chunks, report.dense_backend = len(chunks), dense.backend
    manifest = {"format": FORMAT, "embedding_model": embedder.name, "dim": embedder.dim, "chunking": settings,
                "chunks": len(chunks), "dense_backend": dense.backend, "files": file_entries}
    tmp = new_temp_dir(out)
    try:
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as fh:
            for c in chunks:
                fh.write(json.dumps({"id": c.chunk_id, **asdict(c)}, ensure_ascii=False) + "\n")
        dense.save(tmp)
        (tmp / "bm25").mkdir()
        SparseIndex.build([c.indexed_text for c in chunks]).save(tmp / "bm25")
        # the manifest is written last: a directory without it was never finished
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _check_unique_ids(chunks: list[Chunk]) -> None:
    seen: dict[str, str] = {}
    for c in chunks:
        if c.chunk_id in seen:
            raise LLMLabError(f"document id {c.doc_id!r} appears twice ({seen[c.chunk_id]} and {c.source}); "
                              "document ids must be unique")
        seen[c.chunk_id] = c.source


def _reusable(out: Path, embedding_model: str, settings: dict) -> "RagIndex | None":
    """The existing index at `out` if its embeddings and chunks can be reused for unchanged files."""
    if not out.exists():
        return None
    if not (out / "manifest.json").is_file():
        raise LLMLabError(f"{out} exists and is not an llmlab index: refusing to replace it")
    try:
        old = RagIndex.load(out)
    except LLMLabError:  # another format or a damaged index: rebuild it whole
        return None
    if old.manifest["embedding_model"] != embedding_model or old.manifest["chunking"] != settings:
        return None  # another model or chunking: everything is re-done
    return old


class RagIndex:
    """A loaded index. The embedding model is loaded on the first dense query only."""

    def __init__(self, path: Path, manifest: dict, chunks: list[Chunk], dense: DenseIndex, sparse: SparseIndex):
        self.path, self.manifest, self.chunks, self.dense, self.sparse = path, manifest, chunks, dense, sparse
        self.files = manifest["files"]
        self.by_id = {c.chunk_id: i for i, c in enumerate(chunks)}
        self._embedder: Embedder | None = None

    @classmethod
    def load(cls, path: str | Path) -> "RagIndex":
        path = Path(path)
        if not path.is_dir():
            raise LLMLabError(f"no index at {path} (build one with `llmlab rag index DOCS... --out {path}`)")
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise LLMLabError(f"{path} is not a complete llmlab index (no manifest.json)")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != FORMAT:
            raise LLMLabError(f"{path}: index format {manifest.get('format')!r}, this llmlab reads {FORMAT}")
        with open(path / "chunks.jsonl", encoding="utf-8") as fh:
            chunks = [Chunk(**{k: v for k, v in json.loads(line).items() if k != "id"}) for line in fh]
        dense = DenseIndex.load(path)
        if len(chunks) != manifest["chunks"] or len(dense.vectors) != len(chunks):
            raise LLMLabError(f"{path} is inconsistent: {manifest['chunks']} chunks in the manifest, {len(chunks)} "
                              f"in chunks.jsonl, {len(dense.vectors)} embeddings; rebuild it")
        return cls(path, manifest, chunks, dense, SparseIndex.load(path / "bm25"))

    def embedder(self, embedder: Embedder | None = None) -> Embedder:
        """The index's own embedding model; another one is refused (its vectors live in another space)."""
        if embedder is not None:
            if embedder.name != self.manifest["embedding_model"]:
                raise LLMLabError(f"{self.path} was built with embedding model {self.manifest['embedding_model']!r}, "
                                  f"not {embedder.name!r}: queries must use the index's model (or re-index)")
            self._embedder = embedder
        if self._embedder is None:
            self._embedder = Embedder(self.manifest["embedding_model"])
        return self._embedder

    def search(self, query: str, k: int = 5, method: str = "hybrid", embedder: Embedder | None = None,
               query_vector: np.ndarray | None = None) -> list[Hit]:
        """The k best chunks. query_vector: the query's embedding when the caller has it (batched evaluation)."""
        if method not in METHODS:
            raise LLMLabError(f"unknown search method {method!r} (choose from {', '.join(METHODS)})")
        if k < 1:
            raise LLMLabError(f"k must be at least 1, got {k}")
        if not query.strip():
            raise LLMLabError("empty query")
        depth = max(k, FUSION_DEPTH) if method == "hybrid" else k
        sparse = self.sparse.search(query, depth) if method != "dense" else []
        dense = []
        if method != "bm25":
            if query_vector is None:
                query_vector = self.embedder(embedder).encode([query])[0]
            dense = self.dense.search(query_vector, depth)
        if method == "bm25":
            ranked = sparse
        elif method == "dense":
            ranked = dense
        else:
            fused = reciprocal_rank_fusion([[self.chunks[r].chunk_id for r, _ in sparse],
                                            [self.chunks[r].chunk_id for r, _ in dense]])
            ranked = [(self.by_id[cid], score) for cid, score in fused]
        return [Hit(self.chunks[r], s, i + 1) for i, (r, s) in enumerate(ranked[:k])]
