"""Import llama.cpp GGUF files: dequantize the weights, undo llama.cpp's renaming and RoPE permutation.

GGUF keeps the model config as `llama.*` metadata, the tokenizer as `tokenizer.ggml.*` metadata and each
weight as a (possibly quantized) tensor under llama.cpp's names. Loading reads them with the lean reader of
llmlab.checkpoint.gguf_file (open_gguf(path, lean=True): no memory map, plain values), dequantizes with the
`gguf` package's numpy code and hands llmlab a ModelConfig, a state dict in Hugging Face Llama names and a
Tokenizer (built here from the metadata: tokenizer_from_gguf).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmlab.checkpoint.gguf_meta import (  # noqa: F401 (re-exported: the names GGUF import is known by)
    LAYER, LLAMA3_SPLIT, QWEN2_SPLIT, TENSOR_NAMES, _bytes_to_unicode, dequantize_array, field_value, hf_row_order,
    open_gguf,
    read_config, tensor_names, tokenizer_from_gguf, unpermute_rope)
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer
from llmlab.tokenizer import Tokenizer


def dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as float32, in PyTorch's (out, in) orientation."""
    return torch.from_numpy(dequantize_array(tensor))


def read_gguf(path: str | Path, reader=None) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """The config, float32 state dict (llmlab names; no lm_head when tied) and tokenizer of a llama GGUF."""
    reader = reader or open_gguf(path, lean=True)
    cfg = read_config(reader, path)
    state_dict = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # folded into cfg.rope_scaling
            continue
        key, name = tensor_names(tensor, path)
        state_dict[name] = hf_row_order(key, cfg, dequantize(tensor))
    return cfg, state_dict, tokenizer_from_gguf(reader)


def load_gguf(path: str | Path, dtype=torch.float32) -> tuple[Transformer, Tokenizer, dict]:
    """A ready-to-run llmlab Transformer, its Tokenizer and a generation config from a llama GGUF file."""
    from llmlab.checkpoint.hf import build_model, parse_dtype

    cfg, state_dict, tokenizer = read_gguf(path)
    model = build_model(cfg, state_dict, parse_dtype(dtype), source=str(path))
    generation_config = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                           ("pad_token_id", cfg.pad_token_id)) if v is not None}
    return model, tokenizer, generation_config
