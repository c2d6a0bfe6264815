"""Packing documents into token shards: round trip through the shards, manifest, split, tokenizer check."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmlab.data.bios import make_bios_world
from llmlab.data.pack import load_manifest, load_shards, pack_documents, tokenizer_sha256
from llmlab.errors import LLMLabError
from llmlab.tokenizer.train import train_bpe

DOCS = list(make_bios_world(40, seed=0).biographies()) + [
    "A document that mentions <|endoftext|> literally, and ünïcödé 🙂.",
    "line one\n\nline two\twith a tab",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe(DOCS, 350, tmp_path_factory.mktemp("tok") / "tok")


def split_docs(tokens, eos_id):
    docs, cur = [], []
    for t in tokens.tolist():
        if t == eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []  # every document ends with EOS
    return docs


def test_shards_reproduce_documents(tmp_path, tok_dir):
    out = tmp_path / "packed"
    manifest = pack_documents(iter(DOCS), tok_dir, out, val_fraction=0.2, seed=1)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    decoded = []
    for split in ("train", "val"):
        tokens = load_shards(out, split, expected_tokenizer_hash=tokenizer_sha256(tok_dir))
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == manifest["tokens"][split]
        docs = split_docs(tokens, eos)
        assert len(docs) == manifest["documents"][split] > 0
        decoded += [tok.decode(d, skip_special_tokens=False) for d in docs]
    assert Counter(decoded) == Counter(DOCS)
    assert manifest == load_manifest(out)
    assert manifest["tokenizer_sha256"] == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["eos_id"] == eos and manifest["vocab_size"] == 350
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_000.bin", "val_000.bin"]
    # the split is by document and reproducible with the seed
    again = pack_documents(DOCS, tok_dir, tmp_path / "again", val_fraction=0.2, seed=1)
    assert np.array_equal(load_shards(tmp_path / "again", "val"), load_shards(out, "val"))
    assert again["documents"] == manifest["documents"]


def test_validation_never_left_empty(tmp_path, tok_dir):
    m = pack_documents(DOCS[:3], tok_dir, tmp_path / "p", val_fraction=0.01)
    assert m["documents"] == {"train": 2, "val": 1}
    m = pack_documents(DOCS[:3], tok_dir, tmp_path / "q", val_fraction=0.0)
    assert m["documents"] == {"train": 3, "val": 0}
    with pytest.raises(LLMLabError, match="no 'val' tokens"):
        load_shards(tmp_path / "q", "val")


def test_other_tokenizer_is_refused(tmp_path, tok_dir):
    pack_documents(DOCS, tok_dir, tmp_path / "p")
    other = train_bpe(DOCS[::-1], 300, tmp_path / "other")
    assert tokenizer_sha256(other) != tokenizer_sha256(tok_dir)
    with pytest.raises(LLMLabError, match="different tokenizer"):
        load_shards(tmp_path / "p", "train", expected_tokenizer_hash=tokenizer_sha256(other))


def test_bad_inputs(tmp_path, tok_dir):
    with pytest.raises(LLMLabError, match="empty corpus"):
        pack_documents([], tok_dir, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.raises(LLMLabError, match="no manifest.json"):
        load_shards(tmp_path, "train")
    with pytest.raises(LLMLabError, match="tokenizer not found"):
        pack_documents(DOCS, tmp_path / "nowhere", tmp_path / "p")
    pack_documents(DOCS, tok_dir, tmp_path / "p")
    with open(tmp_path / "p" / "train_000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(LLMLabError, match="wrong size"):
        load_shards(tmp_path / "p", "train")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["format"] == "llmlab-tokens-v1"
