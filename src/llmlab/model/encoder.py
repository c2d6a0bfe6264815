"""A compact BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and its kin): bidirectional, mean-pooled.

BERT differs from the decoder in llmlab.model.transformer in four places: every token attends to every other
(no causal mask, only padding is masked), positions are learned absolute embeddings added to the input, each
sub-block normalises *after* its residual add (post-LayerNorm), and the MLP is a single GELU layer. Parameter
names are Hugging Face's BertModel ones, so a `model.safetensors` from a BERT checkpoint loads by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    ffn_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        if hf.get("model_type") != "bert":
            raise ValueError(f"not a BERT config (model_type={hf.get('model_type')!r})")
        if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with exact GELU and absolute positions is supported")
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
                   max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                   norm_eps=hf.get("layer_norm_eps", 1e-12))


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        # single-segment input: token type 0 everywhere
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.self = SelfAttention(cfg)
        self.output = AttentionOutput(cfg)

    def forward(self, x, key_mask):
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for proj in (self.self.query, self.self.key, self.self.value))
        # key_mask (B, 1, 1, T): every query sees every real token of its row, none of the padding
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.output.LayerNorm(x + self.output.dense(y))  # post-LayerNorm: normalise after the residual


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Dense(cfg.dim, cfg.ffn_dim)
        self.output = Dense(cfg.ffn_dim, cfg.dim, cfg.norm_eps)

    def forward(self, x, key_mask):
        x = self.attention(x, key_mask)
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT was trained
        return self.output.LayerNorm(x + self.output.dense(h))


class LayerStack(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))


class Encoder(nn.Module):
    """Token ids (B, T) and a padding mask (B, T; 1 = real token) to hidden states (B, T, dim)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.cfg.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens, but the encoder has {self.cfg.max_positions} positions")
        key_mask = mask.bool()[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings: the mean of the real tokens' hidden states, scaled to unit length."""
        hidden = self(ids, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def load_encoder(directory: str | Path) -> Encoder:
    """A BERT encoder from a Hugging Face directory (config.json + model.safetensors), weights in float32."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = EncoderConfig.from_hf(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        model = Encoder(cfg)
    state = load_file(directory / "model.safetensors")
    state = {k.removeprefix("bert."): v.float() for k, v in state.items() if not k.endswith("position_ids")}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}  # the [CLS] pooler is unused
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
