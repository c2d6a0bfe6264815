"""Self-Extend (Jin et al. 2024): attention past the trained context without training, by grouping far positions.

A query sees its nearest `window` keys at their true relative positions, as trained; keys further away are seen at
grouped positions (position // group, the query shifted by window - window // group so the two regions meet), so
no relative distance exceeds what the model saw in training as long as
    context / group + window - window // group <= trained context.
Both sets of logits are computed and the mask picks one per (query, key) pair before one softmax.

Like quantize_int4, it is swapped in from outside: `enable_self_extend(model, group, window)` replaces each
attention module by a SelfExtendAttention with the same parameters. A key's position never changes, so its two
rotations (true and grouped position) are computed once: the KV cache holds the first as usual and the second in
its `k_far` tensors (model.new_cache allocates them for a Self-Extend model), and a decode step costs about two
plain attention steps. Queries are processed in chunks, so a 32k-token prefill needs (chunk x context)
scores per head, not context x context.
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import LLMLabError
from llmlab.model.rope import apply_rope, rope_attention_factor, rotary_tables
from llmlab.model.transformer import Attention

QUERY_CHUNK = 256  # queries per score block in a long prefill: 256 x 32k x 4 bytes = 32 MB a head


class SelfExtendAttention(Attention):
    group: int
    window: int

    def forward(self, x, rope, mask, kv_cache, input_pos):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # a key's two rotations never change (its position does not), so both are computed once, when it is written
        k_near, k_far, key_pos = self._rotate(k, input_pos), self._rotate(k, input_pos // self.group), input_pos
        if kv_cache is not None:  # slot j holds position j
            cache_k, cache_v = kv_cache.update(self.layer, k_near, v, input_pos)
            cache_far = kv_cache.update_far(self.layer, k_far, input_pos)
            if mask is not None:
                length = int(input_pos.max()) + 1
                k_near, k_far, v = (t[:, :, :length].to(q.dtype) for t in (cache_k, cache_far, cache_v))
                key_pos = torch.arange(length, device=x.device).expand(B, -1)
        # grouped-query attention without copying keys: (B, kv_heads, group of query heads, T, hd)
        rep = self.n_heads // self.n_kv_heads
        k_near, k_far, v = k_near[:, :, None], k_far[:, :, None], v[:, :, None]
        scale = 1.0 / math.sqrt(self.head_dim)
        ascending = bool((key_pos[:, 1:] >= key_pos[:, :-1]).all())  # a prompt's positions: keys can be sliced
        out = []
        for start in range(0, T, QUERY_CHUNK):
            qc, pos = q[:, :, start:start + QUERY_CHUNK], input_pos[:, start:start + QUERY_CHUNK]
            # keys [0, hi) are the ones any query of the chunk sees (causal); keys before lo are far for all of
            # them, so near scores are needed on [lo, hi) only: a long prefill costs one causal score matrix
            hi, lo = key_pos.shape[1], 0
            if ascending:
                hi = int((key_pos <= pos.max()).sum(-1).max())
                lo = min(hi, int((key_pos <= pos.min() - self.window).sum(-1).min()))
            q_near = self._rotate(qc, pos).unflatten(1, (self.n_kv_heads, rep))
            q_far = self._rotate(qc, pos // self.group + self.window - self.window // self.group)
            q_far = q_far.unflatten(1, (self.n_kv_heads, rep))
            distance = (pos[:, :, None] - key_pos[:, None, :hi])[:, None, None]  # (B, 1, 1, Tc, hi)
            scores = q_far @ k_far[..., :hi, :].transpose(-1, -2)
            near = q_near @ k_near[..., lo:hi, :].transpose(-1, -2)
            scores[..., lo:] = torch.where(distance[..., lo:] < self.window, near, scores[..., lo:])
            scores = scores.float().masked_fill(distance < 0, float("-inf")) * scale
            out.append((scores.softmax(dim=-1).to(v.dtype) @ v[..., :hi, :]).flatten(1, 2))
        y = torch.cat(out, dim=2).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)

    def _rotate(self, x, positions):
        cos, sin = rotary_tables(positions, self.inv_freq, self.rope_scale, x.dtype)
        return apply_rope(x, cos, sin)


def enable_self_extend(model, group: int, window: int) -> int:
    """Swap Self-Extend attention into a RoPE model; returns the context it reaches,
    (trained - window + window // group) * group tokens."""
    cfg = model.config
    if cfg.pos_embedding != "rope":
        raise LLMLabError("Self-Extend needs a RoPE model; this one has learned positions")
    if group < 1 or window < 1 or window >= cfg.max_seq_len:
        raise LLMLabError(f"--self-extend takes GROUP,WINDOW with GROUP >= 1 and 1 <= WINDOW < the trained context "
                          f"({cfg.max_seq_len}), got {group},{window}")
    for block in model.model.layers:
        attn = block.self_attn
        if type(attn) is not Attention:
            raise LLMLabError(f"Self-Extend works on plain attention layers, not {type(attn).__name__} "
                              "(enable it before quantizing)")
        attn.__class__ = SelfExtendAttention  # same parameters, same names: only forward changes
        attn.group, attn.window = group, window
        attn.inv_freq, attn.rope_scale = model.inv_freq, rope_attention_factor(cfg)
    reach = (cfg.max_seq_len - window + window // group) * group
    cfg.max_seq_len = reach
    model.self_extend = (group, window)
    return reach


def parse_self_extend(spec: str) -> tuple[int, int]:
    """"4,1024" -> (4, 1024)."""
    try:
        group, window = (int(v) for v in spec.split(","))
    except ValueError:
        raise LLMLabError(f"--self-extend takes GROUP,WINDOW (e.g. 4,1024), got {spec!r}") from None
    return group, window
