"""The native decode step for PyTorch models: the Python side that feeds decode.cpp (built and loaded by library.py).

`NativeDecoder(model)` packs a Llama-type model's projections in 4-bit groups (8-bit for the output head) and
runs a whole step (embedding, 30 layers, head) in one C++ call over the engine's own KV cache: decode steps,
speculative verifies and a prompt's chunks (prefill) alike. Without the library callers keep the PyTorch path.
"""

from __future__ import annotations

import copy
import ctypes

import torch
import torch.nn as nn

from llmlab.engine.native import layout
from llmlab.engine.native.library import (  # noqa: F401 (PREFILL_ROWS, LAST_ROWS: imported from here too)
    LAST_ROWS, PREFILL_ROWS, PROMPT_KINDS, ModelDesc, QMat, half_kv_cache, load_library, prefill_calls, threads,
    unsupported_config)
from llmlab.errors import LLMLabError
from llmlab.model.quant import pack_groups
from llmlab.model.rope import rope_attention_factor

ATTN_NAMES, MLP_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
MAX_NATIVE_ROWS = 8  # a NativeLinear call of more rows dequantizes and uses PyTorch's matmul
DEQUANT_ROWS = 4096  # output rows dequantized at a time for a NativeLinear call of many rows


def to_tiles(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
    """layout.to_tiles for CPU tensors (GGUF's row order -> decode.cpp's tiles of 16 rows)."""
    return tuple(torch.from_numpy(t) for t in layout.to_tiles(q.numpy(), d.numpy(), m.numpy()))


def from_tiles(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, out: int):
    """layout.from_tiles for CPU tensors: (q, d, m) in GGUF's row order."""
    return tuple(torch.from_numpy(t) for t in layout.from_tiles(q.numpy(), d.numpy(), m.numpy(), out))


class Packed:
    """One projection in decode.cpp's tiled layout and the QMat that points into it (the tensors must stay alive).
    Made from GGUF's row order (pack_groups' q, d, m); canonical() gives that order back."""

    def __init__(self, q, d, m, bias, bits: int):
        # fp16 scales: what GGUF stores (so exact for its Q4_1/Q8_0 tensors), a fifth less to read than fp32
        self.out_features, self.in_features, self.bits = d.shape[0], d.shape[1] * 32, bits
        self.q, self.d, self.m = to_tiles(q.contiguous(), d.half(), m.half())
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._point()

    def _point(self):
        self.qmat = QMat(self.q.data_ptr(), self.d.data_ptr(), self.m.data_ptr(),
                         self.bias.data_ptr() if self.bias is not None else None,
                         self.out_features, self.in_features, self.bits)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, d, m) in GGUF's row order, as pack_groups gives them (a copy)."""
        return from_tiles(self.q, self.d, self.m, self.out_features)

    def with_bias(self, bias) -> "Packed":
        """The same weights (shared, not copied) with a bias."""
        other = copy.copy(self)
        other.bias = None if bias is None else bias.detach().float().contiguous()
        other._point()
        return other

    def __deepcopy__(self, memo):  # the QMat holds raw pointers: point a copy at copied tensors
        other = copy.copy(self)
        other.q, other.d, other.m = self.q.clone(), self.d.clone(), self.m.clone()
        other.bias = None if self.bias is None else self.bias.clone()
        other._point()
        return other

    def dequantized(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """The dense fp32 weight, or its output rows [first, last)."""
        last = self.out_features if last is None else last
        w = torch.empty(last - first, self.in_features)
        lib = load_library()
        lib.omp_set_num_threads(threads())
        lib.llmlab_dequantize(ctypes.byref(self.qmat), first, last, w.data_ptr())
        return w

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The dequantized rows idx (any shape) -> (*idx.shape, in_features)."""
        flat = idx.reshape(-1).to(torch.long).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise IndexError(f"row index out of range [0, {self.out_features})")
        out = torch.empty(flat.shape[0], self.in_features)
        load_library().llmlab_embed(ctypes.byref(self.qmat), flat.data_ptr(), flat.shape[0], out.data_ptr())
        return out.view(*idx.shape, self.in_features)

    @classmethod
    def of(cls, linear: nn.Module, bits: int) -> "Packed":
        if isinstance(linear, NativeLinear):
            return linear.packed
        return cls(*pack_groups(linear.weight, bits), linear.bias, bits)


def unsupported_reason(model) -> str | None:
    """Why the native step cannot run this model (None when it can)."""
    if model.model.norm.weight.device.type != "cpu":
        return "the native decode step runs on the CPU; the model is not there"
    if model.model.norm.weight.dtype != torch.float32:
        return "the native decode step runs fp32 models"
    return unsupported_config(model.config)


class NativeDecoder:
    """A decode step in C++: call it as Engine.decode_step is called, (tokens (B, 1), input_pos (B, 1), cache)."""

    def __init__(self, model, bits: int = 4):
        reason = unsupported_reason(model)
        if reason:
            raise LLMLabError(reason)
        self.lib = load_library()
        if self.lib is None:
            raise LLMLabError("the native decode kernel could not be built (see the line above)")
        cfg, layers = model.config, model.model.layers
        self.bits, self.vocab, self.n_layers = bits, cfg.vocab_size, cfg.n_layers
        self.keep = []  # every tensor the C++ side points into
        self.packed = {}  # projection name -> one Packed per layer

        def packed(name, linears):
            items = self.packed[name] = [Packed.of(lin, bits) for lin in linears]
            array = (QMat * len(items))(*[p.qmat for p in items])  # copies of the QMats, same pointers
            self.keep.append(array)
            return ctypes.cast(array, ctypes.POINTER(QMat))

        def pointers(tensors):
            tensors = [t.detach().float().contiguous() for t in tensors]
            array = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
            self.keep.append((tensors, array))
            return ctypes.cast(array, ctypes.c_void_p)

        self.head = Packed.of(model.lm_head, 8)
        embed = model.model.embed_tokens
        embed_dense = None if isinstance(embed, NativeEmbedding) else embed.weight.detach().float().contiguous()
        norm_final, inv_freq = model.model.norm.weight.detach().float().contiguous(), model.inv_freq.float().contiguous()
        self.keep += [embed_dense, norm_final, inv_freq]
        attn, mlp = [b.self_attn for b in layers], [b.mlp for b in layers]
        self.desc = ModelDesc(
            cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size,
            cfg.norm_eps, embed_dense.data_ptr() if embed_dense is not None else None,
            ctypes.pointer(embed.packed.qmat) if embed_dense is None else None,
            pointers([b.input_layernorm.weight for b in layers]),
            pointers([b.post_attention_layernorm.weight for b in layers]),
            norm_final.data_ptr(), inv_freq.data_ptr(), rope_attention_factor(cfg),
            *[packed(name, [getattr(a, name) for a in attn]) for name in ATTN_NAMES],
            *[packed(name, [getattr(m, name) for m in mlp]) for name in MLP_NAMES],
            ctypes.pointer(self.head.qmat), *(getattr(model, "self_extend", None) or (0, 0)))
        if embed_dense is None:
            self.keep.append(embed.packed)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache,
                 cache_rows: torch.Tensor | None = None, logit_rows: int | None = None,
                 prompt: str | None = None) -> torch.Tensor:
        """Logits (B, V) after each row's token. Row b uses cache row cache_rows[b] (default: row b); rows of one
        sequence at consecutive positions in the same cache row attend causally, so a speculative verify of
        k + 1 tokens is one call: cache_rows = zeros(k + 1), input_pos = pos, pos + 1, ...
        logit_rows: only the last logit_rows rows' logits are computed and returned (a prompt's last chunk needs
        one, its others none: (0, V))).
        prompt: the rows are a prompt's chunk ("chunk": one before its last; "last") and attend as matrix products
        (decode.cpp's tiled attention); "last" takes bf16 activations where the CPU has AVX512-BF16, else fp32, never
        the decode steps' int8 ones, "chunk" the decode steps' (see prefill)."""
        tokens = tokens.reshape(-1).to(torch.long).contiguous()
        pos = input_pos.reshape(-1).to(torch.long).contiguous()
        B = tokens.shape[0]
        first = cache.k[0]
        if pos.shape[0] != B:
            raise LLMLabError(f"got {B} tokens but {pos.shape[0]} positions")
        if cache_rows is not None:
            cache_rows = cache_rows.reshape(-1).to(torch.long).contiguous()
            rows = cache_rows.tolist()
            if len(rows) != B or not 0 <= min(rows) <= max(rows) < first.shape[0]:
                raise LLMLabError(f"cache_rows must give each of the {B} rows a cache row in [0, {first.shape[0]})")
        elif first.shape[0] < B:
            raise LLMLabError(f"{B} rows need a KV cache of at least {B} rows, it has {first.shape[0]}")
        token_list, pos_list = tokens.tolist(), pos.tolist()  # (Python's min and max: a few rows, no tensor ops)
        if not 0 <= min(token_list) <= max(token_list) < self.vocab:
            raise LLMLabError(f"token ids must be in [0, {self.vocab})")
        if not 0 <= min(pos_list) <= max(pos_list) < first.shape[2]:
            raise LLMLabError(f"positions must be in [0, {first.shape[2]}) (the KV cache's length)")
        if prompt not in PROMPT_KINDS:
            raise LLMLabError(f"prompt must be one of {list(PROMPT_KINDS)}, got {prompt!r}")
        logit_rows = B if logit_rows is None else logit_rows
        if not 0 <= logit_rows <= B:
            raise LLMLabError(f"logit_rows must be in [0, {B}], got {logit_rows}")
        logits = torch.empty(logit_rows, self.vocab)
        k_ptrs, v_ptrs, k_strides, v_strides, half, far_ptrs = self.cache_pointers(cache)
        self.lib.omp_set_num_threads(threads())
        self.lib.llmlab_step(ctypes.byref(self.desc), tokens.data_ptr(), pos.data_ptr(),
                             None if cache_rows is None else cache_rows.data_ptr(), B, k_ptrs, v_ptrs,
                             k_strides, v_strides, logits.data_ptr(), logit_rows, PROMPT_KINDS[prompt], half, far_ptrs)
        return logits

    def cache_pointers(self, cache):
        """The C call's per-layer cache pointers and strides, made once per cache and kept on it with the k and v
        lists they were made from (a reorder makes new lists, and so new pointers)."""
        known = getattr(cache, "native_pointers", None)
        if known is not None and known[0] is cache.k and known[1] is cache.v and known[2] is cache.k_far:
            return known[3]
        k, v, far = cache.k, cache.v, cache.k_far
        dtypes = (torch.float32, torch.float16) if half_kv_cache() else (torch.float32,)
        if k[0].dtype not in dtypes or any(t.dtype != k[0].dtype or t.stride(3) != 1 for t in k + v + far):
            raise LLMLabError(f"the native decode step needs a KV cache of {' or '.join(map(str, dtypes))} with "
                              "contiguous head dimensions")
        if self.desc.group and (len(far) != self.n_layers or any(f.stride() != t.stride() for f, t in zip(far, k))):
            raise LLMLabError("a Self-Extend model needs a KV cache with far keys laid out as its keys "
                              "(model.new_cache makes one)")
        made = ((ctypes.c_void_p * self.n_layers)(*[t.data_ptr() for t in k]),
                (ctypes.c_void_p * self.n_layers)(*[t.data_ptr() for t in v]),
                (ctypes.c_int64 * 3)(*k[0].stride()[:3]), (ctypes.c_int64 * 3)(*v[0].stride()[:3]),
                int(k[0].dtype == torch.float16),
                (ctypes.c_void_p * self.n_layers)(*[t.data_ptr() for t in far]) if self.desc.group else None)
        cache.native_pointers = (k, v, far, made)
        return made

    def prefill(self, ids: list[int], start: int, cache, row: int = 0) -> torch.Tensor:
        """Feed a prompt's tokens at positions start, start + 1, ... into cache row `row` (which holds the tokens
        before start); return the logits after the last one (1, V).

        The last LAST_ROWS tokens are one call whose activations are bf16 where the CPU has AVX512-BF16, else
        fp32, never int8: its last logits choose the first token, and with int8 ones SmolLM2 answered "What is the
        capital of France?" wrongly (a near-tie: int8 keys and values for the first 21 of its 37 tokens flipped
        it too). The tokens before them only write keys and values: PREFILL_ROWS per call with the decode steps' int8
        activations where those are on (1.6-1.7x the bf16 kernel's speed; decode steps' own keys and values are
        int8 ones, and llama.cpp's prefill takes int8 ones throughout). Over 32 grounded prompts of 110-300 tokens
        the first token agreed with the exact model's on 31 (all bf16: 32; the flip a near-tie, 0.09 apart of
        logits ~25) and the 31 greedy tokens after it at 98.3% of positions (all bf16: 99.1%). No kernel depends on
        the batch, so a prompt prefilled whole or in parts gives the same logits bit for bit when its calls take
        the same kernels (fp32, LLMLAB_NATIVE_INT8=0, or prompts of at most LAST_ROWS tokens); otherwise a cached
        prefix holds rows in bf16 that a whole prefill runs in int8, and the logits differ by that rounding (as
        llama.cpp's server says of its prompt cache)."""
        if not ids:
            raise LLMLabError("nothing to prefill")
        for s, e, kind in prefill_calls(len(ids)):  # only the last call's logits are wanted
            logits = self(torch.tensor(ids[s:e]), torch.arange(start + s, start + e), cache,
                          torch.full((e - s,), row), logit_rows=int(kind == "last"), prompt=kind)
        return logits


class NativeLinear(nn.Module):
    """A projection that holds only its packed weights: the native kernel (fp32 activations) for a few rows (a
    prefix-cache suffix, a short forward), the dequantized weight and PyTorch's matmul for more (prefill). Replaces an nn.Linear to free its
    dense weight; `.weight` still reads as the dense weight, dequantized afresh (writing to it changes nothing)."""

    def __init__(self, packed: Packed):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.dequantized()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.packed.bias

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float().contiguous()
        if rows.shape[0] <= MAX_NATIVE_ROWS:
            y = torch.empty(rows.shape[0], self.out_features)
            lib = load_library()
            lib.omp_set_num_threads(threads())
            lib.llmlab_qmatmul(ctypes.byref(self.packed.qmat), rows.data_ptr(), rows.shape[0], y.data_ptr())
        else:  # PyTorch's matmul on DEQUANT_ROWS dequantized output rows at a time (a whole 49k x 576 head is 108 MB)
            y = torch.empty(rows.shape[0], self.out_features)
            for first in range(0, self.out_features, DEQUANT_ROWS):
                last = min(self.out_features, first + DEQUANT_ROWS)
                y[:, first:last] = rows @ self.packed.dequantized(first, last).T
            if self.packed.bias is not None:
                y += self.packed.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class NativeEmbedding(nn.Module):
    """Token embeddings read from a packed matrix (the tied output head's), dequantized row by row;
    `.weight` reads as the whole dense matrix, dequantized afresh."""

    def __init__(self, packed: Packed):
        super().__init__()
        self.packed = packed
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.dequantized()

    def forward(self, idx):
        return self.packed.rows(idx)


def free_dense_weights(model, decoder: NativeDecoder) -> NativeDecoder:
    """Replace the model's projections (and a tied embedding) by their packed copies, so only those stay in memory;
    return the decoder that reads them (nothing is held twice).

    The model still runs in PyTorch (prefill, scoring) through NativeLinear; it can no longer be trained or
    saved as a dense checkpoint.
    """
    for layer, block in enumerate(model.model.layers):
        for name in ATTN_NAMES:
            setattr(block.self_attn, name, NativeLinear(decoder.packed[name][layer]))
        for name in MLP_NAMES:
            setattr(block.mlp, name, NativeLinear(decoder.packed[name][layer]))
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.model.embed_tokens = NativeEmbedding(decoder.head)
    model.lm_head = NativeLinear(decoder.head)
    return NativeDecoder(model, decoder.bits)
