"""The one decoder-only transformer behind every llmlab stage (Llama/Mistral/Qwen2, GPT-2 and Mixtral-style MoE).

Parameter names follow Hugging Face's Llama layout (model.layers.N.self_attn.q_proj, ...), so a Llama-family
checkpoint loads by name alone; GPT-2 and Mixtral files are renamed in llmlab.checkpoint.hf.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.model.config import ModelConfig
from llmlab.model.rope import apply_rope, rope_attention_factor, rope_inv_freq, rotary_tables, rotate_half  # noqa: F401


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 whatever the compute dtype: bf16 mean-of-squares loses too much
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear, except for one token per row under torch.compile on CPU (batch-1 decoding).

    There PyTorch's bf16 matrix-vector kernel streams the weight at ~7 GB/s; written as multiply-and-sum,
    inductor fuses it into one vectorised pass over the weight rows with fp32 accumulation (measured on
    SmolLM2: 23 ms per token instead of 45). Everywhere else (prefill, training) it is the usual matmul.
    """

    def forward(self, x):
        if x.shape[-2] == 1 and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype)
        return super().forward(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class KVCache:
    """Preallocated keys and values: per layer, two tensors (batch, kv_heads, max_len, head_dim).

    Each row of the batch has its own positions, so rows of different lengths (ragged prompts, continuous
    batching) share one cache; attention masks out slots a row has not written. The shapes never change
    while decoding, which is what torch.compile needs; and each layer's tensors are separate (not views of
    one big tensor) because a compiled in-place write into a view copies the whole base tensor.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu",
                 far_keys: bool = False, lazy: bool = False):
        """lazy: on the CPU, zero pages the kernel maps only when first written (a server's cache for 16 rows of
        2,048 slots is 1.4 GB zeroed up front, most of it never used)."""
        self.max_len = max_len
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)

        def zeros():
            if lazy and torch.device(device).type == "cpu":
                count = batch_size * cfg.n_kv_heads * max_len * cfg.head_dim
                pages = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
                return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # (the tensor keeps pages alive)
            return torch.zeros(shape, dtype=dtype, device=device)

        self.k = [zeros() for _ in range(cfg.n_layers)]
        self.v = [zeros() for _ in range(cfg.n_layers)]
        # Self-Extend (llmlab.model.self_extend) also keeps each key rotated at its grouped position
        self.k_far = [zeros() for _ in range(cfg.n_layers)] if far_keys else []

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k, v, input_pos):
        """Write k, v (B, kv_heads, T, hd) at input_pos (B, T); return the layer's whole cache."""
        index = input_pos[:, None, :, None].expand_as(k)
        cache_k, cache_v = self.k[layer], self.v[layer]
        cache_k.scatter_(2, index, k.to(cache_k.dtype))
        cache_v.scatter_(2, index, v.to(cache_v.dtype))
        return cache_k, cache_v

    def update_far(self, layer: int, k, input_pos):
        """Write Self-Extend's grouped-position keys k (B, kv_heads, T, hd) at input_pos; return the layer's."""
        self.k_far[layer].scatter_(2, input_pos[:, None, :, None].expand_as(k), k.to(self.k_far[layer].dtype))
        return self.k_far[layer]

    def reorder(self, rows: torch.Tensor):
        """Keep (and duplicate) batch rows, e.g. to follow the surviving beams."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.k_far = [t.index_select(0, rows) for t in self.k_far]

    def copy_row(self, dst: int, src: "KVCache", src_row: int = 0, length: int | None = None):
        """Copy one row of another cache (e.g. a prefilled prompt) into row dst of this one."""
        n = src.max_len if length is None else length
        for mine, theirs in zip(self.k + self.v + self.k_far, src.k + src.v + src.k_far):
            mine[dst, :, :n] = theirs[src_row, :, :n]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def project_qkv(self, x):
        """Queries, keys and values of x: three projections of the same input (a subclass may fuse them)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, mask, kv_cache, input_pos):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache.update(self.layer, k, v, input_pos)
            if mask is not None:  # attend to all cached slots; a fresh prompt (mask None) only to itself
                k, v = cache_k.to(q.dtype), cache_v.to(q.dtype)
            elif cache_k.dtype != k.dtype:  # ... as the cache holds it (an fp16 cache: as the native step sees it)
                k, v = k.to(cache_k.dtype).to(q.dtype), v.to(cache_v.dtype).to(q.dtype)
        # grouped-query: each kv head serves n_heads // n_kv_heads query heads, without copying it that often
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def project_gate_up(self, x):
        """SwiGLU's gate and up projections of x (a subclass may fuse them)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.project_gate_up(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class MoE(nn.Module):
    """Top-k routed experts. k=1 with moe_normalize_topk=False is the Switch layer.

    With a capacity factor, each expert takes at most ceil(factor * tokens * k / experts) assignments, first
    come first served in token order; an overflowing token gets nothing from that expert, so when all its
    experts overflow it passes through the residual connection unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_token
        self.normalize_topk, self.capacity_factor = cfg.moe_normalize_topk, cfg.moe_capacity_factor
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())
        self.dropped_fraction = 0.0

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        n_tokens = flat.shape[0]
        probs = F.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        assigned = F.one_hot(chosen, self.n_experts)  # (N, k, E)
        keep = torch.ones_like(chosen, dtype=torch.bool)
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
            # queue position of each assignment in its expert, counting earlier tokens (and slots) first
            order = assigned.reshape(-1, self.n_experts).cumsum(0).reshape_as(assigned)
            position = (order * assigned).sum(-1) - 1  # (N, k)
            keep = position < capacity
        self.dropped_fraction = 1.0 - keep.float().mean().item() if self.capacity_factor > 0 else 0.0
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where((chosen == e) & keep)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        # Switch Transformer load-balancing loss: E * sum_e (fraction of assignments to e) * (mean prob of e)
        fraction = assigned.float().mean(dim=(0, 1))
        self.aux_loss = self.n_experts * (fraction * probs.mean(0)).sum()
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def forward(self, x, rope, mask, kv_cache, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # nn.Embedding's own N(0, 1), except on the meta device (checkpoints are loaded into a meta model): normal_
        # there runs a decomposition that imports torch._dynamo and sympy, 70 MiB of resident memory and a second
        embed = torch.empty(cfg.vocab_size, cfg.dim)
        if not embed.is_meta:
            nn.init.normal_(embed)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim, _weight=embed),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers)),
            norm=make_norm(cfg),
        ))
        if cfg.pos_embedding == "learned":
            self.model["embed_positions"] = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, seed: int | None = None):
        """GPT-2 initialisation for training from scratch: N(0, 0.02), residual outputs scaled by depth."""
        if seed is not None:
            torch.manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=0.02)
        return self

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward pass (0 for a dense model)."""
        losses = [b.mlp.aux_loss for b in self.model.layers if isinstance(b.mlp, MoE)]
        return sum(losses) if losses else torch.zeros(())

    def forward(self, idx, input_pos=None, kv_cache: KVCache | None = None, last_only: bool = False):
        """Logits (B, T, vocab) for token ids idx (B, T).

        Without a cache the attention is causal over idx; right padding is therefore harmless. With a
        cache, input_pos (B, T) says where each token sits: keys and values are written there and each
        query sees the cache slots up to its own position.
        """
        B, T = idx.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.model.embed_tokens(idx)
        if self.config.pos_embedding == "learned":
            x = x + self.model.embed_positions(input_pos)
            rope = None
        else:
            rope = rotary_tables(input_pos, self.inv_freq, rope_attention_factor(self.config), x.dtype)
        mask = None
        # a prompt written into an empty cache attends causally to itself: no mask over the whole cache,
        # so the fast causal attention kernel runs (decode steps and cached prefixes need the mask)
        fresh = T > 1 and not torch.compiler.is_compiling() and bool((input_pos[:, 0] == 0).all())
        if kv_cache is not None and not fresh:
            slots = torch.arange(kv_cache.max_len, device=idx.device)
            mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # (B, 1, T, max_len)
        for block in self.model.layers:
            x = block(x, rope, mask, kv_cache, input_pos)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    kv_dtype = None  # the KV cache's dtype where it is not the weights' (fp16 for the native decode step: llmlab.load)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, lazy: bool = False) -> KVCache:
        p = self.model.norm.weight  # not the embedding's: a packed one (llmlab.engine.native) has no dense weight
        return KVCache(self.config, batch_size, max_len, dtype=dtype or self.kv_dtype or p.dtype, device=p.device,
                       far_keys=getattr(self, "self_extend", None) is not None, lazy=lazy)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
