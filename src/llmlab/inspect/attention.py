"""Attention weights per layer and head, recomputed from each attention layer's own inputs.

A pre-hook on every attention module records what it receives (the normed hidden states and the rotary
cos/sin); softmax(q k^T / sqrt(d)) is recomputed from its projections, and the weighted sum of the values
through o_proj is checked against the layer's actual output, so a map is known to be the one the model used.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from llmlab.errors import LLMLabError
from llmlab.inspect.hooks import as_batch, n_layers


@dataclass
class AttentionMaps:
    weights: torch.Tensor  # (layers, heads, T, T): row t is how query t spreads over keys 0..t
    ids: list[int]
    max_error: float  # largest |recomputed attention output - the layer's own output| over all layers


def _rotate(x, rope):
    if rope is None:  # learned positions: nothing rotates
        return x
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def recompute(attn, x, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention weights (B, H, T, T) and output (B, T, D) of one attention module on input x."""
    B, T, _ = x.shape
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = _rotate(attn.q_proj(x).view(B, T, H, hd).transpose(1, 2), rope)
    k = _rotate(attn.k_proj(x).view(B, T, KV, hd).transpose(1, 2), rope)
    v = attn.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
    # grouped-query attention: query head h reads kv head h // (H / KV)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    y = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, H * hd)
    return weights, attn.o_proj(y)


@torch.no_grad()
def attention_maps(model, ids, layers: list[int] | None = None) -> AttentionMaps:
    """Attention weights of the given layers (default: all) for one prompt of token ids."""
    n = n_layers(model)
    layers = list(range(n)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < n:
            raise LLMLabError(f"attention layer {layer} does not exist: the model has layers 0..{n - 1}")
    x = as_batch(ids)
    if x.shape[0] != 1 or x.shape[1] == 0:
        raise LLMLabError("attention maps take one non-empty prompt")
    # a server's batcher may run the same model in its own thread meanwhile: record this thread's calls only
    seen, handles, me = {}, [], threading.get_ident()
    for layer in layers:
        attn = model.model.layers[layer].self_attn

        def pre(mod, args, layer=layer):
            if threading.get_ident() == me:
                seen[layer] = {"x": args[0], "rope": args[1]}

        def post(mod, args, output, layer=layer):
            if threading.get_ident() == me:
                seen[layer]["out"] = output
        handles += [attn.register_forward_pre_hook(pre), attn.register_forward_hook(post)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    maps, error = [], 0.0
    for layer in layers:
        weights, out = recompute(model.model.layers[layer].self_attn, seen[layer]["x"], seen[layer]["rope"])
        error = max(error, (out.float() - seen[layer]["out"].float()).abs().max().item())
        maps.append(weights[0])
    return AttentionMaps(torch.stack(maps), x[0].tolist(), error)
