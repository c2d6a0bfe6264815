"""decode.cpp's weight layout in numpy: GGUF's Q4_0/Q4_1/Q8_0 blocks split into (q, d, m), the kernel's tiles of 16
output rows, and the quantization_config that marks a checkpoint saved in (q, d, m) (packed.py). No PyTorch: the lite
runner packs a model with it, and decoder.Packed wraps it for tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmlab.errors import LLMLabError

TILE = 16  # output rows per tile of the kernel's layout (decode.cpp)
EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF block types the kernel reads as they are: type -> bits
QUANT_METHOD = "llmlab"  # config.json's quantization_config of a checkpoint saved packed (packed.py's format)


BLOCKS = {"Q4_1": [("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)],  # GGUF's block of 32 weights, field by field
          "Q4_0": [("d", "<f2"), ("q", "u1", 16)], "Q8_0": [("d", "<f2"), ("q", "u1", 32)]}


def split_blocks(kind: str, raw: np.ndarray, out_features: int, in_features: int):
    """(q, d, m) of a Q4_0/Q4_1/Q8_0 tensor's bytes, in GGUF's row order: q (out, groups, bytes) uint8 (for the 4-bit
    types a view of raw, no copy), d and m (out, groups) fp16, weight = d * q + m per group of 32. Q4_1 blocks split
    as they are; Q4_0 is d(q - 8), so m = -8d; Q8_0 is d·s with s signed, stored here as s + 128 (the byte with its
    top bit flipped), so m = -128d."""
    if kind not in BLOCKS:
        raise ValueError(f"not a block type the kernel reads as it is: {kind}")
    block = np.asarray(raw, dtype=np.uint8).view(np.dtype(BLOCKS[kind])).reshape(out_features, in_features // 32)
    d = block["d"].copy()
    m = block["m"].copy() if kind == "Q4_1" else (-8 if kind == "Q4_0" else -128) * d
    return (block["q"] ^ 128 if kind == "Q8_0" else block["q"]), d, m


def to_tiles(q: np.ndarray, d: np.ndarray, m: np.ndarray):
    """GGUF's row order (q (out, bytes) or (out, groups, bytes/groups), d, m (out, groups)) -> decode.cpp's tiles of
    16 rows, the last padded with zero rows: per tile and group, steps of 16 lanes x 4 bytes (lane = row), then 16 d
    and 16 m. The 4 bytes of a step move as one uint32 (a quarter of the elements to shuffle)."""
    out, groups = d.shape
    q = q.reshape(out, groups, -1)
    pad = -out % TILE
    if pad:
        q, d, m = (np.concatenate([t, np.zeros((pad, *t.shape[1:]), t.dtype)]) for t in (q, d, m))
    tiles, steps = (out + pad) // TILE, q.shape[2] // 4
    words = np.ascontiguousarray(q) if q.strides[-1] != 1 else q
    words = words.view(np.uint32).reshape(tiles, TILE, groups, steps)
    q = np.ascontiguousarray(words.transpose(0, 2, 3, 1)).view(np.uint8).reshape(tiles, groups, steps, TILE, 4)
    d, m = (np.ascontiguousarray(t.reshape(tiles, TILE, groups).transpose(0, 2, 1)) for t in (d, m))
    return q, d, m


def from_tiles(q: np.ndarray, d: np.ndarray, m: np.ndarray, out: int):
    """The inverse of to_tiles: (q, d, m) in GGUF's row order."""
    tiles, groups = d.shape[:2]
    q = q.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, -1)[:out]
    d, m = (t.transpose(0, 2, 1).reshape(tiles * TILE, groups)[:out] for t in (d, m))
    return np.ascontiguousarray(q), np.ascontiguousarray(d), np.ascontiguousarray(m)


def quantization_config(path: str | Path) -> dict | None:
    """The llmlab quantization_config of a checkpoint directory, or None for a dense one."""
    config = Path(path) / "config.json"
    if not (Path(path).is_dir() and config.is_file()):
        return None
    qc = json.loads(config.read_text()).get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != QUANT_METHOD:
        raise LLMLabError(f"{path}: quantization {qc.get('quant_method')!r} is not supported (llmlab reads its own "
                          f"{QUANT_METHOD!r} checkpoints)")
    return qc
