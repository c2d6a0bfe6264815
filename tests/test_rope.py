"""Long context: RoPE scaling chosen at load time matches transformers' implementations; Self-Extend is plain
attention inside its window, the same with and without a KV cache, and refuses what it cannot do."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmlab.checkpoint.hf import load_hf_dir, save_hf_dir  # noqa: E402
from llmlab.errors import LLMLabError  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.model.rope import extend_context, parse_rope_scaling, rope_attention_factor, rope_inv_freq  # noqa: E402
from llmlab.model.self_extend import enable_self_extend  # noqa: E402

TRAINED = 64


def tiny(seed=0, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=TRAINED,
                      rope_theta=500.0, **kw)
    model = Transformer(cfg).init_weights(seed).eval()
    with torch.no_grad():  # larger than init so that positions matter to the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def hf_config(cfg: ModelConfig, **rope):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, **rope)


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_scaled_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import (_compute_dynamic_ntk_parameters, _compute_linear_scaling_rope_parameters,
                                                  _compute_yarn_parameters)
    model = tiny()
    base_theta = model.config.rope_theta
    new_len = extend_context(model, kind, 4.0)
    assert new_len == 4 * TRAINED and model.config.max_seq_len == new_len
    ours = rope_inv_freq(model.config)
    if kind == "linear":
        theirs, factor = _compute_linear_scaling_rope_parameters(
            hf_config(model.config, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    elif kind == "ntk":  # transformers' dynamic NTK at the full extended length, from the trained config
        trained = ModelConfig(**{**model.config.to_dict(), "max_seq_len": TRAINED, "rope_theta": base_theta})
        theirs, factor = _compute_dynamic_ntk_parameters(
            hf_config(trained, rope_scaling={"rope_type": "dynamic", "factor": 4.0}), seq_len=new_len)
    else:
        theirs, factor = _compute_yarn_parameters(hf_config(model.config, rope_scaling=dict(model.config.rope_scaling)))
    assert torch.allclose(ours, theirs.float(), rtol=1e-5), (ours, theirs)
    assert rope_attention_factor(model.config) == pytest.approx(factor)
    assert torch.equal(model.inv_freq, ours)  # the loaded model rotates with the new frequencies


@pytest.mark.parametrize("kind", ["yarn", "ntk"])
def test_extended_checkpoint_has_transformers_logits_past_the_trained_length(tmp_path, kind):
    """Saved after extend_context, the checkpoint is one transformers reads the same way: logits agree at positions
    beyond the trained context (YaRN's attention factor included)."""
    from transformers import AutoModelForCausalLM
    model = tiny()
    extend_context(model, kind, 2.0)
    save_hf_dir(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = torch.randint(0, 97, (1, 2 * TRAINED - 8))
    with torch.no_grad():
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-3, diff
    assert load_hf_dir(tmp_path).config.max_seq_len == 2 * TRAINED


def test_bad_scaling_specs_are_refused():
    for spec in ["yarn", "yarn:1", "rope:4", "linear:x", "ntk:-2"]:
        with pytest.raises(LLMLabError, match="--rope-scaling"):
            parse_rope_scaling(spec)
    model = tiny()
    extend_context(model, "yarn", 2.0)
    with pytest.raises(LLMLabError, match="already declares"):
        extend_context(model, "linear", 2.0)


def logits_cached(model, ids, prefill):
    """Logits of ids[prefill:], the prompt's first `prefill` tokens through a cache and the rest one at a time."""
    cache = model.new_cache(1, len(ids))
    rows = []
    with torch.no_grad():
        out = model(torch.tensor([ids[:prefill]]), torch.arange(prefill)[None], cache)
        rows.append(out[0, -1])
        for i in range(prefill, len(ids) - 1):
            rows.append(model(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache)[0, -1])
    return torch.stack(rows)


def test_self_extend_is_plain_attention_inside_its_window_and_with_group_one():
    plain, ids = tiny(), torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        reference = plain(ids)
    for group, window in [(4, 48), (1, 8)]:  # window longer than the text; group 1 = no grouping at all
        extended = tiny()
        enable_self_extend(extended, group, window)
        with torch.no_grad():
            assert (extended(ids) - reference).abs().max().item() < 1e-4


def test_self_extend_reaches_past_the_trained_context_the_same_with_a_kv_cache():
    model = tiny()
    reach = enable_self_extend(model, 4, 16)
    assert reach == (TRAINED - 16 + 4) * 4 and model.config.max_seq_len == reach
    ids = torch.randint(0, 97, (2 * TRAINED + 12,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0, 2 * TRAINED - 1:-1]
    stepped = logits_cached(model, ids, 2 * TRAINED)
    assert (full - stepped).abs().max().item() < 1e-4
    # and far keys are seen at grouped positions: the logits differ from plain attention past the window
    plain = tiny()
    with torch.no_grad():
        assert (plain(torch.tensor([ids[:TRAINED]]))[0, -1] - model(torch.tensor([ids[:TRAINED]]))[0, -1]).abs().max() > 1e-3


def test_self_extend_prefill_in_query_chunks_sees_the_same_keys(monkeypatch):
    # a chunk computes scores on the keys it can see only (near ones on the window's band): the same logits as one
    # chunk over every key, where nothing is sliced (tolerance: the same fp32 sums in another blocking)
    from llmlab.model import self_extend
    model, ids = tiny(), torch.randint(0, 97, (1, 2 * TRAINED + 12))
    enable_self_extend(model, 4, 16)
    with torch.no_grad():
        monkeypatch.setattr(self_extend, "QUERY_CHUNK", 4096)
        whole = model(ids)
        monkeypatch.setattr(self_extend, "QUERY_CHUNK", 12)
        chunked = model(ids)
    assert (whole - chunked).abs().max().item() < 1e-4


def test_self_extend_refuses_what_it_cannot_do():
    with pytest.raises(LLMLabError, match="GROUP,WINDOW"):
        enable_self_extend(tiny(), 4, TRAINED)
    from llmlab.model.quant import quantize_int4
    model = tiny()
    quantize_int4(model)
    with pytest.raises(LLMLabError, match="before quantizing"):
        enable_self_extend(model, 4, 16)
