"""Models whose projections exist only in packed 4-/8-bit form: read straight from a GGUF's Q4_0/Q4_1/Q8_0 blocks
(no fp32 copy is ever made), and saved to / loaded from an HF-layout checkpoint with a `quantization_config`.

The packed layout (llmlab.model.quant.pack_groups; in memory decode.cpp's tiles of it, see Packed) is GGUF's own: per group of 32 inputs an fp16 step d, an
fp16 minimum m and the 4-bit values two per byte (low nibble j, high nibble j + 16), so Q4_1 blocks split into
(q, d, m) without arithmetic; Q4_0 is d·(q − 8), i.e. m = −8d; Q8_0 is d·q with q signed, i.e. q + 128 and
m = −128d. All three are exact.

Quantized checkpoint (config.json's "quantization_config"):
    {"quant_method": "llmlab", "format": "groups-of-32", "group_size": 32, "bits": 4, "lm_head_bits": 8}
and in model.safetensors, for every packed projection P (e.g. model.layers.0.self_attn.q_proj, lm_head):
    P.qweight  uint8 (out, in/2) for 4 bits (byte j of a group: q[j] | q[j+16] << 4), (out, in) for 8 bits
    P.scales   fp16 (out, in/32)      P.mins  fp16 (out, in/32)      P.bias  fp32 (out,), if any
    weight = scales·q + mins per group; "bits" per projection is the width of qweight (in/2 or in).
Norms (and an untied embedding) stay as ordinary fp32 tensors; a tied embedding is read from lm_head's rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmlab.checkpoint.gguf import LAYER, dequantize, hf_row_order, open_gguf, read_config, tensor_names
from llmlab.checkpoint.gguf import tokenizer_from_gguf
from llmlab.checkpoint.hf import build_model, parse_dtype, read_safetensors, safetensors_files, write_checkpoint_dir
from llmlab.engine.native.decoder import NativeEmbedding, NativeLinear, Packed
from llmlab.engine.native.layout import (  # noqa: F401 (quantization_config: imported from here too)
    EXACT_TYPES, QUANT_METHOD, quantization_config, split_blocks)
from llmlab.engine.native.library import unsupported_config
from llmlab.errors import LLMLabError
from llmlab.model.config import ModelConfig
from llmlab.model.quant import pack_groups, unpack_groups
from llmlab.model.transformer import Transformer, rope_inv_freq

DENSE_TYPES = {"F32", "F16", "BF16"}


def build_packed_model(cfg: ModelConfig, dense: dict[str, torch.Tensor], packed: dict[str, Packed]) -> Transformer:
    """A Transformer whose projections are NativeLinear over `packed` (keyed by module name: lm_head,
    model.layers.0.self_attn.q_proj, ...) and whose other weights are `dense` (norms, an untied embedding)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, p in packed.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, NativeLinear(p))
    if cfg.tie_embeddings:
        model.model.embed_tokens = NativeEmbedding(packed["lm_head"])
    model.load_state_dict({k: v.float() for k, v in dense.items()}, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(cfg)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise LLMLabError(f"weights missing from the checkpoint: {missing[:3]}")
    return model.eval()


def gguf_groups(tensor, bits_if_converted: int) -> tuple[tuple, int, bool]:
    """((q, d, m) in GGUF's row order, bits, exact?) for one GGUF weight: Q4_0/Q4_1/Q8_0 blocks split as they are
    (layout.split_blocks), others re-packed."""
    kind = tensor.tensor_type.name
    out_features, in_features = (int(n) for n in reversed(tensor.shape))
    if kind not in EXACT_TYPES:
        return pack_groups(dequantize(tensor), bits_if_converted), bits_if_converted, False
    groups = split_blocks(kind, tensor.data, out_features, in_features)
    return tuple(torch.from_numpy(t) for t in groups), EXACT_TYPES[kind], True


def load_gguf_packed(path: str | Path):
    """(model, tokenizer, description) for a llama GGUF whose projections are quantized, reading them packed;
    None when they are stored dense (F32/F16/BF16) or the model is one the native step cannot run."""
    reader = open_gguf(path, lean=True)  # no memory map, no per-token arrays: see llmlab.checkpoint.gguf_file
    cfg = read_config(reader, path)
    types = {t.tensor_type.name for t in reader.tensors if LAYER.match(t.name) and t.name.endswith(".weight")
             and "norm" not in t.name}
    if not types or types & DENSE_TYPES or unsupported_config(cfg):
        return None
    dense, packed, exact = {}, {}, True
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # folded into cfg.rope_scaling
            continue
        key, name = tensor_names(tensor, path)
        in_layer = key.startswith("blk.{}.")
        is_head = name in ("lm_head.weight", "model.embed_tokens.weight")
        if not (in_layer and name.endswith("_proj.weight")) and not (is_head and (cfg.tie_embeddings or name == "lm_head.weight")):
            dense[name] = hf_row_order(key, cfg, dequantize(tensor))  # (biases of q and k too)
            continue
        # projections keep 4 bits where converted from another 4-bit type, the head 8 (4 change predictions)
        groups, bits, was_exact = gguf_groups(tensor, 8 if is_head or not tensor.tensor_type.name.startswith(
            ("Q4", "IQ4")) else 4)
        exact &= was_exact
        groups = [hf_row_order(key, cfg, t) for t in groups]
        packed["lm_head" if is_head else name.removesuffix(".weight")] = Packed(*groups, None, bits)
    for name in [k for k in dense if k.endswith("_proj.bias")]:
        owner = packed[name.removesuffix(".bias")]
        packed[name.removesuffix(".bias")] = owner.with_bias(dense.pop(name))
    model = build_packed_model(cfg, dense, packed)
    kinds = "/".join(sorted(types))
    what = f"the file's own {kinds} weights ({'exact' if exact else 're-packed in groups of 32: approximate'})"
    return model, tokenizer_from_gguf(reader), what


# ---- quantized HF checkpoints ---------------------------------------------------------------------------------


def save_quantized(model, path: str | Path, tokenizer=None, generation_config: dict | None = None) -> Path:
    """Write a packed model (llmlab.load of a 4-bit GGUF, or free_dense_weights) as an HF-layout directory."""
    cfg = model.config
    tensors, bits = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, NativeLinear):
            p = module.packed
            tensors.update(zip((f"{name}.qweight", f"{name}.scales", f"{name}.mins"), p.canonical()))
            if p.bias is not None:
                tensors[f"{name}.bias"] = p.bias
            if name != "lm_head":
                bits.add(p.bits)
    if not tensors:
        raise LLMLabError("this model holds no packed weights: load a 4-bit checkpoint (or free_dense_weights) first")
    for name, t in model.state_dict().items():
        tensors[name] = t.detach().float()
    hf = cfg.to_hf()
    hf["torch_dtype"] = "float32"
    hf["quantization_config"] = {"quant_method": QUANT_METHOD, "format": "groups-of-32", "group_size": 32,
                                 "bits": max(bits), "lm_head_bits": model.lm_head.packed.bits}
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    gen.update(generation_config or {})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return write_checkpoint_dir(path, tensors, hf, tokenizer, {"generation_config.json": gen})


def load_quantized(path: str | Path) -> Transformer:
    """The packed model of a checkpoint written by save_quantized."""
    path = Path(path)
    quantization_config(path)
    cfg = ModelConfig.load(path)
    sd = read_safetensors(safetensors_files(path))
    packed, dense = {}, {}
    for name in [k for k in sd if k.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        q, d, m = sd.pop(name), sd.pop(f"{module}.scales"), sd.pop(f"{module}.mins")
        bits = 4 if q.shape[1] * 2 == d.shape[1] * 32 else 8
        packed[module] = Packed(q, d, m, sd.pop(f"{module}.bias", None), bits)
    dense.update(sd)
    return build_packed_model(cfg, dense, packed)


def load_quantized_dense(path: str | Path, dtype=None) -> Transformer:
    """A quantized checkpoint's weights dequantized into an ordinary dense model (for --exact, --int4, training)."""
    path = Path(path)
    quantization_config(path)
    cfg = ModelConfig.load(path)
    sd = read_safetensors(safetensors_files(path))
    for name in [k for k in sd if k.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        q, d, m = sd.pop(name), sd.pop(f"{module}.scales"), sd.pop(f"{module}.mins")
        sd[f"{module}.weight"] = unpack_groups(q, d, m, 4 if q.shape[1] * 2 == d.shape[1] * 32 else 8)
    if cfg.tie_embeddings:
        sd["model.embed_tokens.weight"] = sd.pop("lm_head.weight")
    return build_model(cfg, sd, parse_dtype(dtype), source=str(path))
