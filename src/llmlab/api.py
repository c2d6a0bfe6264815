"""The Python entry point: `llmlab.load(name_or_path)` gives a model you can generate, chat, stream and score with."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterator

import torch

from llmlab.checkpoint.hf import PICKLE_SUFFIXES, load_hf_dir, parse_dtype, refuse_pickle
from llmlab.checkpoint.registry import DEFAULT_MODEL, resolve
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


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


class LLM:
    """A loaded model with its tokenizer and engine. Sampling options are SamplingParams fields as keywords."""

    def __init__(self, model, tokenizer, path: Path | None = None, compile: bool = False):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.engine = Engine(model, tokenizer, compile=compile)

    # ---- prompts -----------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: a chat (list of messages) or a user message rendered with the chat template,
        or the text as is when raw=True or the checkpoint has no template."""
        if isinstance(prompt, str) and (raw or not self.tokenizer.chat_template):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    @staticmethod
    def params(**options) -> SamplingParams:
        unknown = set(options) - SAMPLING_FIELDS
        if unknown:
            raise LLMLabError(f"unknown sampling option {sorted(unknown)[0]!r}")
        return SamplingParams(**options)

    # ---- generation ------------------------------------------------------------------------------------------

    def generate(self, prompt: str | list[str], raw: bool = False, **options) -> str | list[str]:
        """Complete one prompt (or several, batched); returns the text(s)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        done = self.engine.generate([self.prompt_ids(p, raw) for p in prompts], self.params(**options))
        texts = [c.text for c in done]
        return texts[0] if isinstance(prompt, str) else texts

    def complete(self, prompt: str | list[dict], raw: bool = False, **options):
        """Like generate, but returns the engine's Completion (tokens, logprobs, finish reason, counts)."""
        return self.engine.generate([self.prompt_ids(prompt, raw)], self.params(**options))[0]

    def chat(self, messages: list[dict] | str, **options) -> str:
        """The assistant's reply to a conversation [{"role": ..., "content": ...}, ...]."""
        ids = self.prompt_ids(messages if isinstance(messages, list) else [{"role": "user", "content": messages}])
        return self.engine.generate([ids], self.params(**options))[0].text

    def stream(self, prompt: str | list[dict], raw: bool = False, **options) -> Iterator[str]:
        """Text deltas of one completion as they are produced (never half a character)."""
        return self.engine.stream(self.prompt_ids(prompt, raw), self.params(**options))

    def logprobs(self, prompt: str, continuation: str) -> list[float]:
        """Log-probability of each token of `continuation` after the raw text `prompt`."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        return self.engine.logprobs(ids, self.tokenizer.encode(continuation))

    # ---- facts ---------------------------------------------------------------------------------------------

    def info(self) -> dict:
        cfg = self.model.config
        n = self.model.num_params()
        dtype = self.model.lm_head.weight.dtype
        bytes_per = torch.finfo(dtype).bits // 8
        kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per
        return {
            "path": str(self.path), "architecture": cfg.hf_model_type, "parameters": n,
            "layers": cfg.n_layers, "dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "ffn_dim": cfg.hidden_dim, "experts": cfg.n_experts,
            "vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len,
            "positions": cfg.pos_embedding if cfg.pos_embedding == "learned" else f"rope (theta {cfg.rope_theta:g})",
            "mlp": cfg.mlp, "norm": cfg.norm, "tied_embeddings": cfg.tie_embeddings, "dtype": str(dtype),
            "weights_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "kv_cache_bytes_per_token": kv_per_token,
            "chat_template": bool(self.tokenizer.chat_template),
        }

    def __repr__(self):
        return f"LLM({self.path}, {self.model.num_params() / 1e6:.1f}M params)"


def load(name_or_path: str | Path = DEFAULT_MODEL, dtype=None, compile: bool = False, int4: bool = False) -> LLM:
    """Load a model by registry name ("smollm2", pulled on first use), checkpoint directory or .gguf file.

    int4=True adds 4-bit weight copies that decode steps of up to 4 rows use (llmlab.model.quant): about 2×
    faster decoding on a CPU, exact for a Q4_1 GGUF's layers, prefill unchanged.
    """
    model, tokenizer, path = load_checkpoint(name_or_path, dtype)
    if int4:
        from llmlab.model.quant import quantize_int4
        quantize_int4(model)
    return LLM(model, tokenizer, path, compile=compile)
