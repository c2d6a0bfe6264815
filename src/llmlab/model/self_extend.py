"""Self-Extend (Jin et al. 2024): attention past the trained context without training, by grouping far positions.

A query sees its nearest `window` keys at their true relative positions, as trained; keys further away are seen at
grouped positions (position // group, the query shifted by window - window // group so the two regions meet), so
no relative distance exceeds what the model saw in training as long as
    context / group + window - window // group <= trained context.
Each query attends to its near keys (true positions) and its far keys (grouped positions) separately, with
PyTorch's flash-attention kernel, and the two results are merged by their logsumexps: the same as one softmax over
all keys with the logit of each (query, key) pair picked from one of the two rotations, without materialising
either score matrix.

Like quantize_int4, it is swapped in from outside: `enable_self_extend(model, group, window)` replaces each
attention module by a SelfExtendAttention with the same parameters. A key's position never changes, so its two
rotations (true and grouped position) are computed once: the KV cache holds the first as usual and the second in
its `k_far` tensors (model.new_cache allocates them for a Self-Extend model), and a step costs about one plain
attention (each key is seen once, near or far, except a band of window + chunk keys seen both ways). Queries are
processed in chunks, so a 32k-token prefill needs (chunk x context) masks, not context x context. On a packed
model the native decode kernel (llmlab.engine.native) runs the same attention, reading `model.self_extend`.
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import LLMLabError
from llmlab.model.rope import apply_rope, rope_attention_factor, rotary_tables
from llmlab.model.transformer import Attention

QUERY_CHUNK = 256  # queries per block in a long prefill: its masks are 256 x 32k (32 MB of floats)

# PyTorch's CPU flash-attention kernel (what scaled_dot_product_attention runs on the CPU), called directly because
# it also returns each query's logsumexp, which merging the near and far attention needs; the public function does
# not return it. About 3.5x the eager scores-softmax-matmul on one core (256 queries x 4k keys, 9 heads).
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attend(q, k, v, allowed, scale: float):
    """(softmax attention over the keys where `allowed`, its logsumexp) for q (B, H, Tq, hd) and GQA keys and
    values (B, Hkv, Tk, hd); allowed (B, 1, Tq, Tk). A query with no allowed key gets 0 and a meaningless
    logsumexp (the caller knows which)."""
    if q.device.type == "cpu":
        mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
        return _cpu_flash(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    return attend_eager(q, k, v, allowed, scale)


def attend_eager(q, k, v, allowed, scale: float):
    """attend() in plain PyTorch ops (other devices; the reference in tests)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0).to(v.dtype) @ v, scores.logsumexp(-1)


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
        scale = 1.0 / math.sqrt(self.head_dim)
        ascending = bool((key_pos[:, 1:] >= key_pos[:, :-1]).all())  # a prompt's positions: keys can be sliced
        out = []
        for start in range(0, T, QUERY_CHUNK):
            qc, pos = q[:, :, start:start + QUERY_CHUNK], input_pos[:, start:start + QUERY_CHUNK]
            # keys [0, hi) are the ones any query of the chunk sees (causal); keys [0, far) are far for some of
            # them, [lo, hi) near for some: a long prefill costs about one causal attention, not two
            hi, lo, far = key_pos.shape[1], 0, key_pos.shape[1]
            if ascending:
                hi = int((key_pos <= pos.max()).sum(-1).max())
                lo = min(hi, int((key_pos <= pos.min() - self.window).sum(-1).min()))
                far = int((key_pos <= pos.max() - self.window).sum(-1).max())
            near_dist = (pos[:, :, None] - key_pos[:, None, lo:hi])[:, None]  # (B, 1, Tc, keys)
            y, lse = attend(self._rotate(qc, pos), k_near[:, :, lo:hi], v[:, :, lo:hi],
                            (near_dist >= 0) & (near_dist < self.window), scale)
            if far > 0:
                far_allowed = (pos[:, :, None] - key_pos[:, None, :far])[:, None] >= self.window
                q_far = self._rotate(qc, pos // self.group + self.window - self.window // self.group)
                y_far, lse_far = attend(q_far, k_far[:, :, :far], v[:, :, :far], far_allowed, scale)
                # one softmax over both sets: weigh each part by its share of the total exp-sum (a query with no
                # far key gets none; a near set always holds the query itself)
                lse_far = lse_far.masked_fill(~far_allowed.any(-1), float("-inf"))
                top = torch.maximum(lse, lse_far)
                w, w_far = (lse - top).exp()[..., None], (lse_far - top).exp()[..., None]
                y = ((y.float() * w + y_far.float() * w_far) / (w + w_far)).to(v.dtype)
            out.append(y)
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
