"""GGUF import: dequantization per type, llama.cpp's Q/K permutation undone, bad files refused, and the real
SmolLM2 GGUF giving the same logits as transformers' own GGUF loader."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmlab.checkpoint.gguf import dequantize, load_gguf, open_gguf, read_gguf
from llmlab.errors import LLMLabError
from helpers import assert_greedy_up_to_ties, write_tokenizer_gguf

ROWS, COLS = 6, 512  # not square, so a transposed read fails; COLS a multiple of every block size


def write_gguf(path, arch="llama", tensors=(), metadata=None):
    """tensors: (name, array, raw_dtype or None); raw arrays are bytes per row, as gguf.quants returns them."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        getattr(w, key)(*value) if isinstance(value, tuple) else getattr(w, key)(value)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_k_blocks(qtype, n_blocks, rng):
    """Random K-quant blocks (gguf cannot quantize these) with finite, moderate fp16 scales in place."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        blocks[:, :4] = scales
    elif qtype == Q.Q6_K:  # d ends the block
        blocks[:, -2:] = scales[:, :2]
    return blocks


@pytest.mark.parametrize("lean", [False, True], ids=["GGUFReader", "GGUFFile"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_dequantize_each_type(tmp_path, qtype, lean):
    rng = np.random.default_rng(int(qtype))
    original = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype == Q.F32:
        stored, raw, expected = original, None, original
    elif qtype == Q.F16:
        stored, raw, expected = original.astype(np.float16), None, original.astype(np.float16).astype(np.float32)
    elif qtype in (Q.Q4_K, Q.Q6_K):
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        stored = random_k_blocks(qtype, ROWS * COLS // block_size, rng).reshape(ROWS, -1)
        raw, original = qtype, None
        expected = gguf.quants.dequantize(stored, qtype)
    else:
        stored, raw = gguf.quants.quantize(original, qtype), qtype
        expected = gguf.quants.dequantize(stored, qtype)
    norm = rng.standard_normal(COLS).astype(np.float32)
    path = write_gguf(tmp_path / "t.gguf", tensors=[("w.weight", stored, raw), ("n.weight", norm, None)])
    tensors = {t.name: t for t in open_gguf(path, lean=lean).tensors}
    w = dequantize(tensors["w.weight"])
    assert w.dtype == torch.float32 and tuple(w.shape) == (ROWS, COLS)
    # bit-equal by design: the same gguf-py dequantizer on the same bytes, then only a reshape
    np.testing.assert_array_equal(w.numpy(), expected.reshape(ROWS, COLS))
    if original is not None:  # and it is the matrix we quantized, up to the format's precision
        tolerance = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 2e-2, Q.Q8_0: 0.05}.get(qtype, 0.5)
        assert np.abs(w.numpy() - original).max() <= tolerance
    else:
        assert np.isfinite(w.numpy()).all() and w.abs().max() > 0
    np.testing.assert_array_equal(dequantize(tensors["n.weight"]).numpy(), norm)


def test_lean_reader_reads_what_gguf_reader_reads(smollm2_gguf):
    # loading uses GGUFFile (no memory map, no per-token arrays): every metadata value, tensor entry and tensor byte
    # of the real file must be what gguf's own reader gives (it adds pseudo-fields for the header: GGUF.*)
    stock, lean = open_gguf(smollm2_gguf), open_gguf(smollm2_gguf, lean=True)
    assert set(lean.fields) == {k for k in stock.fields if not k.startswith("GGUF.")}
    for key, field in lean.fields.items():
        ours, theirs = field.contents(), stock.fields[key].contents()
        assert ours == theirs and type(ours) is type(theirs), key
    assert [t.name for t in lean.tensors] == [t.name for t in stock.tensors]
    for ours, theirs in zip(lean.tensors, stock.tensors):
        assert (ours.tensor_type, ours.shape, ours.n_bytes) == (theirs.tensor_type, tuple(theirs.shape), theirs.n_bytes)
        data = ours.data
        assert data.flags.writeable and data.dtype == theirs.data.dtype
        np.testing.assert_array_equal(data, theirs.data)


# ---- a whole tiny Llama written the way llama.cpp's converter writes it -------------------------------------


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(theta, head_dim, factor, low, high, old_len):
    """convert_hf_to_gguf.py's Llama-3 rope_freqs tensor: llama.cpp divides each frequency by these."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_tiny_llama(tmp_path, tie, qtype=Q.F32, rope_scaling=None):
    """A random HF Llama and the GGUF llama.cpp's converter would make of it; returns (hf_model, path)."""
    transformers = pytest.importorskip("transformers")

    tokens = write_tokenizer_gguf(tmp_path / "tok.gguf", pre="llama-bpe", add_bos=False)
    tokens_reader = open_gguf(tmp_path / "tok.gguf")
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, **(rope_scaling or {})})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1: make them random so a mix-up would show
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = []
    for name, w in sd.items():
        if name == "lm_head.weight" and tie:
            continue
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gguf_name = f"blk.{i}.{per_layer[module]}.{rest[-1]}"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
        else:
            gguf_name = names[name]
        if w.ndim == 2 and qtype != Q.F32:
            tensors.append((gguf_name, gguf.quants.quantize(w, qtype), qtype))
        else:
            tensors.append((gguf_name, w, None))

    if rope_scaling:
        r = rope_scaling
        factors = llama_cpp_rope_factors(r["rope_theta"], cfg.hidden_size // cfg.num_attention_heads, r["factor"],
                                         r["low_freq_factor"], r["high_freq_factor"],
                                         r["original_max_position_embeddings"])
        tensors.append(("rope_freqs.weight", factors, None))
    meta = {
        "add_context_length": cfg.max_position_embeddings, "add_embedding_length": cfg.hidden_size,
        "add_block_count": cfg.num_hidden_layers, "add_feed_forward_length": cfg.intermediate_size,
        "add_head_count": cfg.num_attention_heads, "add_head_count_kv": cfg.num_key_value_heads,
        "add_rope_freq_base": cfg.rope_parameters["rope_theta"], "add_layer_norm_rms_eps": cfg.rms_norm_eps,
        "add_rope_dimension_count": cfg.hidden_size // cfg.num_attention_heads,
    }
    # copy the tokenizer metadata over from the tokenizer-only file
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for key, value in meta.items():
        getattr(w, key)(value)
    for field in tokens_reader.fields.values():
        if field.name.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, value, vtype, sub_type=sub)
    for name, array, raw in tensors:
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, tmp_path / "tiny.gguf"


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_round_trips_to_hf_weights(tmp_path, tie):
    hf, path = write_tiny_llama(tmp_path, tie)
    cfg, sd, tok = read_gguf(path)
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.hidden_dim) == (2, 4, 2, 64, 96)
    assert cfg.tie_embeddings == tie and cfg.rope_theta == 5000.0 and cfg.vocab_size == hf.config.vocab_size
    expected = hf.state_dict()
    if tie:
        expected.pop("lm_head.weight")
    assert sd.keys() == expected.keys()
    for name, w in expected.items():  # F32 bytes copied and rows permuted back: bit-equal by design
        assert torch.equal(sd[name], w), name

    model, tok, gen = load_gguf(path)
    assert gen["eos_token_id"] == tok.eos_token_id
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    bf16, _, _ = load_gguf(path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_llama3_rope_frequencies_become_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # what Llama 3.x use
    hf, path = write_tiny_llama(tmp_path, tie=True, rope_scaling=scaling)
    model, tok, _ = load_gguf(path)
    assert model.config.rope_theta == 500000.0
    assert model.config.rope_scaling == {k: v for k, v in scaling.items() if k != "rope_theta"}
    # all three bands (kept, interpolated, slowed) occur at this head size
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ratio = base / model.inv_freq
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()
    torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq)
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog " * 3)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_tiny_llama_matches_transformers_gguf_loader(tmp_path):
    """transformers reads GGUF too: its own un-permutation must agree with ours, quantized weights included."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _, path = write_tiny_llama(tmp_path, tie=False, qtype=Q.Q8_0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32)
    _, ours, _ = read_gguf(path)
    for name, w in theirs.state_dict().items():  # the same gguf-py dequantizer, rows only reordered: bit-equal
        assert torch.equal(ours[name], w), name


# ---- bad input --------------------------------------------------------------------------------------------


def test_truncated_gguf_is_refused(tmp_path):
    _, path = write_tiny_llama(tmp_path, tie=True, qtype=Q.Q4_1)
    data = path.read_bytes()
    # cut inside the last tensor (once the "cannot reshape array" numpy error), mid-file, in the metadata, the header
    for keep in (len(data) - 7, len(data) // 2, 100, 10):
        bad = tmp_path / f"cut{keep}.gguf"
        bad.write_bytes(data[:keep])
        with pytest.raises(LLMLabError, match=rf"cut{keep}\.gguf is truncated or corrupt: it has {keep:,} bytes"):
            load_gguf(bad)


def test_non_gguf_bytes_are_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(LLMLabError, match="is not a valid GGUF file"):
        load_gguf(bad)
    with pytest.raises(LLMLabError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2",
                      tensors=[("token_embd.weight", np.zeros((4, 8), np.float32), None)],
                      metadata={"add_block_count": 1})
    with pytest.raises(LLMLabError, match="architecture 'gpt2'"):
        load_gguf(path)


# ---- the real SmolLM2 GGUF -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_pair(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ours = load_gguf(smollm2_gguf)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                               dtype=torch.float32).eval()
    return ours, theirs


def test_smollm2_logits_match_transformers(smol_pair):
    (model, tok, gen), hf = smol_pair
    assert gen == {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    assert gen["eos_token_id"] == hf.config.eos_token_id
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert model.config.n_kv_heads == hf.config.num_key_value_heads
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? 42 + 17 = ?"}])
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_smollm2_weights_equal_transformers(smol_pair):
    (model, _, _), hf = smol_pair
    ours = model.state_dict()
    for name, w in hf.state_dict().items():  # the same gguf-py dequantizer, rows only reordered: bit-equal
        assert torch.equal(ours[name], w), name


@pytest.mark.parametrize("question", [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
])
def test_smollm2_greedy_tokens_match_transformers(smol_pair, question):
    from llmlab.engine import Engine, SamplingParams

    (model, tok, _), hf = smol_pair
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
    ours = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True))[0]
    # transformers' logits before each of our tokens (teacher-forced on our sequence): each of our tokens must
    # be its greedy choice, up to twice the 1e-3 the two implementations' logits may differ by
    with torch.no_grad():
        theirs = hf(torch.tensor([ids + ours.token_ids])).logits[0, len(ids) - 1:-1]
    assert_greedy_up_to_ties(theirs, ours.token_ids, margin=2e-3)
