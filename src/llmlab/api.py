"""The Python entry point: `llmlab.load(name_or_path)` gives a model you can generate, chat, stream and score with."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterator

import torch

from llmlab.checkpoint import load as checkpoint_load
from llmlab.checkpoint.load import load_checkpoint
from llmlab.checkpoint.registry import DEFAULT_MODEL
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class LLM:
    """A loaded model with its tokenizer and engine. Sampling options are SamplingParams fields as keywords."""

    def __init__(self, model, tokenizer, path: Path | None = None, compile: bool = False,
                 sampling_defaults: dict | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.engine = Engine(model, tokenizer, compile=compile)
        # what a request that does not say gets: the checkpoint's generation_config.json, the same in the CLI,
        # this API and the server (SamplingParams' own neutral defaults where the checkpoint declares nothing)
        self.sampling_defaults = dict(sampling_defaults if sampling_defaults is not None
                                      else checkpoint_load.generation_defaults(path) if path is not None else {})

    # ---- prompts -----------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: a chat (list of messages) or a user message rendered with the chat template,
        or the text as is when raw=True or the checkpoint has no template."""
        if isinstance(prompt, str) and (raw or not self.tokenizer.chat_template):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def params(self, **options) -> SamplingParams:
        """SamplingParams from keyword options over the model's sampling defaults (None means the default)."""
        unknown = set(options) - SAMPLING_FIELDS
        if unknown:
            raise LLMLabError(f"unknown sampling option {sorted(unknown)[0]!r}")
        return SamplingParams(**{**self.sampling_defaults, **{k: v for k, v in options.items() if v is not None}})

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


def load_with_adapter(base: str | Path, adapter: str | Path, merge: bool = False, dtype=None) -> LLM:
    """llmlab.load(base) with a LoRA adapter on top (merged into the weights, or kept separate)."""
    return LLM(*checkpoint_load.load_with_adapter(base, adapter, merge=merge, dtype=dtype))
