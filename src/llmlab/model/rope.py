"""Rotary position embeddings: the frequencies, plain or scaled to stretch a trained context (linear, NTK-aware,
YaRN, Llama 3), and applying them.

A scaling is either declared by a checkpoint (HF `rope_scaling` in config.json) or chosen when a model is loaded
(`llmlab.load(..., rope_scaling="yarn:4")`, `--rope-scaling yarn:4`): `extend_context` rewrites the config the same
way a checkpoint would declare it, so what llmlab computes is what transformers computes for that config
(tests/test_rope.py compares the frequencies with transformers' own functions).

- linear (position interpolation, Chen et al. 2023): every frequency divided by the factor.
- ntk (NTK-aware, bloc97): the base theta grows to theta * (f^2 - f + 1)^(d / (d - 2)), which leaves the fastest
  rotations almost as trained and slows the slowest ones most. This is transformers' "dynamic" formula taken at the
  full extended length; llmlab fixes it there because keys are rotated once, when they enter the KV cache (a
  frequency that changed with the length would need every cached key rotated again). Being a new theta, it is
  written to config.json as `rope_theta`, which every other tool reads.
- yarn (Peng et al. 2023): interpolate the slow frequencies, keep the fast ones, ramp between (beta_fast, beta_slow
  rotations over the original context), and scale attention logits by (0.1 ln f + 1)^2 through cos and sin.
- llama3: Llama 3.1's banded variant of the same idea (declared by those checkpoints).
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import LLMLabError

SCALINGS = ("linear", "ntk", "yarn")  # what a load-time --rope-scaling may choose


def rope_inv_freq(cfg) -> torch.Tensor:
    """Rotation frequency per pair of head dimensions, with the config's scaling applied."""
    hd = cfg.head_dim
    # on the CPU even inside a meta-device model construction: arange there runs a decomposition that imports
    # torch._dynamo and sympy (70 MiB resident); a model moved with .to() takes its buffers along
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(between, smoothed, inv_freq)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, cfg.rope_theta, hd, scaling)
    return inv_freq


def _yarn_inv_freq(inv_freq: torch.Tensor, theta: float, hd: int, scaling: dict) -> torch.Tensor:
    """Blend interpolated (slow) and extrapolated (fast) frequencies by a linear ramp over the dimensions that turn
    between beta_slow and beta_fast times over the original context."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_turning(rotations):  # the dimension whose wavelength fits `rotations` times into the old context
        return hd * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: a fast dimension, kept as trained; 0: a slow one, interpolated
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(cfg) -> float:
    """YaRN's scale on cos and sin (so on attention logits, squared); 1 for every other kind."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor, m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor = scaling["factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype) -> tuple:
    """cos and sin (B, 1, T, hd) for integer positions (B, T)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd). Half-split pairing, as in the HF Llama weights.
    return x * cos + rotate_half(x) * sin


def parse_rope_scaling(spec: str) -> tuple[str, float]:
    """"yarn:4" -> ("yarn", 4.0); one clear error for anything else."""
    kind, _, factor = spec.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if kind not in SCALINGS or value <= 1:
        raise LLMLabError(f"--rope-scaling takes KIND:FACTOR with KIND one of {', '.join(SCALINGS)} and FACTOR > 1 "
                          f"(e.g. yarn:4), got {spec!r}")
    return kind, value


def extend_context(model, kind: str, factor: float) -> int:
    """Stretch a loaded RoPE model's context by `factor` with the given scaling; returns the new context length.
    Rewrites model.config as a checkpoint declaring that scaling would, and the model's frequencies with it."""
    cfg = model.config
    if cfg.pos_embedding != "rope":
        raise LLMLabError("--rope-scaling needs a RoPE model; this one has learned positions")
    if cfg.rope_scaling:
        raise LLMLabError(f"this checkpoint already declares {cfg.rope_scaling.get('rope_type')} RoPE scaling; "
                          "a second one on top is not supported")
    old_len = cfg.max_seq_len
    new_len = int(old_len * factor)
    if kind == "linear":
        cfg.rope_scaling = {"rope_type": "linear", "factor": factor}
    elif kind == "ntk":
        d = cfg.head_dim
        cfg.rope_theta = cfg.rope_theta * (factor * factor - factor + 1) ** (d / (d - 2))
    elif kind == "yarn":
        cfg.rope_scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": old_len}
    else:
        raise LLMLabError(f"unknown RoPE scaling {kind!r} (llmlab: {', '.join(SCALINGS)})")
    cfg.max_seq_len = new_len
    model.inv_freq = rope_inv_freq(cfg).to(model.inv_freq.device)
    return new_len
