"""Load any checkpoint llmlab reads (registry name, HF directory, .gguf file) as (model, tokenizer, path)."""

from __future__ import annotations

from pathlib import Path

from llmlab.checkpoint.hf import PICKLE_SUFFIXES, load_hf_dir, parse_dtype, refuse_pickle
from llmlab.checkpoint.registry import DEFAULT_MODEL, SAMPLING_KEYS, generation_defaults, resolve  # noqa: F401
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer


def load_checkpoint(name_or_path: str | Path = DEFAULT_MODEL, dtype=None):
    """(model, tokenizer, path) for a registry name, a checkpoint directory or a .gguf file."""
    if Path(name_or_path).suffix in PICKLE_SUFFIXES and Path(name_or_path).is_file():
        refuse_pickle(Path(name_or_path))
    path = resolve(name_or_path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").is_file():
        path = path / "model"  # a run directory (e.g. of `llmlab speedrun`): its model
    if path.suffix == ".gguf":
        from llmlab.checkpoint.gguf import load_gguf
        model, tokenizer, _ = load_gguf(path, dtype=parse_dtype(dtype))
    else:
        model = load_hf_dir(path, dtype=dtype)
        if not (path / "tokenizer.json").exists():
            raise LLMLabError(f"{path} has no tokenizer.json")
        tokenizer = Tokenizer.from_dir(path)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise LLMLabError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; they do not belong together")
    return model, tokenizer, path


def load_with_adapter(base: str | Path, adapter: str | Path, merge: bool = False, dtype=None):
    """(model, tokenizer, path) of `base` with a LoRA adapter on top (merged into the weights, or kept separate)."""
    from llmlab.model.lora import load_adapter, merge_lora

    model, tokenizer, path = load_checkpoint(base, dtype)
    load_adapter(model, adapter)
    if merge:
        merge_lora(model)
    return model.eval(), tokenizer, path
