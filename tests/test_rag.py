"""Retrieval pieces that need no model: chunking, fusion, context ordering, metrics against hand-computed values."""

import json
import math

import numpy as np
import pytest

from llmlab.errors import LLMLabError
from llmlab.rag.chunk import Document, chunk_document, sections, whitespace_spans
from llmlab.rag.documents import corpus_files, read_documents
from llmlab.rag.metrics import documents_ranked, ndcg_at_k, read_questions, recall_at_k, reciprocal_rank
from llmlab.rag.search import order_for_context, reciprocal_rank_fusion, top_k

MARKDOWN = """Intro line before any heading.

# Install

Run pip install.

## Linux

Needs Python 3.11.

Second paragraph on Linux.

# Use

""" + " ".join(f"w{i}" for i in range(25)) + "\n"


def test_token_windows_overlap_and_offsets():
    text = " ".join(f"word{i}" for i in range(10))
    chunks = chunk_document(Document("d", "d.txt", text), whitespace_spans, mode="tokens", size=4, overlap=1)
    assert [c.text.split() for c in chunks] == [[f"word{i}" for i in r] for r in ([0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9])]
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert c.chunk_id == f"d:{c.start}-{c.end}"


def test_token_windows_refuse_bad_sizes():
    doc = Document("d", "d.txt", "a b c")
    with pytest.raises(LLMLabError, match="overlap"):
        chunk_document(doc, whitespace_spans, mode="tokens", size=4, overlap=4)
    with pytest.raises(LLMLabError, match="chunking mode"):
        chunk_document(doc, whitespace_spans, mode="sentences")


def test_markdown_structure_chunks():
    doc = Document("guide.md", "guide.md", MARKDOWN)
    chunks = chunk_document(doc, whitespace_spans, mode="structure", size=10, overlap=2)
    got = [(c.heading, c.text.split()[:2]) for c in chunks]
    assert got[:4] == [("", ["Intro", "line"]), ("Install", ["Run", "pip"]),
                       ("Install > Linux", ["Needs", "Python"]), ("Use", ["w0", "w1"])]
    # the two short Linux paragraphs share a chunk; the 25-word paragraph is cut into overlapping windows
    assert chunks[2].text == "Needs Python 3.11.\n\nSecond paragraph on Linux."
    assert [c.text.split()[0] for c in chunks[3:]] == ["w0", "w8", "w16"]
    assert all(MARKDOWN[c.start:c.end] == c.text for c in chunks)
    assert chunks[2].indexed_text.startswith("Install > Linux\n")
    again = chunk_document(doc, whitespace_spans, mode="structure", size=10, overlap=2)
    assert [c.chunk_id for c in again] == [c.chunk_id for c in chunks]  # stable across runs


def test_sections_skip_headings_and_track_levels():
    text = "# A\n### C\nx\n# B\ny"
    assert [(text[s:e].strip(), h) for s, e, h in sections(text)] == [("x", "A > C"), ("y", "B")]


def test_rrf_worked_example():
    # k = 60: a = 1/61 + 1/62, c = 1/63 + 1/61, b = 1/62, d = 1/63
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60)
    assert [x for x, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 61 + 1 / 63)
    assert fused[3][1] == pytest.approx(1 / 63)
    # an id listed twice in one ranking counts once, at its best rank
    assert dict(reciprocal_rank_fusion([["a", "a", "b"]]))["a"] == pytest.approx(1 / 61)


def test_best_passages_go_to_the_edges():
    assert order_for_context([1, 2, 3, 4, 5, 6]) == [1, 3, 5, 6, 4, 2]
    assert order_for_context([1, 2, 3]) == [1, 3, 2]
    assert order_for_context([]) == []


def test_top_k_is_deterministic_on_ties():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5])
    assert top_k(scores, 3) == [(1, 0.9), (0, 0.5), (2, 0.5)]
    assert [r for r, _ in top_k(scores, 10)] == [1, 0, 2, 4, 3]


def test_metrics_against_hand_computed_values():
    ranked = ["d1", "d2", "d3", "d4"]
    relevant = {"d2", "d4"}
    assert recall_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 2) == 0.5
    assert recall_at_k(ranked, relevant, 4) == 1.0
    assert reciprocal_rank(ranked, relevant) == 0.5
    assert reciprocal_rank(["x"], relevant) == 0.0
    # DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068; ideal = 1 + 1/log2(3) = 1.63093
    assert ndcg_at_k(ranked, relevant, 10) == pytest.approx((0.630930 + 0.430677) / 1.630930, abs=1e-6)
    assert ndcg_at_k(["d2", "d4"], relevant) == 1.0
    assert ndcg_at_k(["a"] * 10 + ["d2"], relevant, 10) == 0.0  # past the cut-off
    assert ndcg_at_k(["x", "d2"], {"d2"}) == pytest.approx(1 / math.log2(3))
    assert documents_ranked(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_read_questions_errors(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "q?", "relevant": ["a", 1]}\n\n')
    assert read_questions(f) == [{"question": "q?", "relevant": ["a", "1"]}]
    f.write_text('{"question": "q?", "relevant": []}\n')
    with pytest.raises(LLMLabError, match="q.jsonl:1"):
        read_questions(f)
    f.write_text("")
    with pytest.raises(LLMLabError, match="no questions"):
        read_questions(f)
    with pytest.raises(LLMLabError, match="no such questions file"):
        read_questions(tmp_path / "missing.jsonl")


def test_documents_from_files(tmp_path):
    (tmp_path / "a.md").write_text("# T\nhello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x", "text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("hidden")
    files = corpus_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.md", "b.jsonl"]
    docs = read_documents(files[1])
    assert [(d.doc_id, d.text) for d in docs] == [("x", "one"), (f"{files[1]}:2", "two")]
    with pytest.raises(LLMLabError, match="cannot index .bin"):
        corpus_files([str(tmp_path / "skip.bin")])
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(LLMLabError, match="bad.jsonl:1"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(LLMLabError, match="no such file"):
        corpus_files([str(tmp_path / "nope")])
