"""A quantized model run with no PyTorch in the process: `llmlab generate`'s and `llmlab chat`'s default path for a
llama GGUF whose projections the native kernel reads as they are (Q4_0, Q4_1, Q8_0), or a checkpoint directory saved
packed (LLM.save_quantized).

The weights and the KV cache are numpy arrays in decode.cpp's layout, and every step and every sample is decode.cpp's
(llmlab_step, llmlab_sample), called as llmlab.load's native path calls them: the same prompt chunks, the same
greedy tokens, and for a seed the same samples (the uniforms come from the Mersenne Twister stream PyTorch's CPU
generator draws for that seed). What it saves is PyTorch itself: `import torch` alone holds 220-240 MiB and takes
~2 s, more than SmolLM2-135M's 4-bit weights. What it cannot honour (a repetition penalty, logprobs, constraints, RoPE
scaling) it refuses, and the command takes the PyTorch path instead.
"""

from __future__ import annotations

import ctypes
import random
from pathlib import Path
from typing import Iterator

import numpy as np

from llmlab.checkpoint.gguf_meta import (dequantize_array, hf_row_order, open_gguf, read_config, tensor_names,
                                         tokenizer_from_gguf)
from llmlab.checkpoint.registry import generation_defaults
from llmlab.engine.detokenize import IncrementalText
from llmlab.engine.native.layout import EXACT_TYPES, quantization_config, split_blocks, to_tiles
from llmlab.engine.native.library import (PROMPT_KINDS, ModelDesc, QMat, half_kv_cache, load_library, prefill_calls,
                                          return_freed_memory, simd, threads, unsupported_config)
from llmlab.engine.params import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.model.config import ModelConfig
from llmlab.tokenizer import Tokenizer

CACHE_ROUNDING = 64  # KV cache lengths are rounded up to this (as the Engine's)
REUSE_MIN_TOKENS = 64  # a shorter shared prefix is prefilled again (one call: a prompt's last 64 tokens are one anyway)
SEEDS = 2 ** 32  # the seeds whose PyTorch stream MersenneUniforms reproduces (others: the PyTorch path)
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")  # ModelDesc's order


def unsupported(cfg) -> str | None:
    """Why the lite runner cannot run a model of this config (None when it can)."""
    if cfg.rope_scaling:
        return "the lite runner computes plain RoPE frequencies (this model declares a scaling)"
    return unsupported_config(cfg)


def read_gguf(path: Path):
    """(config, tokenizer, packed tiles by module name, dense arrays by parameter name, what the weights are) of a
    llama GGUF whose projections and head are Q4_0/Q4_1/Q8_0 blocks, split and tiled one tensor at a time."""
    reader = open_gguf(path, lean=True)
    cfg = read_config(reader, path)
    head = "output.weight" if not cfg.tie_embeddings else "token_embd.weight"
    for t in reader.tensors:
        projection = t.name.startswith("blk.") and t.name.endswith((
            "_q.weight", "_k.weight", "_v.weight", "_output.weight", "_gate.weight", "_up.weight", "_down.weight"))
        if (projection or t.name == head) and t.tensor_type.name not in EXACT_TYPES:
            raise LLMLabError(f"{path}: {t.name} is {t.tensor_type.name}; the lite runner reads "
                              f"{'/'.join(EXACT_TYPES)} weights as they are")
    reason = unsupported(cfg)
    if reason:
        raise LLMLabError(f"{path}: {reason}")
    tokenizer = tokenizer_from_gguf(reader)
    reader.fields.clear()  # its 100k vocabulary strings, built into the tokenizer: 14 MiB, freed before the weights
    packed, dense, kinds = {}, {}, set()
    for tensor in reader.tensors:
        key, name = tensor_names(tensor, path)
        kind = tensor.tensor_type.name
        if kind in EXACT_TYPES:
            out_features, in_features = (int(n) for n in reversed(tensor.shape))
            groups = [hf_row_order(key, cfg, t) for t in split_blocks(kind, tensor.data, out_features, in_features)]
            packed[name.removesuffix(".weight")] = (*to_tiles(*groups), out_features, in_features, EXACT_TYPES[kind])
            kinds.add(kind)
        else:
            dense[name] = np.ascontiguousarray(hf_row_order(key, cfg, dequantize_array(tensor)))
    return cfg, tokenizer, packed, dense, f"the file's own {'/'.join(sorted(kinds))} weights (exact)"


def read_quantized(path: Path):
    """read_gguf's five for a checkpoint directory saved packed (LLM.save_quantized, llmlab.engine.native.packed)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if quantization_config(path) is None:
        raise LLMLabError(f"{path}: the lite runner reads GGUF files and llmlab's quantized checkpoints, not dense ones")
    cfg = ModelConfig.load(path)
    reason = unsupported(cfg)
    if reason:
        raise LLMLabError(f"{path}: {reason}")
    tensors = {}
    for file in sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_")):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:  # (as llmlab.checkpoint.hf.read_safetensors says it)
            raise LLMLabError(f"{file} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    packed = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        module = key.removesuffix(".qweight")
        missing = [f"{module}.{part}" for part in ("scales", "mins") if f"{module}.{part}" not in tensors]
        if missing:
            raise LLMLabError(f"{path}: {key} has no {missing[0]}")
        q, d, m = tensors.pop(key), tensors.pop(f"{module}.scales"), tensors.pop(f"{module}.mins")
        in_features = d.shape[1] * 32
        packed[module] = (*to_tiles(q, d, m), q.shape[0], in_features, 4 if q.shape[1] * 2 == in_features else 8)
    dense = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    return cfg, Tokenizer.from_dir(path), packed, dense, "the checkpoint's packed weights (exact)"


class MersenneUniforms:
    """float64 uniforms in [0, 1) equal to `torch.rand(1, dtype=torch.float64, generator=g)` for g seeded with the
    same seed: PyTorch's CPU generator is MT19937 seeded by init_genrand(seed) and makes a double of 53 bits of two
    32-bit draws (high word first). Python's random.Random is the same MT19937, given that seeded state here (numpy's
    RandomState would do as well, but importing numpy.random costs 6.7 MiB)."""

    def __init__(self, seed: int | None):
        self.twister = random.Random()  # seed None: seeded from the OS, as PyTorch's generator.seed()
        if seed is not None:
            state = [seed & 0xFFFFFFFF]
            for i in range(1, 624):  # MT19937's init_genrand
                state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & 0xFFFFFFFF)
            self.twister.setstate((3, (*state, 624), None))

    def next(self) -> float:
        high, low = self.twister.getrandbits(32), self.twister.getrandbits(32)
        return (((high << 32) | low) & ((1 << 53) - 1)) * 2.0 ** -53


class LiteModel:
    """A model's weights packed for decode.cpp, its tokenizer, and a batch-1 KV cache: the whole model, in numpy."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg, self.tokenizer, packed, dense, self.weights = (
            read_quantized if self.path.is_dir() else read_gguf)(self.path)
        self.lib = load_library()  # (after reading: a model it cannot run never builds the kernel)
        if self.lib is None:
            raise LLMLabError("the native decode kernel could not be built (see the line above)")
        self.config = cfg
        self.sampling_defaults = generation_defaults(self.path)
        self.context_len, self.vocab = cfg.max_seq_len, cfg.vocab_size
        self.keep = []  # every array the C++ side points into
        self.desc = self._describe(cfg, packed, dense)
        self.half = int(half_kv_cache())
        self.cache_len, self.finish_reason, self.sampled, self.prefilled = 0, None, 0, 0
        self.held: list[int] = []  # the tokens whose keys and values the cache holds, position by position
        return_freed_memory()  # the file's blocks and the tokenizer's build, freed between the weights kept

    def _qmats(self, packed, dense, names) -> ctypes.POINTER(QMat):
        """A C array of QMats (one per name) pointing into packed tiles, with their biases."""
        mats = []
        for name in names:
            q, d, m, out_features, in_features, bits = packed[name]
            bias = dense.get(f"{name}.bias")
            self.keep += [q, d, m, bias]
            mats.append(QMat(q.ctypes.data, d.ctypes.data, m.ctypes.data, None if bias is None else bias.ctypes.data,
                             out_features, in_features, bits))
        array = (QMat * len(mats))(*mats)
        self.keep.append(array)
        return ctypes.cast(array, ctypes.POINTER(QMat))

    def _pointers(self, arrays) -> ctypes.c_void_p:
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        table = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        self.keep.append((arrays, table))
        return ctypes.cast(table, ctypes.c_void_p)

    def _describe(self, cfg, packed, dense) -> ModelDesc:
        layers = range(cfg.n_layers)
        hd = cfg.head_dim
        # fp32 as PyTorch's rope_inv_freq makes them (the power rounded once, from float64: equal for SmolLM2)
        exponents = np.arange(0, hd, 2).astype(np.float32) / np.float32(hd)
        inv_freq = np.float32(1.0) / (np.float64(cfg.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
        norm_final = dense["model.norm.weight"].astype(np.float32)
        head = self._qmats(packed, dense, ["lm_head" if "lm_head" in packed else "model.embed_tokens"])
        embed = dense.get("model.embed_tokens.weight")  # an untied embedding stored dense
        embed_q = None if embed is not None else (
            head if cfg.tie_embeddings else self._qmats(packed, dense, ["model.embed_tokens"]))
        self.keep += [inv_freq, norm_final, embed]
        return ModelDesc(
            cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, hd, cfg.hidden_dim, cfg.vocab_size, cfg.norm_eps,
            None if embed is None else embed.ctypes.data, embed_q,
            self._pointers([dense[f"model.layers.{i}.input_layernorm.weight"] for i in layers]),
            self._pointers([dense[f"model.layers.{i}.post_attention_layernorm.weight"] for i in layers]),
            norm_final.ctypes.data, inv_freq.ctypes.data, 1.0,
            *[self._qmats(packed, dense, [f"model.layers.{i}.self_attn.{p}" for i in layers]) for p in ATTN],
            *[self._qmats(packed, dense, [f"model.layers.{i}.mlp.{p}" for i in layers]) for p in MLP],
            head, 0, 0)

    def describe(self) -> str:
        return (f"native decode kernel ({simd()}, {threads()} threads{', fp16 KV cache' if self.half else ''}) on "
                f"{self.weights}, without PyTorch; --exact for fp32 eager")

    # ---- the model calls -----------------------------------------------------------------------------------

    def new_cache(self, length: int, keep: int = 0) -> None:
        """A batch-1 KV cache of at least `length` slots (rounded up, as the Engine's) holding the first `keep`
        positions of the one before: (1, kv_heads, slots, head_dim) per layer."""
        length = min(self.context_len, -(-length // CACHE_ROUNDING) * CACHE_ROUNDING)
        if length <= self.cache_len:  # reused as it is: a step writes each position before any query reads it
            return
        old = (self.k + self.v) if keep else []
        self.k = self.v = None  # with nothing to keep, the old cache goes before the new one is made
        cfg = self.config
        shape = (1, cfg.n_kv_heads, length, cfg.head_dim)
        dtype = np.float16 if self.half else np.float32
        self.k = [np.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        for new, before in zip(self.k + self.v, old):
            new[:, :, :keep] = before[:, :, :keep]
        self.held = self.held[:keep]
        strides = (ctypes.c_int64 * 3)(*[s // self.k[0].itemsize for s in self.k[0].strides[:3]])
        self.cache_args = ((ctypes.c_void_p * cfg.n_layers)(*[a.ctypes.data for a in self.k]),
                           (ctypes.c_void_p * cfg.n_layers)(*[a.ctypes.data for a in self.v]), strides, strides)
        self.cache_len = length

    def step(self, tokens: list[int], positions: list[int], logit_rows: int = 1, prompt: str | None = None):
        """Feed tokens at positions (rows of one sequence, cache row 0); the logits of the last logit_rows rows."""
        if not (0 <= min(positions) and max(positions) < self.cache_len):
            raise LLMLabError(f"positions must be in [0, {self.cache_len}) (the KV cache's length)")
        if not (0 <= min(tokens) and max(tokens) < self.vocab):
            raise LLMLabError(f"token ids must be in [0, {self.vocab})")
        ids, pos = np.asarray(tokens, np.int64), np.asarray(positions, np.int64)
        rows = np.zeros(len(tokens), np.int64)
        logits = np.empty((logit_rows, self.vocab), np.float32)
        self.lib.omp_set_num_threads(threads())
        self.lib.llmlab_step(ctypes.byref(self.desc), ids.ctypes.data, pos.ctypes.data, rows.ctypes.data,
                             len(tokens), *self.cache_args, logits.ctypes.data, logit_rows, PROMPT_KINDS[prompt],
                             self.half, None)
        return logits

    def prefill(self, ids: list[int], start: int = 0):
        """A prompt's tokens into the cache from position `start` (the ones before it held already), in the calls
        NativeDecoder.prefill makes; the logits after its last token (1, V)."""
        self.held = self.held[:start]
        for s, e, kind in prefill_calls(len(ids)):
            logits = self.step(ids[s:e], list(range(start + s, start + e)), int(kind == "last"), kind)
        self.held += ids
        return logits

    def reusable(self, ids: list[int]) -> int:
        """How many of ids' first tokens the cache holds already (0 below REUSE_MIN_TOKENS); never the last one,
        whose logits must be computed."""
        same = next((i for i, (a, b) in enumerate(zip(self.held, ids)) if a != b), min(len(self.held), len(ids)))
        same = min(same, len(ids) - 1)
        return same if same >= REUSE_MIN_TOKENS else 0

    def choose(self, logits, params: SamplingParams, uniforms: MersenneUniforms) -> int:
        if params.temperature == 0:
            return int(np.argmax(logits[0]))
        u = np.array([uniforms.next()])
        chosen = np.empty(1, np.int64)
        self.lib.llmlab_sample(logits.ctypes.data, 1, self.vocab, params.temperature, params.top_k, params.top_p,
                               params.min_p, u.ctypes.data, chosen.ctypes.data)
        return int(chosen[0])

    # ---- generation ---------------------------------------------------------------------------------------

    def params(self, **options) -> SamplingParams:
        """SamplingParams from options over the file's sampling defaults (as LLM.params)."""
        return SamplingParams(**{**self.sampling_defaults, **{k: v for k, v in options.items() if v is not None}})

    def tokens(self, ids: list[int], params: SamplingParams, reuse: bool = False) -> Iterator[int]:
        """The sampled token ids, until a stop token (not yielded) or the limit: Engine.generate's tokens.

        reuse: start from the keys and values the cache holds for the prefix ids share with the last call's prompt
        and tokens (a chat's earlier turns, as llama.cpp's chat keeps them). Those rows were computed as decode steps
        or in other chunks, so the logits differ from a whole prefill's by float rounding, as with the server's
        prefix cache; without it the tokens are exactly llmlab.load's."""
        params.validate(self.context_len)
        refused = [what for what, on in (("a repetition penalty", params.repetition_penalty != 1.0),
                                         ("logprobs", params.logprobs), ("logits processors", params.logits_processors),
                                         ("a seed outside [0, 2**32)", params.seed is not None and not 0 <= params.seed < SEEDS))
                   if on]
        if refused:
            raise LLMLabError(f"the lite runner cannot honour {refused[0]}: use the PyTorch path (llmlab.load)")
        if not ids:
            raise LLMLabError("prompt is empty: give at least one token (e.g. BOS)")
        if len(ids) >= self.context_len:
            raise LLMLabError(f"prompt is {len(ids)} tokens but the model's context window is {self.context_len} "
                              "tokens, which leaves no room to generate")
        end = len(ids) + min(params.max_new_tokens, self.context_len - len(ids))
        stop_ids = frozenset() if params.ignore_eos else frozenset(
            self.tokenizer.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        uniforms = MersenneUniforms(params.seed)
        start = self.reusable(ids) if reuse else 0
        self.new_cache(end, keep=start)
        self.finish_reason, self.sampled = "length", 0  # how the last completion ended, tokens sampled (a stop's too)
        logits = self.prefill(ids[start:], start)
        self.prefilled = len(ids) - start
        for pos in range(len(ids), end):
            token = self.choose(logits, params, uniforms)
            self.sampled += 1
            if token in stop_ids:
                self.finish_reason = "stop"
                return
            yield token
            if pos + 1 < end:
                logits = self.step([token], [pos])
                self.held.append(token)

    def stream(self, ids: list[int], params: SamplingParams, reuse: bool = False) -> Iterator[str]:
        """Text of one completion piece by piece, cut before a stop string: Engine.stream's pieces (reuse: tokens')."""
        text = IncrementalText(self.tokenizer, [params.stop] if isinstance(params.stop, str) else list(params.stop))
        for token in self.tokens(ids, params, reuse):
            text.add(token)
            if text.stopped:
                self.finish_reason = "stop"
                break
            delta = text.take()
            if delta:
                yield delta
        text.close()
        delta = text.take(final=True)
        if delta:
            yield delta
