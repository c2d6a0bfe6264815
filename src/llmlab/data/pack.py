"""Tokenize documents into flat token shards (numpy memmaps) for pretraining, with a manifest tying them to a tokenizer.

Layout of an output directory:
    train_000.bin, val_000.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids; each document's
                                 tokens are followed by the EOS id, so documents are separated by EOS
    manifest.json                dtype, vocab size, EOS id, token and document counts per shard, and the SHA-256
                                 of the tokenizer.json bytes (shards only make sense with that exact tokenizer)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text, new_temp_dir, replace_dir

MANIFEST = "manifest.json"
FORMAT = "llmlab-tokens-v1"


def tokenizer_json_path(tokenizer: str | Path) -> Path:
    """Accept a tokenizer directory (with tokenizer.json) or the tokenizer.json file itself."""
    p = Path(tokenizer)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise LLMLabError(f"tokenizer not found: {p}")
    return p


def tokenizer_sha256(tokenizer: str | Path) -> str:
    return hashlib.sha256(tokenizer_json_path(tokenizer).read_bytes()).hexdigest()


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise LLMLabError(f"cannot load tokenizer {path}: {e}") from None
    # A document that happens to contain the text "<|endoftext|>" must not turn into a real EOS token.
    tok.encode_special_tokens = True
    return tok


class _ShardWriter:
    """Appends token arrays to a temp file; `close` renames it into place (or deletes it if empty)."""

    def __init__(self, directory: Path, name: str, dtype):
        self.final, self.tmp = directory / name, directory / f".{name}.tmp"
        self.f = open(self.tmp, "wb")
        self.dtype, self.tokens, self.docs, self.last_len = dtype, 0, 0, 0

    def write(self, ids: np.ndarray) -> None:
        self.f.write(ids.astype(self.dtype).tobytes())
        self.tokens += len(ids)
        self.docs += 1
        self.last_len = len(ids)

    def pop_last(self) -> np.ndarray:
        """Remove and return the last document written (used to make sure validation is not empty)."""
        self.f.flush()
        n = self.last_len
        itemsize = np.dtype(self.dtype).itemsize
        with open(self.tmp, "rb") as r:
            r.seek((self.tokens - n) * itemsize)
            ids = np.frombuffer(r.read(n * itemsize), dtype=self.dtype)
        self.f.truncate((self.tokens - n) * itemsize)
        self.f.seek(0, os.SEEK_END)
        self.tokens -= n
        self.docs -= 1
        self.last_len = 0
        return ids

    def close(self) -> dict | None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if self.tokens == 0:
            self.tmp.unlink()
            return None
        os.replace(self.tmp, self.final)
        return {"file": self.final.name, "tokens": self.tokens, "documents": self.docs}


def pack_documents(texts: Iterable[str], tokenizer: str | Path, out_dir: str | Path, val_fraction: float = 0.05,
                   seed: int = 0, eos_token: str = "<|endoftext|>", batch_size: int = 256) -> dict:
    """Tokenize `texts` (streamed) into train/val shards in `out_dir`; returns the manifest.

    Each document goes to validation with probability `val_fraction` (seeded, decided per document, so a
    document never straddles the split). If none landed there, the last training document is moved over.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LLMLabError(f"val fraction must be in [0, 1), got {val_fraction}")
    tok_path = tokenizer_json_path(tokenizer)
    tok = _load_tokenizer(tok_path)
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise LLMLabError(f"tokenizer {tok_path} has no {eos_token!r} token to separate documents")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32  # ids are < vocab_size

    out_dir = Path(out_dir)
    tmp = new_temp_dir(out_dir)
    try:
        writers = {s: _ShardWriter(tmp, f"{s}_000.bin", dtype) for s in ("train", "val")}
        rng = random.Random(seed)
        eos = np.array([eos_id], dtype=np.int64)

        def flush(batch: list[str]):
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                split = "val" if rng.random() < val_fraction else "train"
                writers[split].write(np.concatenate([np.asarray(enc.ids, dtype=np.int64), eos]))

        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        total_docs = writers["train"].docs + writers["val"].docs
        if total_docs == 0:
            raise LLMLabError("empty corpus: no documents to pack")
        if val_fraction > 0 and writers["val"].docs == 0 and writers["train"].docs > 1:
            writers["val"].write(writers["train"].pop_last())
        shards = []
        for split, w in writers.items():
            info = w.close()
            if info is not None:
                shards.append({"split": split, **info})
        manifest = {
            "format": FORMAT,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "eos_token": eos_token,
            "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(),
            "val_fraction": val_fraction,
            "seed": seed,
            "shards": shards,
            "tokens": {s: sum(x["tokens"] for x in shards if x["split"] == s) for s in ("train", "val")},
            "documents": {s: sum(x["documents"] for x in shards if x["split"] == s) for s in ("train", "val")},
        }
        # the manifest is written last: a directory without one is an unfinished pack
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise LLMLabError(f"{shard_dir}: no {MANIFEST} (not a packed token directory, or packing did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LLMLabError(f"cannot read {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise LLMLabError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def load_shards(shard_dir: str | Path, split: str = "train", expected_tokenizer_hash: str | None = None) -> np.memmap:
    """The tokens of one split as a read-only memmap (nothing is read into memory until indexed).

    With `expected_tokenizer_hash` (see tokenizer_sha256), shards packed with a different tokenizer are refused:
    their ids would mean different tokens to the model.
    """
    manifest = load_manifest(shard_dir)
    if expected_tokenizer_hash is not None and manifest["tokenizer_sha256"] != expected_tokenizer_hash:
        raise LLMLabError(
            f"{shard_dir}: shards were packed with a different tokenizer (tokenizer.json sha256 "
            f"{manifest['tokenizer_sha256'][:12]}…, expected {expected_tokenizer_hash[:12]}…); re-pack with this tokenizer")
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise LLMLabError(f"{shard_dir}: no {split!r} tokens (splits present: "
                          f"{sorted({s['split'] for s in manifest['shards']})})")
    if len(shards) > 1:
        raise LLMLabError(f"{shard_dir}: {len(shards)} {split} shards; this llmlab version reads one per split")
    s = shards[0]
    path = Path(shard_dir) / s["file"]
    dtype = np.dtype(manifest["dtype"])
    if not path.is_file() or path.stat().st_size != s["tokens"] * dtype.itemsize:
        raise LLMLabError(f"{path}: missing or wrong size (manifest says {s['tokens']} {dtype.name} tokens)")
    return np.memmap(path, dtype=dtype, mode="r")
