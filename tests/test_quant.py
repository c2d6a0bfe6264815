"""4-bit decoding copies: exact on Q4_1/Q8_0-shaped weights, close to the dense model, refused where wrong."""

import copy

import pytest
import torch

from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.model import ModelConfig, Transformer
from llmlab.model.lora import apply_lora
from llmlab.model.quant import Int4Attention, Int4Linear, Int4Matmul, Int4SwiGLU, quantize_int4
from helpers import ByteTokenizer, assert_greedy_up_to_ties, decode_logits


@pytest.fixture(autouse=True)
def no_grad():  # only in this module's tests: a module-level set_grad_enabled(False) leaks into later test files
    with torch.no_grad():
        yield


def linear_with(weight, bias=None):
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


def test_q4_1_weights_are_repacked_exactly():
    # weights of the form d*q + m per group of 32 (GGUF Q4_1), with d and m representable in bf16
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 96, 128
    q = torch.randint(0, 16, (out_f, in_f // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole range, as Q4_1's min/max quantization makes it
    d = (torch.rand(out_f, in_f // 32, 1, generator=g) * 0.01 + 0.001).bfloat16().float()
    m = (-8 * d).bfloat16().float() + (torch.randn(out_f, in_f // 32, 1, generator=g) * 1e-3).bfloat16().float()
    weight = (d * q + m).reshape(out_f, in_f)
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(3, in_f, generator=g).bfloat16().float()  # the kernel takes bf16 activations
    y = Int4Matmul([linear_with(weight, bias)])(x)[0]
    expected = x.double() @ weight.double().T + bias.double()
    # what is left is the bf16 rounding of the kernel's output (and of the zero point m + 8d)
    assert torch.allclose(y.double(), expected, rtol=1e-2, atol=2e-3)


def test_8_bit_planes_are_exact_for_q8_0_weights_and_fused_projections_split():
    g = torch.Generator().manual_seed(1)
    a = (torch.randint(-127, 128, (40, 64), generator=g) * 2.0**-9)  # Q8_0 with a power-of-two scale
    b = torch.randn(24, 64, generator=g) * 0.05
    x = torch.randn(2, 5, 64, generator=g).bfloat16().float()
    ya, yb = Int4Matmul([linear_with(a), linear_with(b)], bits=8)(x)
    assert ya.shape == (2, 5, 40) and yb.shape == (2, 5, 24)
    expected = x.double() @ a.double().T
    # each plane's output is rounded to bf16 (2^-9 relative) before the two are added
    assert (ya.double() - expected).abs().max() < 2**-7 * expected.abs().max()
    # a weight that is not on an 8-bit grid: quantization error is that of 8 bits per group of 32
    assert (yb - x @ b.T).abs().max() < 0.02 * (x @ b.T).abs().max()


def tiny_model(**overrides):
    cfg = ModelConfig(**{**dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                max_seq_len=256), **overrides})
    return Transformer(cfg).init_weights(seed=5).eval()


def dequantized(int4: Int4Matmul) -> list[torch.Tensor]:
    """The weights a 4-bit copy holds, read back by multiplying the identity (to bf16 precision)."""
    outputs = int4(torch.eye(int4.in_features))  # row i of each output is W e_i + b
    biases = int4.bias.split(int4.splits) if int4.bias is not None else [0] * len(outputs)
    return [(y - b).T for y, b in zip(outputs, biases)]


def dense_twin(model):
    """A copy whose dense weights are exactly what the quantized model's 4-bit copies hold (run it on > 4 rows)."""
    twin = copy.deepcopy(model)
    groups = []
    for module in twin.modules():
        if isinstance(module, Int4Attention):
            groups.append((module.qkv_int4, [module.q_proj, module.k_proj, module.v_proj]))
        elif isinstance(module, Int4SwiGLU):
            groups.append((module.gate_up_int4, [module.gate_proj, module.up_proj]))
        elif isinstance(module, Int4Linear):
            groups.append((module.int4, [module]))
    for int4, linears in groups:
        for lin, weight in zip(linears, dequantized(int4)):
            lin.weight = torch.nn.Parameter(weight.float().clone())  # unties a tied head on purpose
    return twin


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_quantized_decode_computes_with_the_4_bit_weights(overrides):
    model = tiny_model(**overrides)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    dense = model(prompt)
    names = set(model.state_dict())
    quantize_int4(model)
    assert set(model.state_dict()) == names  # checkpoints keep only the dense weights, under the same names
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # 8 rows: prefill stays dense. The same weights through the same matmul; the 4-bit path would be ~1e-2 off
    assert torch.allclose(model(prompt), dense, atol=1e-6)
    # one row at a time (decode) goes through the 4-bit copies: the dense twin's output, up to bf16 rounding
    cache = model.new_cache(1, 16)
    quantized = torch.cat([model(prompt[:, i:i + 1], torch.tensor([[i]]), cache)[0] for i in range(8)])
    expected = dense_twin(model)(prompt)[0]
    assert not torch.allclose(expected, dense[0], atol=1e-3)  # 4 bits are not the dense weights
    assert (quantized - expected).abs().max() < 0.02 * expected.abs().max()


def test_compiled_quantized_decode_matches_eager():
    model = quantize_int4(tiny_model())
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    params = SamplingParams(max_new_tokens=10, temperature=0, logprobs=True)
    compiled = Engine(model, ByteTokenizer(), compile=True).generate(prompts, params)
    for prompt, c in zip(prompts, compiled):
        # the eager model's logits along the compiled model's tokens: compiled kernels round differently (up
        # to the 1e-3 compared below), so where two tokens are that close either is a correct greedy choice
        eager = decode_logits(model, prompt, c.token_ids)
        assert_greedy_up_to_ties(eager, c.token_ids, margin=2e-3)
        want = torch.log_softmax(eager, -1)[torch.arange(len(c.token_ids)), c.token_ids]
        assert max(abs(a - b) for a, b in zip(c.logprobs, want.tolist())) < 1e-3


def test_quantizing_a_model_with_lora_adapters_is_refused():
    model = apply_lora(tiny_model(), r=4)
    with pytest.raises(LLMLabError, match="merge"):
        quantize_int4(model)


def test_smollm2_in_4_bits_predicts_like_the_bf16_model(smollm2_gguf):
    """On the real Q4_1 file, the 4-bit decode path is as close to fp32 as the bf16 model is."""
    from llmlab.checkpoint.gguf import load_gguf
    from llmlab.checkpoint.gguf import tokenizer_from_gguf

    tok = tokenizer_from_gguf(smollm2_gguf)
    text = ("The printing press spread across Europe in the fifteenth century. Books became cheaper, and more "
            "people learned to read. Scholars could compare the same text in many cities at once.")
    ids = torch.tensor([tok.encode(text)])
    n = ids.shape[1]

    def stepwise(model):  # decode one token at a time through a KV cache, teacher-forced
        cache = model.new_cache(1, n)
        return torch.cat([model(ids[:, i:i + 1], torch.tensor([[i]]), cache)[0] for i in range(n)]).float()

    reference = load_gguf(smollm2_gguf, dtype=torch.float32)[0](ids)[0]
    bf16 = load_gguf(smollm2_gguf, dtype=torch.bfloat16)[0]
    bf16_logits = stepwise(bf16)
    int4_logits = stepwise(quantize_int4(bf16))
    agree = lambda logits: (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()  # noqa: E731
    error = lambda logits: (logits - reference).abs().mean().item()  # noqa: E731
    assert agree(int4_logits) >= agree(bf16_logits) - 0.05
    assert error(int4_logits) < 2 * error(bf16_logits)


def test_a_vocabulary_the_kernel_cannot_pack_keeps_a_dense_head():
    model = quantize_int4(tiny_model(vocab_size=300))  # GPT-2-like: not a multiple of 16
    assert not isinstance(model.lm_head, Int4Linear) and isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    out = Engine(model, ByteTokenizer()).generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(out[0].token_ids) == 4
