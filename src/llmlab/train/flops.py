"""Model FLOPs per token and the device's measured matmul peak, for MFU (model FLOPs utilisation)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from llmlab.io import atomic_write_text
from llmlab.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (forward 2, backward 4) plus attention scores.

    Embedding lookups are free; the lm_head is a matmul and counts. Attention adds QK^T and AV: per layer
    2 * 2 * heads * head_dim * seq_len forward (PaLM's appendix B), times 3 for the backward.
    """
    n = cfg.n_params(include_embeddings=False) + cfg.vocab_size * cfg.dim
    if cfg.n_experts:  # only top-k experts run per token
        d, h = cfg.dim, cfg.hidden_dim
        per_expert = (3 if cfg.mlp == "swiglu" else 2) * d * h
        n -= cfg.n_layers * (cfg.n_experts - cfg.n_experts_per_token) * per_expert
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * n + attention


def cache_dir() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE", Path.home() / ".cache" / "llmlab"))


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str = "cpu", size: int = 2048,
                       seconds: float = 1.0) -> float:
    """Best FLOP/s of a large square matmul: the most this device does for our kind of work."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):  # warm up: first calls pick kernels / pack weights
        a @ b
    best, start = 0.0, time.perf_counter()
    while best == 0.0 or time.perf_counter() - start < seconds:  # at least one timed call, however busy the machine
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def peak_flops(dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> float:
    """The device's matmul peak, measured once per (device, dtype, threads) and cached in the llmlab cache."""
    name = torch.cuda.get_device_name() if device != "cpu" else (platform.processor() or platform.machine())
    key = f"{device}|{name}|{dtype}|threads={torch.get_num_threads()}"
    file = cache_dir() / "peak_flops.json"
    try:
        table = json.loads(file.read_text())
    except (OSError, ValueError):
        table = {}
    if not table.get(key):  # a 0 cached by an older version that could time no call on a busy machine
        table[key] = measure_peak_flops(dtype, device)
        try:
            atomic_write_text(file, json.dumps(table, indent=2) + "\n")
        except OSError:
            pass  # a read-only cache only costs a re-measurement next time
    return table[key]
