"""The Python entry point: `llmlab.load(name_or_path)` gives a model you can generate, chat, stream and score with."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import torch

from llmlab.checkpoint import load as checkpoint_load
from llmlab.checkpoint.hf import parse_dtype
from llmlab.checkpoint.load import load_checkpoint
from llmlab.checkpoint.registry import DEFAULT_MODEL
from llmlab.engine import Engine, SamplingParams
from llmlab.engine.native.library import return_freed_memory
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class LLM:
    """A loaded model with its tokenizer and engine. Sampling options are SamplingParams fields as keywords."""

    def __init__(self, model, tokenizer, path: Path | None = None, compile: bool = False,
                 sampling_defaults: dict | None = None, native_step=None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.engine = Engine(model, tokenizer, compile=compile, native_step=native_step)
        # what a request that does not say gets: the checkpoint's generation_config.json, the same in the CLI,
        # this API and the server (SamplingParams' own neutral defaults where the checkpoint declares nothing)
        self.sampling_defaults = dict(sampling_defaults if sampling_defaults is not None
                                      else checkpoint_load.generation_defaults(path) if path is not None else {})

    # ---- prompts -----------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: a chat (list of messages) or a user message rendered with the chat template,
        or the text as is when raw=True or the checkpoint has no template."""
        return self.tokenizer.prompt_ids(prompt, raw)

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

    def save_quantized(self, path: str | Path) -> Path:
        """Write the model with 4-bit projections (8-bit head) as an HF-layout directory whose config.json has a
        `quantization_config` (llmlab.engine.native.packed); llmlab.load reads it back packed. A dense model
        is packed on a copy (min/max groups of 32, as Q4_1)."""
        import copy

        from llmlab.engine.native import NativeDecoder, NativeLinear, free_dense_weights
        from llmlab.engine.native.packed import save_quantized

        model = self.model
        if not any(isinstance(m, NativeLinear) for m in model.modules()):
            model = copy.deepcopy(model)
            free_dense_weights(model, NativeDecoder(model))
        return save_quantized(model, path, self.tokenizer, self.sampling_defaults)

    # ---- facts ---------------------------------------------------------------------------------------------

    def info(self) -> dict:
        cfg = self.model.config
        n, weights_bytes = weight_counts(self.model)
        dtype = self.model.model.norm.weight.dtype
        bits = sorted({m.packed.bits for m in self.model.modules() if hasattr(m, "packed")})
        # what the weights are held as: packed projections (the native kernel's) and dense tensors (norms, ...)
        storage = f"{' and '.join(f'{b}-bit' for b in bits)} packed, the rest {dtype}" if bits else str(dtype)
        bytes_per = torch.finfo(self.model.kv_dtype or dtype).bits // 8  # (the native step's cache: fp16)
        tensors = 3 if getattr(self.model, "self_extend", None) else 2  # keys, values (and Self-Extend's far keys)
        kv_per_token = tensors * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per
        return {
            "path": str(self.path), "architecture": cfg.hf_model_type, "parameters": n,
            "layers": cfg.n_layers, "dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "ffn_dim": cfg.hidden_dim, "experts": cfg.n_experts,
            "vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len,
            "positions": cfg.pos_embedding if cfg.pos_embedding == "learned" else f"rope (theta {cfg.rope_theta:g})",
            "mlp": cfg.mlp, "norm": cfg.norm, "tied_embeddings": cfg.tie_embeddings, "dtype": str(dtype),
            "weights_bytes": weights_bytes, "weights_storage": storage,
            "kv_cache_bytes_per_token": kv_per_token,
            "chat_template": bool(self.tokenizer.chat_template),
        }

    def __repr__(self):
        return f"LLM({self.path}, {weight_counts(self.model)[0] / 1e6:.1f}M params)"


def weight_counts(model) -> tuple[int, int]:
    """(weights, bytes in memory) of a model, counting packed projections (llmlab.engine.native) once each."""
    n = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = {id(m.packed): m.packed for m in model.modules() if hasattr(m, "packed")}
    for p in packed.values():
        n += p.out_features * p.in_features
        size += sum(t.numel() * t.element_size() for t in (p.q, p.d, p.m) + ((p.bias,) if p.bias is not None else ()))
    return n, size


def load(name_or_path: str | Path = DEFAULT_MODEL, dtype=None, compile: bool = False, int4: bool = False,
         exact: bool = False, announce: bool = True, rope_scaling: str | None = None,
         self_extend: str | None = None) -> LLM:
    """Load a model by registry name ("smollm2", pulled on first use), checkpoint directory or .gguf file.

    By default the fastest path that keeps quality: a checkpoint already stored in 4 or 8 bits (a Q4_0/Q4_1/
    Q8_0 GGUF, exactly; other quantized GGUF types re-packed; a quantized llmlab checkpoint) is read packed
    and decodes with the native kernel on those weights (llmlab.engine.native), never holding an fp32 copy;
    anything else decodes in fp32. exact=True is fp32 eager everywhere (parity work). int4=True adds PyTorch
    4-bit copies for decode steps of up to 4 rows (llmlab.model.quant) and compile=True torch.compiles the
    decode step; either replaces the default. One line on stderr says what was chosen (announce=False: none).

    A longer context than the checkpoint's (llmlab.model.rope, llmlab.model.self_extend): rope_scaling="yarn:4"
    (linear, ntk or yarn, by a factor) rescales RoPE, on the native kernel too (its frequencies and YaRN's
    attention factor); self_extend="4,1024" (GROUP,WINDOW) swaps in Self-Extend attention, on the native kernel
    too (each key also cached at its grouped position).
    """
    if exact and (int4 or compile):
        raise LLMLabError("exact means fp32 eager decoding: it cannot be combined with int4 or compile")
    if self_extend and (int4 or compile):
        raise LLMLabError("Self-Extend runs its own attention in eager fp32 or bf16: it cannot be combined with "
                          "int4 or compile")
    context = parse_context_options(rope_scaling, self_extend)  # bad specs fail before the model loads
    fast = None
    if not (exact or int4 or compile) and parse_dtype(dtype) == torch.float32:
        fast = load_packed(name_or_path)
    if fast is not None:
        (model, tokenizer, path), choice = fast
        from llmlab.engine.native import NativeDecoder, half_kv_cache, simd
        extended = extend(model, *context) if context else ""  # before the kernel reads the frequencies and groups
        native_step = NativeDecoder(model)
        if half_kv_cache():
            model.kv_dtype = torch.float16
        choice = (f"native decode kernel ({simd()}, {torch.get_num_threads()} threads{', fp16 KV cache' if model.kv_dtype else ''}) "
                  f"on {choice}; prompts prefill through it too; --exact for fp32 eager") + extended
    else:
        model, tokenizer, path = load_checkpoint_dense(name_or_path, dtype)
        native_step = None
        extended = extend(model, *context) if context else ""
        if int4:
            from llmlab.model.quant import quantize_int4
            quantize_int4(model)
        choice = ("fp32 eager decoding (exact)" if exact else
                  "PyTorch 4-bit decode copies" + (", compiled decode step" if compile else "") if int4 else
                  "compiled decode step" if compile else
                  f"{str(model.model.norm.weight.dtype).removeprefix('torch.')} eager decoding (the checkpoint is not stored in 4 or 8 bits, "
                  "or the native kernel cannot run it; --int4 for 4-bit copies)") + extended
    if announce:
        print(f"llmlab: {choice}", file=sys.stderr)
    llm = LLM(model, tokenizer, path, compile=compile, native_step=native_step)
    return_freed_memory()
    return llm


def parse_context_options(rope_scaling, self_extend) -> tuple | None:
    """((kind, factor) or None, (group, window) or None), or None when neither is asked for."""
    if not (rope_scaling or self_extend):
        return None
    from llmlab.model.rope import parse_rope_scaling
    from llmlab.model.self_extend import parse_self_extend
    return (parse_rope_scaling(rope_scaling) if rope_scaling else None,
            parse_self_extend(self_extend) if self_extend else None)


def extend(model, scaling, grouping) -> str:
    """Apply the context options to a dense model; the announcement's tail."""
    from llmlab.model.rope import extend_context
    from llmlab.model.self_extend import enable_self_extend
    trained, what = model.config.max_seq_len, []
    if scaling:
        extend_context(model, *scaling)
        what.append(f"{scaling[0]} RoPE scaling x{scaling[1]:g}")
    if grouping:
        enable_self_extend(model, *grouping)
        what.append(f"Self-Extend (group {grouping[0]}, window {grouping[1]})")
    return f"; context {trained:,} -> {model.config.max_seq_len:,} tokens by {' and '.join(what)}"


def load_packed(name_or_path):
    """((model, tokenizer, path), what) for a checkpoint stored in 4 or 8 bits, read packed; None otherwise."""
    from llmlab.checkpoint.registry import resolve

    if Path(name_or_path).is_file() and Path(name_or_path).suffix != ".gguf":
        return None  # load_checkpoint says what is wrong with it
    path = resolve(name_or_path)
    if path.suffix != ".gguf" and not (path.is_dir() and packed_checkpoint(path)):
        return None
    from llmlab.engine import native
    from llmlab.engine.native import packed

    if native.load_library() is None:  # it said why, once
        return None
    if path.suffix == ".gguf":
        loaded = packed.load_gguf_packed(path)
        if loaded is None:
            return None
        model, tokenizer, what = loaded
        return (model, tokenizer, path), what
    model = packed.load_quantized(path)
    if native.unsupported_reason(model):
        return None
    return (model, Tokenizer.from_dir(path), path), "the checkpoint's packed weights (exact)"


def packed_checkpoint(path: Path) -> bool:
    from llmlab.engine.native.packed import quantization_config

    return quantization_config(path) is not None


def load_checkpoint_dense(name_or_path, dtype):
    """load_checkpoint, and for a quantized llmlab checkpoint its weights dequantized into a dense model."""
    path = Path(name_or_path)
    if path.is_dir() and packed_checkpoint(path):
        from llmlab.engine.native.packed import load_quantized_dense
        return load_quantized_dense(path, dtype), Tokenizer.from_dir(path), path
    return load_checkpoint(name_or_path, dtype)


def load_with_adapter(base: str | Path, adapter: str | Path, merge: bool = False, dtype=None) -> LLM:
    """llmlab.load(base) with a LoRA adapter on top (merged into the weights, or kept separate)."""
    return LLM(*checkpoint_load.load_with_adapter(base, adapter, merge=merge, dtype=dtype))
