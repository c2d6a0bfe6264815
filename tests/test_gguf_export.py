"""GGUF export: tiny llmlab checkpoints written at every type and read back by llmlab and transformers, the real
SmolLM2 round trip, refusals, the CLI, and (when llama.cpp is built) the exported SmolLM2 running in llama.cpp."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmlab.checkpoint.gguf import (_bytes_to_unicode, field_value, load_gguf, open_gguf, tokenizer_from_gguf,
                                    unpermute_rope)
from llmlab.checkpoint.gguf_export import EXPORT_TYPES, export_checkpoint, export_gguf, permute_rope
from llmlab.checkpoint.hf import save_hf_dir
from llmlab.checkpoint.load import load_checkpoint
from llmlab.cli.main import main
from llmlab.errors import LLMLabError
from llmlab.model import ModelConfig, Transformer

# Largest allowed RMS logit error, relative to the logits' standard deviation, on a random tiny model. One
# quantization step is 1/127 of a block's largest weight for q8_0 and ~1/7.5 of it for the 4-bit types; with
# Gaussian weights (block max ~2.1 sigma) that is an RMS weight error of ~0.5% and ~8%. Measured logit errors:
# f16 0.03%, q8_0 0.8%, q4_0 5.3%, q4_1 4.5%; the bounds leave 2-3x headroom and would catch a wrong
# permutation, transposition or scale (errors of order 100%).
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "q8_0": 0.025, "q4_0": 0.15, "q4_1": 0.15}
CHAT = "<|im_start|>user\nWhat is 12 plus 30? Answer with the number.<|im_end|>\n<|im_start|>assistant\n"


def rel_rms(got, ref):
    return ((got - ref).pow(2).mean().sqrt() / ref.std()).item()


@pytest.fixture(scope="module")
def tiny_variant(tiny_ckpt, tiny_tok, tmp_path_factory):
    """A second tiny checkpoint with everything the first lacks: grouped-query attention, tied embeddings, Q/K/V
    and output biases, Llama-3 RoPE scaling, random norm weights and spare embedding rows past the tokenizer."""
    cfg = ModelConfig(vocab_size=tiny_tok.vocab_size + 8, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      max_seq_len=512, rope_theta=5000.0, norm_eps=1e-6, qkv_bias=True, o_bias=True,
                      tie_embeddings=True, eos_token_id=tiny_tok.token_to_id("<|im_end|>"),
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = Transformer(cfg).init_weights(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.5)
    return save_hf_dir(model, tmp_path_factory.mktemp("variant") / "model", tokenizer=tiny_tok)


@pytest.fixture(scope="module", params=["plain", "variant"])
def source(request, tiny_ckpt, tiny_variant):
    path = tiny_ckpt if request.param == "plain" else tiny_variant
    model, tok, _ = load_checkpoint(path)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(CHAT)]))
    return path, model, tok, logits


def test_permute_rope_is_what_import_undoes():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)
    permuted = permute_rope(w, 4)
    assert not torch.equal(permuted, w)
    # head 0 in llama.cpp's order interleaves its two halves: rows 0, 4, 1, 5, ...
    assert permuted[:4, 0].tolist() == [0.0, 12.0, 3.0, 15.0]
    assert torch.equal(unpermute_rope(permuted, 4), w)


@pytest.mark.parametrize("kind", EXPORT_TYPES)
def test_export_reads_back_in_llmlab(source, kind, tmp_path):
    path, model, tok, ref = source
    out = export_checkpoint(path, tmp_path / f"m-{kind}.gguf", kind)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind
    back, back_tok, gen = load_gguf(out)
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len",
                "rope_theta", "rope_scaling", "qkv_bias", "o_bias", "tie_embeddings", "eos_token_id"):
        assert getattr(back.config, key) == getattr(model.config, key), key
    assert back.config.norm_eps == pytest.approx(model.config.norm_eps)  # stored as float32
    assert gen["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert back_tok.chat_template == tok.chat_template
    text = "Hello, world! 12345 <|im_start|>user\n  spaces\tand ünïcödé"
    assert back_tok.encode(text) == tok.encode(text)
    with torch.no_grad():
        got = back(torch.tensor([tok.encode(CHAT)]))
    assert rel_rms(got, ref) < TOLERANCE[kind]


@pytest.mark.parametrize("kind", EXPORT_TYPES)
def test_transformers_reads_the_export(tiny_ckpt, kind, tmp_path):
    """transformers' own GGUF loader (its own un-permutation and dequantization) gives llmlab's logits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, tok, _ = load_checkpoint(tiny_ckpt)
    out = export_checkpoint(tiny_ckpt, tmp_path / f"m-{kind}.gguf", kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ours, _, _ = load_gguf(out)
    ids = torch.tensor([tok.encode(CHAT)])
    with torch.no_grad():
        theirs, same_file, original = hf(ids).logits, ours(ids), model(ids)
    assert (theirs - same_file).abs().max().item() < 1e-4  # the same stored weights: float32 rounding only
    assert rel_rms(theirs, original) < TOLERANCE[kind]


def test_tensor_types_per_export_type(tiny_ckpt, tmp_path):
    expected = {"f32": (Q.F32, Q.F32), "f16": (Q.F16, Q.F16), "q8_0": (Q.Q8_0, Q.Q8_0),
                "q4_0": (Q.Q4_0, Q.Q8_0), "q4_1": (Q.Q4_1, Q.Q8_0)}  # (a layer's weights, embeddings and head)
    for kind, (layer, head) in expected.items():
        reader = open_gguf(export_checkpoint(tiny_ckpt, tmp_path / f"{kind}.gguf", kind))
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == layer, kind
        assert types["token_embd.weight"] == types["output.weight"] == head, kind
        assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32, kind


def test_tied_embeddings_write_no_output_tensor(tiny_variant, tmp_path):
    reader = open_gguf(export_checkpoint(tiny_variant, tmp_path / "tied.gguf", "q8_0"))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert "blk.1.attn_q.bias" in names and "rope_freqs.weight" in names
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert len(tokens) == field_value(reader, "llama.vocab_size") == embedding.shape[-1]
    assert tokens[-1].startswith("[PAD") and field_value(reader, "tokenizer.ggml.token_type")[-1] == 5


# ---- the real SmolLM2 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_exports(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    return {kind: export_gguf(smollm2.model, smollm2.tokenizer, root / f"smollm2-{kind}.gguf", kind)
            for kind in ("q8_0", "q4_1")}


@pytest.fixture(scope="module")
def smol_loaded(smol_exports):
    """The exported SmolLM2 files read back by llmlab: kind -> (model, tokenizer)."""
    return {kind: load_gguf(path)[:2] for kind, path in smol_exports.items()}


def test_smollm2_q4_1_round_trip_is_lossless(smollm2, smollm2_gguf, smol_exports, smol_loaded):
    """The original is Q4_1 (Q8_0 embeddings): re-quantizing its dequantized blocks finds the same scales and codes."""
    back, _ = smol_loaded["q4_1"]
    ours = back.state_dict()
    for name, w in smollm2.model.state_dict().items():
        assert torch.equal(ours[name], w), name
    original, exported = open_gguf(smollm2_gguf), open_gguf(smol_exports["q4_1"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.context_length", "llama.rope.freq_base", "llama.block_count",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
                "llama.attention.layer_norm_rms_epsilon", "llama.feed_forward_length"):
        assert field_value(exported, key) == field_value(original, key), key


def test_smollm2_q8_0_round_trip_is_close(smollm2, smol_loaded):
    back, tok = smol_loaded["q8_0"]
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                                                                          "France? 42 + 17 = ?"}]))])
    with torch.no_grad():
        ref, got = smollm2.model(ids), back(ids)
    # 8-bit codes of the 4-bit values: 0.65% RMS weight error at worst, which 30 layers amplify to a measured 3.3%
    # RMS logit error (f16 gives 0.09%) and 2 of 46 argmax flips at near-ties; a mix-up would be ~100%
    assert rel_rms(got, ref) < 0.06
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_unknown_type_and_missing_checkpoint_are_one_line_errors(tiny_ckpt, tmp_path):
    with pytest.raises(LLMLabError, match="unknown GGUF type 'q5_k'"):
        export_checkpoint(tiny_ckpt, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(LLMLabError, match="no such file or directory"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "x.gguf", "q8_0")
    with pytest.raises(LLMLabError, match="is a directory"):
        export_checkpoint(tiny_ckpt, tmp_path, "q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch, message", [
    (dict(n_experts=4, n_experts_per_token=2), "mixture-of-experts"),
    (dict(pos_embedding="learned", norm="layernorm", mlp="gelu", qkv_bias=True, o_bias=True), "GPT-2 style"),
    (dict(mlp_bias=True), "MLP biases"),
])
def test_unexportable_architectures_are_refused(tiny_tok, tmp_path, arch, message):
    model = Transformer(ModelConfig(vocab_size=tiny_tok.vocab_size, dim=64, n_layers=1, n_heads=4, hidden_dim=64,
                                    **arch))
    with pytest.raises(LLMLabError, match=message):
        export_gguf(model, tiny_tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_pre_tokenizer_is_refused_and_the_old_file_kept(tiny_ckpt, tmp_path):
    from tokenizers import pre_tokenizers

    model, tok, _ = load_checkpoint(tiny_ckpt)
    out = export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    before = out.read_bytes()
    tok.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(LLMLabError, match="pre-tokenizer"):
        export_gguf(model, tok, out, "q8_0")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_export(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert main(["export", "gguf", str(tiny_ckpt), "--type", "q4_1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert field_value(open_gguf(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    assert main(["export", "gguf", str(tiny_ckpt), "--type", "int3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GGUF type 'int3'" in err


# ---- llama.cpp runs the export -------------------------------------------------------------------------------


def llama_tool(name: str) -> Path | None:
    """A llama.cpp tool as benchmarks/build_llamacpp.sh builds it (or from $LLAMACPP_BIN / PATH), if it is there."""
    home = Path(os.environ.get("LLMLAB_HOME", Path.home() / ".cache" / "llmlab"))
    for d in (os.environ.get("LLAMACPP_BIN"), home / "llama.cpp" / "build" / "bin"):
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    found = shutil.which(name)
    return Path(found) if found else None


def needs(name):
    return pytest.mark.skipif(llama_tool(name) is None,
                              reason=f"llama.cpp's {name} is not built: run `bash benchmarks/build_llamacpp.sh`")


def llama_simple_greedy(gguf_file, prompt: str, n: int) -> bytes:
    """The bytes llama.cpp's llama-simple generates greedily after `prompt` (at most n tokens, stops at end-of-turn)."""
    run = subprocess.run([str(llama_tool("llama-simple")), "-m", str(gguf_file), "-n", str(n), prompt],
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    assert run.stdout.startswith(prompt.encode())  # it echoes the prompt token by token: same vocabulary, spelling
    return run.stdout[len(prompt.encode()):].removesuffix(b"\n")


def llmlab_greedy(model, tok, prompt: str, n: int, margin: float) -> tuple[bytes, int]:
    """llmlab's greedy continuation as bytes, cut before the first token chosen by less than `margin` nats over the
    runner-up (where another runtime's rounding may rightly choose differently), and how many tokens that keeps."""
    from llmlab.engine import Engine, SamplingParams

    params = SamplingParams(max_new_tokens=n, temperature=0, logprobs=True, top_logprobs=2)
    done = Engine(model, tok).generate([tok.encode(prompt)], params)[0]
    gaps = [a - b for a, b in (list(top.values())[:2] for top in done.top_logprobs[:len(done.token_ids)])]
    k = next((i for i, gap in enumerate(gaps) if gap < margin), len(gaps))
    return token_bytes(tok, done.token_ids[:k]), k


def token_bytes(tok, ids) -> bytes:
    """The raw bytes of tokens (a byte-level token may hold part of a UTF-8 character); special tokens as text."""
    alphabet = {c: b for b, c in _bytes_to_unicode().items()}
    special = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    return b"".join(tok.id_to_token(i).encode() if i in special else bytes(alphabet[c] for c in tok.id_to_token(i))
                    for i in ids)


@needs("llama-tokenize")
@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_llama_cpp_tokenizes_like_llmlab(which, smol_exports, tiny_variant, tmp_path):
    gguf_file = smol_exports["q8_0"] if which == "smollm2" else export_checkpoint(tiny_variant, tmp_path / "t.gguf")
    tok = tokenizer_from_gguf(gguf_file)
    text = ("<|im_start|>user\nHello, world!  It's 2024: 12345 apples cost $3.50.\n\n\tdon't   stop\n"
            "Ünïcödé — naïve café 東京 🙂<|im_end|>")
    run = subprocess.run([str(llama_tool("llama-tokenize")), "-m", str(gguf_file), "--stdin", "--ids", "--no-escape",
                          "--log-disable"], input=text.encode(), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    assert json.loads(run.stdout) == tok.encode(text, add_special_tokens=True)


@needs("llama-simple")
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
@pytest.mark.parametrize("question", ["What is the capital of Japan?", "What colour is the sky on a clear day?"])
def test_llama_cpp_runs_smollm2_export_greedily_like_llmlab(smol_exports, smol_loaded, kind, question):
    model, tok = smol_loaded[kind]
    prompt = tok.apply_chat_template([{"role": "user", "content": question}])
    # llama.cpp multiplies the quantized weights by 8-bit-quantized activations, llmlab by float32 ones: measured on
    # SmolLM2, that flips choices between tokens up to ~0.14 nats apart ("The" vs "L" for "What is the capital of
    # France?"). Tokens llmlab prefers by 0.5 nats or more must be llama.cpp's too; these questions have 7 such
    # tokens in a row ("The capital of Japan is Tokyo.", "The sky on a clear day is"), a wrong export none.
    ours, k = llmlab_greedy(model, tok, prompt, 10, margin=0.5)
    assert k >= 5
    assert llama_simple_greedy(smol_exports[kind], prompt, 10).startswith(ours)


@needs("llama-simple")
def test_llama_cpp_runs_the_tiny_variant_like_llmlab(tiny_variant, tmp_path):
    """GQA, tied embeddings, attention biases, Llama-3 RoPE factors and a padded vocabulary, as llama.cpp runs them.
    In f32 only llama.cpp's float16 KV cache rounds: ~1e-4 on these logits (std 0.16), so every choice made by
    0.005 nats or more must agree. Several prompts, because a random model soon repeats one token."""
    out = export_checkpoint(tiny_variant, tmp_path / "tiny-f32.gguf", "f32")
    model, tok, _ = load_gguf(out)
    compared = 0
    for prompt in (CHAT, "Hello", "12 + 30 = 42", "<|im_start|>system\nBe brief.<|im_end|>\n", "one two three four"):
        ours, k = llmlab_greedy(model, tok, prompt, 6, margin=0.005)
        assert llama_simple_greedy(out, prompt, 6).startswith(ours), prompt
        compared += k
    assert compared >= 20
