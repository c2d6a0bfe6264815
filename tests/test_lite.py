"""The lite runner (llmlab.engine.native.lite): a quantized GGUF or checkpoint run with no PyTorch in the process gives
the tokens llmlab.load's native path gives (greedy and seeded sampling, on SmolLM2 and on tiny exports and quantized
checkpoints with tied embeddings, biases and grouped-query attention), refuses what it cannot run, and `llmlab
generate` and `llmlab chat` take it by default."""

import json
import os
import subprocess
import sys

import pytest
import torch

import llmlab
from llmlab.checkpoint.gguf_export import export_checkpoint
from llmlab.checkpoint.hf import save_hf_dir
from llmlab.engine.native.lite import LiteModel, MersenneUniforms
from llmlab.errors import LLMLabError
from llmlab.model import ModelConfig, Transformer

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Summarise in one sentence: the quick brown fox jumps over the lazy dog, twice, then sleeps."]
OPTIONS = [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}, {"temperature": 1.0, "top_k": 20, "seed": 3}]

LITE = """
import json, sys
from llmlab.engine.native.lite import LiteModel
model = LiteModel(sys.argv[1])
runs = json.loads(sys.argv[2])
texts = ["".join(model.stream(model.tokenizer.prompt_ids(p), model.params(max_new_tokens=40, **o))) for p, o in runs]
print(json.dumps({"texts": texts, "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def native():
    return llmlab.load("smollm2", announce=False)  # the default: the native kernel on the file's own Q4_1 weights


def test_smollm2_lite_matches_the_native_path_without_importing_torch(smollm2_gguf, native):
    runs = [(p, o) for p in PROMPTS for o in OPTIONS]
    done = subprocess.run([sys.executable, "-c", LITE, str(smollm2_gguf), json.dumps(runs)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    expected = ["".join(native.stream(p, max_new_tokens=40, **o)) for p, o in runs]
    assert result["texts"] == expected
    assert "Paris" in result["texts"][0]


def test_uniforms_are_torch_generators(tmp_path):
    for seed in (0, 1, 7, 2**31 + 5, 2**32 - 1):
        g = torch.Generator().manual_seed(seed)
        mine = MersenneUniforms(seed)
        assert [mine.next() for _ in range(6)] == [torch.rand(1, dtype=torch.float64, generator=g).item()
                                                   for _ in range(6)]


@pytest.fixture(scope="module")
def tiny_tied(tiny_tok, tmp_path_factory):
    """A tiny Llama with what SmolLM2 lacks: tied embeddings, Q/K/V and output biases, grouped-query attention."""
    cfg = ModelConfig(vocab_size=tiny_tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      max_seq_len=256, rope_theta=5000.0, qkv_bias=True, o_bias=True, tie_embeddings=True,
                      eos_token_id=tiny_tok.token_to_id("<|im_end|>"))
    model = Transformer(cfg).init_weights(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return save_hf_dir(model, tmp_path_factory.mktemp("tied") / "model", tokenizer=tiny_tok)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("which", ["plain", "tied"])
def test_tiny_exports_match_the_native_path(which, kind, tiny_ckpt, tiny_tied, tmp_path):
    gguf = export_checkpoint(tiny_ckpt if which == "plain" else tiny_tied, tmp_path / f"{kind}.gguf", kind)
    assert_same_completions(gguf)


def assert_same_completions(path):
    """The lite runner and llmlab.load's native path complete a prompt alike, greedy and sampled."""
    lite, packed = LiteModel(path), llmlab.load(str(path), announce=False)
    for options in OPTIONS:
        ids = lite.tokenizer.prompt_ids("Hello there")
        mine = "".join(lite.stream(ids, lite.params(max_new_tokens=24, ignore_eos=True, **options)))
        assert mine == "".join(packed.stream("Hello there", max_new_tokens=24, ignore_eos=True, **options))


def test_quantized_checkpoints_run_as_the_gguf_they_came_from(smollm2_gguf, native, tmp_path):
    saved = native.save_quantized(tmp_path / "smollm2-q")  # the file's own blocks, in an HF-layout directory
    from_dir, from_file = LiteModel(saved), LiteModel(smollm2_gguf)
    assert from_dir.weights == "the checkpoint's packed weights (exact)"
    for prompt in PROMPTS[:2]:
        for options in OPTIONS[:2]:
            texts = ["".join(m.stream(m.tokenizer.prompt_ids(prompt), m.params(max_new_tokens=24, **options)))
                     for m in (from_dir, from_file)]
            assert texts[0] == texts[1]


@pytest.mark.parametrize("which", ["plain", "tied"])
def test_tiny_quantized_checkpoints_match_the_native_path(which, tiny_ckpt, tiny_tied, tmp_path):
    assert_same_completions(llmlab.load(str(tiny_ckpt if which == "plain" else tiny_tied), announce=False)
                            .save_quantized(tmp_path / "q"))


def test_a_chat_turn_prefills_only_what_is_new(smollm2_gguf):
    import numpy as np

    model = LiteModel(smollm2_gguf)
    story = ("Mara kept bees on the roof of a library in Lisbon. Every spring she counted the hives, wrote the numbers "
             "in a green notebook and sold the honey to the cafe across the square. ") * 2
    chat = [{"role": "user", "content": story + "Where did Mara keep her bees?"}]
    greedy = model.params(max_new_tokens=24, temperature=0)
    reply = "".join(model.stream(model.tokenizer.prompt_ids(chat), greedy, reuse=True))
    ids = model.tokenizer.prompt_ids(chat + [{"role": "assistant", "content": reply},
                                             {"role": "user", "content": "And what did she sell?"}])
    start = model.reusable(ids)
    assert start >= 64 and start < len(ids)  # the first turn and its reply, up to where the template differs
    second = "".join(model.stream(ids, greedy, reuse=True))
    assert model.prefilled == len(ids) - start and second
    # the reused rows were decode steps and other chunks: the logits differ from a whole prefill's by rounding only
    model.new_cache(len(ids), keep=start)
    reused = model.prefill(ids[start:], start)
    fresh = model.prefill(ids)
    assert np.abs(reused - fresh).max() < 1.0  # (measured 0.17 on logits up to 34)


def test_what_it_cannot_run_or_honour_is_refused(tiny_ckpt, smollm2_gguf, tmp_path):
    with pytest.raises(LLMLabError, match="F16"):
        LiteModel(export_checkpoint(tiny_ckpt, tmp_path / "f16.gguf", "f16"))
    with pytest.raises(LLMLabError, match="not dense ones"):
        LiteModel(tiny_ckpt)
    saved = llmlab.load(str(tiny_ckpt), announce=False).save_quantized(tmp_path / "q")
    (saved / "model.safetensors").write_bytes(b"\x10" * 100)  # a damaged copy: one error line, no traceback
    with pytest.raises(LLMLabError, match="not a valid safetensors file"):
        LiteModel(saved)
    lite = LiteModel(smollm2_gguf)
    ids = lite.tokenizer.prompt_ids("Hi")
    for options, what in (({"repetition_penalty": 1.2}, "repetition penalty"), ({"logprobs": True}, "logprobs"),
                          ({"seed": 2**40}, "seed")):
        with pytest.raises(LLMLabError, match=what):
            list(lite.stream(ids, lite.params(max_new_tokens=4, **options)))
    with pytest.raises(LLMLabError, match="context window"):
        list(lite.stream([1] * lite.context_len, lite.params(max_new_tokens=4)))


def test_llmlab_generate_takes_the_lite_path_by_default(smollm2_gguf, native):
    prompt = "What is the capital of France?"
    cmd = [sys.executable, "-X", "importtime", "-m", "llmlab.cli", "generate", prompt, "-t", "0", "-n", "30"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "without PyTorch" in done.stderr
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported and "torch" not in imported
    assert done.stdout.strip() == "".join(native.stream(prompt, max_new_tokens=30, temperature=0)).strip()
    # an option it cannot honour, or LLMLAB_LITE=0, takes the PyTorch path (and says so)
    for extra, env in ((["--repetition-penalty", "1.1"], {}), ([], {"LLMLAB_LITE": "0"})):
        done = subprocess.run([sys.executable, "-m", "llmlab.cli", "generate", prompt, "-t", "0", "-n", "8", *extra],
                              capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "without PyTorch" not in done.stderr and "prompts prefill through it too" in done.stderr


def test_a_bad_llmlab_lite_setting_is_one_error_line(smollm2_gguf):
    done = subprocess.run([sys.executable, "-m", "llmlab.cli", "generate", "hi", "-n", "2"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "LLMLAB_LITE": "yes"})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "llmlab: error: LLMLAB_LITE must be 0 (the PyTorch path) or 1, got 'yes'"]


def test_llmlab_chat_answers_as_the_pytorch_path_does(smollm2_gguf):
    lines = "Hi\nWhat is 2+2?\n"  # (turns this short share < REUSE_MIN_TOKENS: each is prefilled whole, as there)
    out = {}
    for lite in ("1", "0"):
        done = subprocess.run([sys.executable, "-m", "llmlab.cli", "chat", "-t", "0", "-n", "16"], input=lines,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "LLMLAB_LITE": lite})
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("without PyTorch" in done.stderr) == (lite == "1")
        out[lite] = done.stdout
    assert out["1"] == out["0"] and len(out["1"].strip().splitlines()) == 2
