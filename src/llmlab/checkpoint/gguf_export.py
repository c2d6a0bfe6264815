"""Export an llmlab model as a llama.cpp GGUF file (llama architecture), so it runs in llama.cpp and ollama.

The inverse of checkpoint/gguf.py: the same tensor-name table read backwards, llama.cpp's Q/K RoPE row
permutation re-applied, weights quantized with the `gguf` package, and the byte-level BPE tokenizer, chat
template and hyper-parameters written as the `llama.*` / `tokenizer.ggml.*` metadata llama.cpp reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from llmlab.checkpoint.gguf_meta import EXPORT_TYPES, LLAMA3_SPLIT, QWEN2_SPLIT, TENSOR_NAMES
from llmlab.errors import LLMLabError
from llmlab.io import fsync_dir, new_temp_dir
from llmlab.model.config import ModelConfig

# llmlab (= HF Llama) name -> llama.cpp name: the import table read backwards, so the two can never disagree
GGUF_NAMES = {ours: theirs for theirs, ours in TENSOR_NAMES.items()}

# llama.cpp's `tokenizer.ggml.pre` names for the pre-tokenizers llmlab's tokenizers use; llama.cpp hard-codes a
# split regex per name, so a tokenizer whose split matches none of these would tokenize differently there
GPT2_PRE = {"type": "ByteLevel", "use_regex": True}
PRE_TOKENIZERS = [
    ("gpt2", [GPT2_PRE]),
    ("smollm", [{"type": "Digits", "individual_digits": True}, GPT2_PRE]),
    ("llama-bpe", [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}}, {"type": "ByteLevel", "use_regex": False}]),
    ("qwen2", [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}}, {"type": "ByteLevel", "use_regex": False}]),
]

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (adjacent rotary pairs) from HF's (rotated halves); undone by gguf.unpermute_rope."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, with one line, a model that the llama architecture (as llmlab reads it back) cannot hold."""
    if cfg.n_experts:
        raise LLMLabError("cannot export a mixture-of-experts model to GGUF (llmlab exports dense llama models)")
    if cfg.pos_embedding != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise LLMLabError(f"cannot export to GGUF: llama needs RoPE, RMSNorm and SwiGLU, this model has "
                          f"{cfg.pos_embedding} positions, {cfg.norm} and a {cfg.mlp} MLP (GPT-2 style)")
    if cfg.mlp_bias:
        raise LLMLabError("cannot export to GGUF: MLP biases are not part of the llama tensors llmlab reads back")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") not in ("linear", "llama3"):
        raise LLMLabError(f"cannot export rope scaling {cfg.rope_scaling.get('rope_type')!r} to GGUF")


def tensor_type(name: str, shape: tuple[int, ...], kind: str):
    """The GGML type of one tensor: norms and biases stay F32 (as llama.cpp's converter keeps them); 4-bit types
    keep the embedding / output head at Q8_0 (4 bits there change many greedy choices, see model/quant.py); a row
    that is not a whole number of quantization blocks falls back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) == 1 or kind == "f32":
        return Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[kind]
    if qtype in (Q.Q4_0, Q.Q4_1) and name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every weight, Q/K rows in llama.cpp's order, no head when tied."""
    cfg = model.config
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        parts = name.split(".")
        layer = parts[2] if name.startswith("model.layers.") else None
        key = ".".join(parts[:2] + ["{}"] + parts[3:]) if layer is not None else name
        if key not in GGUF_NAMES:
            raise LLMLabError(f"cannot export to GGUF: no llama.cpp tensor for {name}")
        w = t.detach().to("cpu", torch.float32)
        if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
            w = permute_rope(w, cfg.n_heads if ".q_proj." in key else cfg.n_kv_heads)
        out.append((GGUF_NAMES[key].format(layer), w.contiguous().numpy()))
    return out


def pre_tokenizer_name(backend) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or an error if llama.cpp has no equivalent."""
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LLMLabError("cannot export the tokenizer to GGUF: llmlab exports byte-level BPE tokenizers only")
    if spec.get("normalizer"):
        raise LLMLabError("cannot export the tokenizer to GGUF: llama.cpp's BPE has no normalizer")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, wanted in PRE_TOKENIZERS:
        if len(steps) == len(wanted) and all(all(s.get(k) == v for k, v in w.items()) for s, w in zip(steps, wanted)):
            return name
    raise LLMLabError(f"cannot export the tokenizer to GGUF: its pre-tokenizer ({json.dumps(pre)[:120]}) matches "
                      f"none llama.cpp knows ({', '.join(name for name, _ in PRE_TOKENIZERS)})")


def add_tokenizer(writer, tokenizer, cfg: ModelConfig) -> None:
    """tokenizer.ggml.* metadata: tokens in id order (padded to the model's vocabulary), types, merges, ids, template."""
    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if n > cfg.vocab_size:
        raise LLMLabError(f"the tokenizer has {n} tokens but the model only {cfg.vocab_size}; they do not belong together")
    if sorted(vocab.values()) != list(range(n)):
        raise LLMLabError("cannot export the tokenizer to GGUF: its token ids are not contiguous")
    tokens = [""] * n
    for token, i in vocab.items():
        tokens[i] = token
    types = [TOKEN_NORMAL] * n
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    # llama.cpp wants one token per embedding row: name the spare rows as its converter does
    tokens += [f"[PAD{i}]" for i in range(n, cfg.vocab_size)]
    types += [TOKEN_UNUSED] * (cfg.vocab_size - n)
    merges = json.loads(backend.to_str())["model"]["merges"]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    ids = {"bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id,
           "eos": eos if eos is not None else tokenizer.eos_token_id,
           "unk": tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None,
           "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id}
    for kind, i in ids.items():
        if i is not None:
            getattr(writer, f"add_{kind}_token_id")(int(i))
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_hparams(writer, cfg: ModelConfig, kind: str, name: str) -> None:
    """general.* and llama.* metadata: what llama.cpp needs to build the graph."""
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                  "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_types[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling.get("rope_type") == "llama3":
        # llama.cpp divides each base frequency by a stored factor (the tensor rope_freqs.weight)
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """rope_freqs.weight: base frequency / scaled frequency, per rotary pair (what gguf._llama3_scaling inverts)."""
    from llmlab.model.transformer import rope_inv_freq

    base = rope_inv_freq(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None}))
    return (base / rope_inv_freq(cfg)).to(torch.float32).numpy()


def export_gguf(model, tokenizer, out: str | Path, kind: str = "q8_0", name: str | None = None) -> Path:
    """Write `model` (an llmlab Transformer) and its tokenizer as a llama GGUF at `out`, atomically."""
    import gguf

    if kind not in EXPORT_TYPES:
        raise LLMLabError(f"unknown GGUF type {kind!r} (choose from {', '.join(EXPORT_TYPES)})")
    cfg = model.config
    check_exportable(cfg)
    out = Path(out)
    if out.is_dir():
        raise LLMLabError(f"{out} is a directory; give the path of the .gguf file to write")
    tmp_dir = new_temp_dir(out)  # written beside the target, then renamed over it: never half a file
    tmp = tmp_dir / out.name
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        add_hparams(writer, cfg, kind, name or out.stem)
        add_tokenizer(writer, tokenizer, cfg)
        if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
        for gguf_name, w in gguf_tensors(model):
            qtype = tensor_type(gguf_name, w.shape, kind)
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name, w)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name, w.astype(np.float16))
            else:
                writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, kind: str = "q8_0") -> Path:
    """Load any checkpoint llmlab reads (registry name, HF directory, .gguf) and export it as a GGUF file."""
    from llmlab.checkpoint.load import load_checkpoint

    if kind not in EXPORT_TYPES:  # before the (possibly slow) load
        raise LLMLabError(f"unknown GGUF type {kind!r} (choose from {', '.join(EXPORT_TYPES)})")
    model, tokenizer, path = load_checkpoint(checkpoint, dtype="float32")
    name = path.stem if path.suffix == ".gguf" else path.name
    return export_gguf(model, tokenizer, out, kind, name=name)
