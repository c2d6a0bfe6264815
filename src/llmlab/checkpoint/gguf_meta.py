"""GGUF metadata without PyTorch: the model config, the tokenizer, tensor names, and raw tensors as numpy arrays.

What reading a GGUF needs before any weight becomes a tensor: `llmlab.checkpoint.gguf` builds PyTorch models on
it, and llmlab.engine.native.lite runs a quantized file with no PyTorch in the process at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from llmlab.checkpoint.gguf_file import GGUFFile, Truncated
from llmlab.errors import LLMLabError
from llmlab.model.config import ModelConfig
from llmlab.tokenizer import Tokenizer

# llama.cpp tensor name -> llmlab (= HF Llama) name; {} is the layer number
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")  # what llmlab.checkpoint.gguf_export writes
LAYER = re.compile(r"^blk\.(\d+)\.")

# Pre-tokenizer split regexes by llama.cpp's `tokenizer.ggml.pre` name (as llama.cpp and transformers use them);
# GPT-2's own regex is built into the ByteLevel pre-tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# digits one by one, then GPT-2's split: how StarCoder and SmolLM tokenizers were trained
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r")
SPLIT_BY_PRE = {
    **{name: LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")},
}

TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte spelled as a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _fast_reader_class():
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        """GGUFReader parsing from a plain ndarray view of its memmap, and stopping at the end of the file.

        Slicing an np.memmap creates a memmap object per slice, and the reader slices once per string of
        the 50k-token vocabulary: the plain view is about three times faster and maps the same memory.
        The stock reader does not check lengths, so a truncated file failed later with a numpy reshape error.
        """

        def _get(self, offset, dtype, count=1, override_order=None):
            if isinstance(self.data, np.memmap):
                self.data = self.data.view(np.ndarray)
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise Truncated(end)
            return super()._get(offset, dtype, count, override_order)

    return FastGGUFReader


def open_gguf(path: str | Path, lean: bool = False):
    """A gguf.GGUFReader over the file, or an LLMLabError saying why it cannot be read.

    lean=True gives a GGUFFile instead (llmlab.checkpoint.gguf_file: the same `fields[k].contents()` and
    `tensors`, without GGUFReader's memory map and per-item arrays): what loading a model uses.
    """
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such file: {path}")
    try:
        return GGUFFile(path) if lean else _fast_reader_class()(path)
    except Truncated as e:
        raise LLMLabError(f"{path} is truncated or corrupt: it has {path.stat().st_size:,} bytes, but reading it "
                          f"needs {e.end:,} (an interrupted download or copy?)") from None
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on a damaged file
        raise LLMLabError(f"{path} is not a valid GGUF file: {type(e).__name__}: {e}") from None


def field_value(reader, key: str, default=None):
    """A metadata value as a Python object (str, number, bool or list), or default if absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:
        raise LLMLabError(f"GGUF metadata {key!r} is unreadable: {e}") from None


def unpermute_rope(w, n_heads: int):
    """Undo llama.cpp's Q/K row permutation.

    HF Llama rotates the two halves of each head (dim i with i + head_dim/2); llama.cpp rotates adjacent
    pairs (2i with 2i+1), so its converter reorders the rows of q_proj/k_proj per head with
    `w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)`. Swapping the same two axes back inverts it.
    w: a PyTorch tensor or a numpy array (both have reshape and swapaxes).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_row_order(key: str, cfg: ModelConfig, w):
    """w, an array of the tensor `key` (tensor_names' first: "blk.{}.attn_q.weight", ...), in HF's row order: the
    rows of q and k weights and biases unpermuted (unpermute_rope), any other tensor's as they are."""
    if not key.startswith(("blk.{}.attn_q.", "blk.{}.attn_k.")):
        return w
    return unpermute_rope(w, cfg.n_heads if ".attn_q." in key else cfg.n_kv_heads)


def dequantize_array(tensor) -> np.ndarray:
    """One GGUF tensor as a writable float32 array in PyTorch's (out, in) orientation."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        data = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise LLMLabError(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} is not supported "
                          "by the gguf package's dequantizer") from None
    # GGUF lists dimensions fastest-first (ne[0] = columns); PyTorch wants them slowest-first
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = np.asarray(data, dtype=np.float32).reshape(shape)
    if not data.flags.writeable:  # GGUFReader's F32 tensors are views of its read-only memory map
        data = data.copy()
    return data


def read_config(reader, path="") -> ModelConfig:
    """ModelConfig from `llama.*` metadata (and which tensors exist)."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise LLMLabError(f"{path}: GGUF architecture {arch!r} is not supported (llmlab imports 'llama' GGUFs)")

    def need(key):
        v = field_value(reader, f"llama.{key}")
        if v is None:
            raise LLMLabError(f"{path}: GGUF metadata lacks llama.{key}")
        return v

    names = {t.name for t in reader.tensors}
    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = field_value(reader, "llama.attention.key_length") or field_value(reader, "llama.rope.dimension_count")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else field_value(reader, "llama.vocab_size")
    if vocab_size is None:
        raise LLMLabError(f"{path}: GGUF has neither a token list nor llama.vocab_size")
    rope_scaling = None
    if field_value(reader, "llama.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    cfg = ModelConfig(
        vocab_size=int(vocab_size), dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
        n_kv_heads=int(field_value(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(head_dim) if head_dim else None, hidden_dim=int(need("feed_forward_length")),
        max_seq_len=int(field_value(reader, "llama.context_length", 2048)),
        rope_theta=float(field_value(reader, "llama.rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        norm_eps=float(field_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        tie_embeddings="output.weight" not in names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
        hf_model_type="llama",
    )
    if "rope_freqs.weight" in names:
        cfg.rope_scaling = _llama3_scaling(reader, cfg, path)
    return cfg


def _llama3_scaling(reader, cfg: ModelConfig, path) -> dict:
    """Llama 3.1+ GGUFs store the scaled RoPE frequencies as a tensor; find the HF rope_scaling producing them."""
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    from llmlab.model.rope import rope_inv_freq  # (PyTorch: only Llama 3.1+ files have this tensor)

    factors = dequantize_array(tensor).flatten()  # llama.cpp divides each base frequency by these
    target = rope_inv_freq(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None})).numpy() / factors
    original = int(field_value(reader, "llama.rope.scaling.original_context_length", 8192))
    for factor in sorted({float(factors.max()), 8.0, 16.0, 32.0}):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": original}
            got = rope_inv_freq(ModelConfig(**{**cfg.to_dict(), "rope_scaling": scaling})).numpy()
            if np.allclose(got, target, rtol=1e-3):
                return scaling
    raise LLMLabError(f"{path}: its rope_freqs tensor matches no Llama-3 RoPE scaling llmlab knows")


# ---- the tokenizer ------------------------------------------------------------------

def tokenizer_from_gguf(reader_or_path) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (byte-level BPE, `tokenizer.ggml.model == "gpt2"`)."""
    reader = open_gguf(reader_or_path, lean=True) if isinstance(reader_or_path, (str, Path)) else reader_or_path

    def meta(key, default=None):
        return field_value(reader, key, default)

    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LLMLabError(
            f"unsupported GGUF tokenizer {kind!r} (llmlab reads byte-level BPE, tokenizer.ggml.model 'gpt2')")
    tokens = meta("tokenizer.ggml.tokens")
    merges = meta("tokenizer.ggml.merges", [])
    token_types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    # llama.cpp stores byte-level tokens already spelled in GPT-2's alphabet; respell any that are not
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    backend.pre_tokenizer = _pre_tokenizer(meta("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()

    # control tokens (<|im_start|>, ...) must be matched whole in the text, never split into bytes;
    # a "control" token outside the byte alphabet is a llama.cpp mislabel and is skipped, as transformers does
    special = [AddedToken(t, normalized=False, special=True)
               for t, kind_ in zip(tokens, token_types) if kind_ == TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    if special:
        backend.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind_ in zip(tokens, token_types) if kind_ == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)

    def token(key):
        i = meta(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, meta("tokenizer.ggml.bos_token_id"))])
    context = meta(f"{meta('general.architecture')}.context_length")
    return Tokenizer(backend, bos_token=bos, eos_token=token("eos_token_id"), pad_token=token("padding_token_id"),
                     unk_token=token("unknown_token_id"), chat_template=meta("tokenizer.chat_template"),
                     add_bos=add_bos, model_max_length=context)


def _pre_tokenizer(pre: str):
    """The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name."""
    if pre in SPLIT_BY_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    # "default", "gpt2" and anything unknown: GPT-2's own split (what transformers falls back to too)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# ---- the model ----------------------------------------------------------------------

def tensor_names(tensor, path) -> tuple[str, str]:
    """(llama.cpp's name with the layer number as {}, llmlab's parameter name) of a GGUF tensor."""
    m = LAYER.match(tensor.name)
    key = LAYER.sub("blk.{}.", tensor.name) if m else tensor.name
    if key not in TENSOR_NAMES:
        raise LLMLabError(f"{path}: unsupported GGUF tensor {tensor.name!r}")
    return key, TENSOR_NAMES[key].format(m.group(1)) if m else TENSOR_NAMES[key]
