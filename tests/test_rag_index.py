"""The retrieval index on real components: all-MiniLM-L6-v2 run by llmlab's encoder, bm25s, faiss HNSW."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmlab.cli.main import main
from llmlab.errors import LLMLabError
from llmlab.rag.embed import Embedder, pull_embedding_model
from llmlab.rag.index import RagIndex, build_index
from llmlab.rag.metrics import evaluate, read_questions

DOCS = {
    "paris.md": "# Paris\n\nParis is the capital and largest city of France, on the Seine.\n",
    "cats.txt": "Cats are small domesticated carnivores. They purr and hunt mice.\n",
    "python.md": "# Python\n\nPython is a programming language.\n\n## Lists\n\nA list holds items in order; "
                 "append adds one to its end.\n",
}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text)
    return d


def test_embeddings_match_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    texts = ["What is the capital of France?", "A list holds items in order. " * 40, "x",
             "Clara Dale Pemberton was born on August 13, 1982."]
    reference = st.SentenceTransformer(str(pull_embedding_model()), device="cpu").encode(texts)
    ours = embedder.encode(texts)
    # same float32 weights and ops in another order: differences are rounding, ~1e-7 measured; 1e-5 leaves room for
    # another CPU's kernels. The long text checks truncation at 256 tokens, like sentence-transformers.
    assert np.abs(ours - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_index_search_and_errors(corpus, tmp_path, embedder):
    out = tmp_path / "idx"
    report = build_index([str(corpus)], out, embedder=embedder)
    assert (report.files, report.indexed_files, report.dense_backend) == (3, 3, "exact")
    index = RagIndex.load(out)
    assert index.manifest["embedding_model"] == "all-MiniLM-L6-v2"
    for method in ("bm25", "dense", "hybrid"):
        hits = index.search("Which city is the capital of France?", k=2, method=method, embedder=embedder)
        assert hits[0].chunk.source.endswith("paris.md"), method
        assert hits[0].rank == 1
    # dense finds meaning without shared words; BM25 needs a shared term
    assert index.search("feline pets", k=1, method="dense")[0].chunk.source.endswith("cats.txt")
    assert index.search("feline pets", k=1, method="bm25") == []
    hit = index.search("append to a list", k=1, method="hybrid")[0]
    assert hit.chunk.heading == "Python > Lists"
    assert (corpus / "python.md").read_text()[hit.chunk.start:hit.chunk.end] == hit.chunk.text

    with pytest.raises(LLMLabError, match="no index at"):
        RagIndex.load(tmp_path / "missing")
    with pytest.raises(LLMLabError, match="not an llmlab index: refusing"):
        build_index([str(corpus)], corpus, embedder=embedder)  # never replace a directory that is not an index
    nested = build_index([str(corpus)], corpus / "idx", embedder=embedder)  # an index inside the corpus ...
    assert build_index([str(corpus)], corpus / "idx", embedder=embedder).files == nested.files == 3  # ... is skipped
    with pytest.raises(LLMLabError, match="not a complete llmlab index"):
        RagIndex.load(corpus)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(LLMLabError, match="empty corpus"):
        build_index([str(empty)], tmp_path / "idx2", embedder=embedder)
    assert not (tmp_path / "idx2").exists()
    with pytest.raises(LLMLabError, match="chunking mode"):
        build_index([str(corpus)], tmp_path / "idx2", chunking="sentences")


def test_query_with_another_embedding_model_is_refused(corpus, tmp_path, embedder):
    other_dir = tmp_path / "other-model"  # the same files under another name: another model as far as an index knows
    other_dir.mkdir()
    for f in pull_embedding_model().iterdir():
        if f.is_file():
            (other_dir / f.name).symlink_to(f)
    other = Embedder(str(other_dir))
    build_index([str(corpus)], tmp_path / "idx", embedder=other)
    index = RagIndex.load(tmp_path / "idx")
    assert index.manifest["embedding_model"] == str(other_dir.resolve())
    with pytest.raises(LLMLabError, match="built with embedding model"):
        index.search("cats", method="dense", embedder=embedder)
    assert index.search("cats", method="bm25", embedder=embedder)  # BM25 needs no embedding model
    # re-indexing with the default model reuses nothing: every vector is re-embedded in the new model's space
    report = build_index([str(corpus)], tmp_path / "idx", embedder=embedder)
    assert (report.reused_files, report.embedded_chunks) == (0, report.chunks)
    assert RagIndex.load(tmp_path / "idx").manifest["embedding_model"] == "all-MiniLM-L6-v2"


def test_incremental_reindex_embeds_changed_files_only(corpus, tmp_path, embedder):
    out = tmp_path / "idx"
    build_index([str(corpus)], out, embedder=embedder)
    before = RagIndex.load(out)
    old_vectors = {c.chunk_id: np.array(before.dense.vectors[i]) for i, c in enumerate(before.chunks)}
    (corpus / "cats.txt").write_text("Dogs are loyal companions that bark.\n")
    (corpus / "python.md").unlink()
    (corpus / "new.txt").write_text("The Moon orbits the Earth.\n")
    report = build_index([str(corpus)], out, embedder=embedder)
    assert (report.reused_files, report.indexed_files, report.removed_files) == (1, 2, 1)
    assert report.embedded_chunks == 2
    after = RagIndex.load(out)
    assert sorted({Path(c.source).name for c in after.chunks}) == ["cats.txt", "new.txt", "paris.md"]
    paris = next(i for i, c in enumerate(after.chunks) if c.source.endswith("paris.md"))
    np.testing.assert_array_equal(after.dense.vectors[paris], old_vectors[after.chunks[paris].chunk_id])
    assert after.search("barking dog", k=1, embedder=embedder)[0].chunk.source.endswith("cats.txt")
    # another chunking re-does every file
    assert build_index([str(corpus)], out, embedder=embedder, chunking="tokens").reused_files == 0


def test_hnsw_past_the_threshold_agrees_with_exact_search(corpus, tmp_path, embedder):
    build_index([str(corpus)], tmp_path / "exact", embedder=embedder)
    build_index([str(corpus)], tmp_path / "hnsw", embedder=embedder, hnsw_threshold=0)
    exact, hnsw = RagIndex.load(tmp_path / "exact"), RagIndex.load(tmp_path / "hnsw")
    assert (exact.dense.backend, hnsw.dense.backend) == ("exact", "hnsw")
    for query in ("capital of France", "purring animals", "list append"):
        a = [(h.chunk.chunk_id, h.score) for h in exact.search(query, k=3, method="dense", embedder=embedder)]
        b = [(h.chunk.chunk_id, h.score) for h in hnsw.search(query, k=3, method="dense", embedder=embedder)]
        assert [x for x, _ in a] == [x for x, _ in b]  # 5 vectors: the graph is exhaustive
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


KILL_MID_BUILD = """
import os, signal, sys
import llmlab.rag.index as index
def die(texts):  # the chunks and embeddings are in the temp directory, the BM25 index and manifest are not
    os.kill(os.getpid(), signal.SIGKILL)
index.SparseIndex.build = die
index.build_index([sys.argv[1]], sys.argv[2])
"""


def test_a_build_killed_midway_never_leaves_a_half_index(corpus, tmp_path, embedder):
    out = tmp_path / "idx"
    build_index([str(corpus)], out, embedder=embedder)
    (corpus / "new.txt").write_text("The Moon orbits the Earth.\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_BUILD, str(corpus), str(out)], env=env)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".idx.")]
    assert leftovers and (leftovers[0] / "embeddings.npy").is_file()  # it was killed mid-write
    with pytest.raises(LLMLabError, match="not a complete"):
        RagIndex.load(leftovers[0])
    index = RagIndex.load(out)  # the previous index, whole
    assert len(index.chunks) == 4 and not any(c.source.endswith("new.txt") for c in index.chunks)
    build_index([str(corpus)], out, embedder=embedder)
    assert any(c.source.endswith("new.txt") for c in RagIndex.load(out).chunks)


def test_cli_index_search_eval(corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["rag", "index", str(corpus), "--out", str(out)]) == 0
    assert "3 file(s)" in capsys.readouterr().out
    assert main(["rag", "search", str(out), "capital of France", "-k", "1", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["source"].endswith("paris.md") and hits[0]["chunk_id"].startswith(str(corpus / "paris.md"))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What do cats hunt?", "relevant": [str(corpus / "cats.txt")]}) + "\n")
    assert main(["rag", "eval", str(out), str(questions), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["hybrid"]["all"]["recall@1"] == 1.0 and results["bm25"]["all"]["mrr"] == 1.0
    assert main(["rag", "search", str(tmp_path / "nope"), "x"]) == 2
    assert "no index at" in capsys.readouterr().err
    assert main(["rag", "eval", str(out), str(questions), "--methods", "bm42"]) == 2
    assert main(["rag", "index", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2


def test_bios_evalset(tmp_path, capsys, embedder):
    assert main(["rag", "evalset", "--people", "20", "--out", str(tmp_path / "ev")]) == 0
    build_index([str(tmp_path / "ev" / "corpus")], tmp_path / "idx", embedder=embedder)
    questions = read_questions(tmp_path / "ev" / "questions.jsonl")
    results = evaluate(RagIndex.load(tmp_path / "idx"), questions, embedder=embedder)
    assert results["bm25"]["name"]["n"] == 20 and results["bm25"]["attribute"]["n"] == 20
    # gold answers for `rag eval --answers`: the attribute's value, or the people who match
    assert all(q["answers"] and (q["kind"] == "name" or q["answers"] == q["relevant"]) for q in questions)
    for method in ("bm25", "hybrid"):  # the full name is in the question and in one biography
        assert results[method]["name"]["recall@1"] == 1.0, method
    assert results["dense"]["name"]["recall@5"] >= 0.9
