"""Self-Extend finds a needle far past a model's trained context where plain RoPE extrapolation does not.

The model is a tiny Llama (RoPE, theta 10,000, 128-token context) trained on the passkey test
(llmlab.eval.niah.passkey_prompt) by experiments/self_extend_tiny.py and stored in tests/data/self_extend_tiny/;
it is scored by the eval's run_passkey through llmlab.load and the engine's generation path, greedy.

Issue #12 asked for "2x the trained context retrieves with Self-Extend where it fails without"; this model does not
fail at 2x without extension (100% of 100 keys; 84% at 4x); presumably (not verified) it matches the key by content
on its slowest RoPE dimensions, which barely turn in 8 x 128 positions. It fails at 8x (18% of 100 keys), where
Self-Extend retrieves every key; so the test is at 8x.
"""

from pathlib import Path

import pytest

import llmlab
from llmlab.api import LLM
from llmlab.checkpoint.load import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.eval.niah import run_passkey

CKPT = Path(__file__).parent / "data" / "self_extend_tiny"
TRAINED = 128
ROOM = 48  # prompt tokens besides the filler and needle, and the key: as in the experiment
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


def retrieval(llm, factor: int) -> float:
    """Exact retrieval over 40 keys (5 depths x 8) in prompts of about factor x the trained context; the seed
    is one the training never drew from (it drew from a range of 10^9)."""
    accuracy = run_passkey(llm, factor * TRAINED - ROOM, DEPTHS, samples=8, seed=7)
    return sum(accuracy) / len(accuracy)


def unextended(factor: int) -> LLM:
    """The checkpoint with its context limit lifted and nothing else: positions past 128 are RoPE extrapolation.
    (The engine refuses a prompt past the model's context, see the last test.)"""
    model, tokenizer, path = load_checkpoint(CKPT)
    model.config.max_seq_len = factor * TRAINED
    return LLM(model, tokenizer, path)


@pytest.fixture(scope="module")
def plain():
    return llmlab.load(CKPT, announce=False)


def test_the_checkpoint_retrieves_inside_its_trained_context(plain):
    assert plain.model.config.max_seq_len == TRAINED
    assert retrieval(plain, 1) >= 0.8


def test_without_extension_it_still_retrieves_at_twice_its_context():
    # what the test assumed fails: this tiny model extrapolates that far (see the module docstring)
    assert retrieval(unextended(2), 2) >= 0.8


def test_without_extension_it_fails_at_eight_times_its_context():
    assert retrieval(unextended(8), 8) <= 0.3  # measured 0.175 here (7 of 40), 0.18 over 100 keys in the experiment


def test_self_extend_retrieves_at_eight_times_its_context():
    llm = llmlab.load(CKPT, self_extend="16,32", announce=False)  # reach (128 - 32 + 2) x 16 = 1,568 tokens
    assert llm.model.config.max_seq_len >= 8 * TRAINED
    assert retrieval(llm, 8) >= 0.9  # measured 1.0 here and over 100 keys


def test_a_prompt_past_the_trained_context_is_refused_without_extension(plain):
    with pytest.raises(LLMLabError, match="context"):
        retrieval(plain, 2)


# ---- the attention itself, against Self-Extend's definition -----------------------------------------------


def tiny_self_extend(group, window):
    import torch

    from llmlab.model import ModelConfig, Transformer
    from llmlab.model.self_extend import enable_self_extend
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
                      rope_theta=500.0)
    model = Transformer(cfg).init_weights(0).eval()
    with torch.no_grad():  # larger than init so that positions matter
        for p in model.parameters():
            p.mul_(8) if p.dim() == 2 else None
    enable_self_extend(model, group, window)
    return model


def self_extend_by_definition(attn, x, group, window):
    """Jin et al.'s attention written out: every (query, key) logit from the true rotations when the distance is
    below the window, else from the grouped ones (query shifted by window - window // group); one causal softmax."""
    import torch
    B, T, _ = x.shape
    q, k, v = attn.project_qkv(x)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pos = torch.arange(T)[None]
    near = attn._rotate(q, pos) @ attn._rotate(k, pos).transpose(-1, -2)
    far = attn._rotate(q, pos // group + window - window // group) @ attn._rotate(k, pos // group).transpose(-1, -2)
    distance = pos[0][:, None] - pos[0][None, :]
    scores = torch.where(distance < window, near, far).masked_fill(distance < 0, float("-inf"))
    y = (scores / attn.head_dim ** 0.5).softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("group,window,chunk", [(4, 16, 256), (3, 10, 7), (2, 40, 32)])
def test_self_extend_attention_is_the_papers_definition(monkeypatch, group, window, chunk):
    import torch

    from llmlab.model import self_extend
    monkeypatch.setattr(self_extend, "QUERY_CHUNK", chunk)  # chunks that cut the window's band, and one chunk
    model = tiny_self_extend(group, window)
    attn, x = model.model.layers[0].self_attn, torch.randn(1, 150, 64)
    with torch.no_grad():
        got = attn(x, None, None, None, torch.arange(150)[None])
        want = self_extend_by_definition(attn, x, group, window)
        plain = self_extend_by_definition(attn, x, 1, window)  # group 1: the positions as they are
    # fp32 sums in another order (flash blocks, the two-part merge): 1e-4 of outputs of size ~1-10
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert (want - plain).abs().max().item() > 1e-2  # grouping changes something: the check can fail


def test_the_flash_kernel_and_the_eager_reference_agree_on_masked_rows():
    import torch

    from llmlab.model.self_extend import attend, attend_eager
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    allowed = torch.rand(1, 1, 9, 30) > 0.5
    allowed[..., 3, :] = False  # a query with no key: output 0, as the merge expects
    (y, lse), (y_ref, lse_ref) = attend(q, k, v, allowed, 0.25), attend_eager(q, k, v, allowed, 0.25)
    assert (y - y_ref).abs().max().item() < 1e-5 and (y[..., 3, :] == 0).all()
    keep = allowed.any(-1).expand_as(lse)
    assert (lse[keep] - lse_ref[keep]).abs().max().item() < 1e-5
