"""Logits parity with transformers in both directions, for each architecture family llmlab represents."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmlab.checkpoint.hf import load_hf_dir, save_hf_dir  # noqa: E402
from llmlab.errors import LLMLabError  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def hf_models():
    from transformers import (GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config)
    return {
        "llama-gqa": LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=500.0),
        "llama-mqa-tied": LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
        "llama3-rope-bias": LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16}),
        "mistral": MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
        "qwen2": Qwen2Config(**SMALL, num_key_value_heads=2),
        "mixtral": MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "gpt2": GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    }


def random_hf_model(name):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_models()[name], attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of them shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", list(hf_models()))
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, name):
    hf = random_hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    idx = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", list(hf_models()))
def test_llmlab_checkpoint_loads_in_transformers_with_same_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM
    hf = random_hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_dir(tmp_path / "hf")
    save_hf_dir(ours, tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    idx = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        diff = (ours(idx) - back(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


# Two forward passes of the same weights through the same code may still differ in the last bits: the CPU
# kernels pick their summation order by memory layout and instruction set (3e-8 seen on AMD). 1e-5 is far
# below any real difference (a wrong setting or weight moves logits by 1e-3 or more) and far above rounding.
SAME_MODEL_ATOL = 1e-5


def test_moe_from_scratch_round_trips_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, n_experts=4,
                      n_experts_per_token=2, max_seq_len=64)  # Mixtral routing: top-2, renormalised
    ours = Transformer(cfg).init_weights(seed=1).eval()
    save_hf_dir(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
    idx = torch.randint(0, 50, (1, 9))
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = load_hf_dir(tmp_path)
    with torch.no_grad():
        assert (ours(idx) - back(idx).logits).abs().max() < 1e-4
        assert (ours(idx) - again(idx)).abs().max() < SAME_MODEL_ATOL


def test_switch_routing_and_capacity_survive_a_round_trip(tmp_path):
    """Top-1 without renormalisation and a capacity factor: Mixtral has no keys for them, llmlab writes its own."""
    from transformers import AutoConfig
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, n_experts=4,
                      n_experts_per_token=1, moe_normalize_topk=False, moe_capacity_factor=1.0, max_seq_len=64)
    ours = Transformer(cfg).init_weights(seed=1).eval()
    save_hf_dir(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["llmlab_moe_normalize_topk"] is False and written["llmlab_moe_capacity_factor"] == 1.0
    again = load_hf_dir(tmp_path)
    assert (again.config.moe_normalize_topk, again.config.moe_capacity_factor) == (False, 1.0)
    assert "llmlab_moe_normalize_topk" not in again.config.extra_hf  # read as settings, not carried as unknowns
    AutoConfig.from_pretrained(tmp_path)  # transformers still reads the file (and ignores llmlab's keys)
    idx = torch.randint(0, 50, (2, 16))
    mixtral_routing = Transformer(ModelConfig(**{**cfg.to_dict(), "moe_normalize_topk": True,
                                                 "moe_capacity_factor": 0.0}))
    mixtral_routing.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (ours(idx) - again(idx)).abs().max() < SAME_MODEL_ATOL
        assert (ours(idx) - mixtral_routing(idx)).abs().max() > 1e-3  # the settings matter for these weights
    assert 0 < ours.model.layers[0].mlp.dropped_fraction == again.model.layers[0].mlp.dropped_fraction


def test_sharded_checkpoint_loads(tmp_path):
    hf = random_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf_dir(tmp_path)
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4


def test_bfloat16_save_and_load(tmp_path):
    hf = random_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_dir(tmp_path / "hf")
    save_hf_dir(ours, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    small = load_hf_dir(tmp_path / "bf16", dtype="bfloat16")
    assert small.lm_head.weight.dtype == torch.bfloat16
    full = load_hf_dir(tmp_path / "bf16", dtype="float32")
    # saving in bf16 rounds each weight once, and bf16 -> fp32 is exact: bit-equal by design
    assert torch.equal(full.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16).float())


def test_pickle_checkpoint_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_models()["llama-gqa"].to_dict()))
    with pytest.raises(LLMLabError, match="pickle"):
        load_hf_dir(tmp_path)
    with pytest.raises(LLMLabError, match="pickle"):
        load_hf_dir(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, damage):
    random_hf_model("llama-gqa").save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(LLMLabError, match="not a valid safetensors"):
        load_hf_dir(tmp_path)


def test_missing_path_and_unsupported_family(tmp_path):
    with pytest.raises(LLMLabError, match="no such file"):
        load_hf_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LLMLabError, match="unsupported model_type 'bert'"):
        load_hf_dir(tmp_path)
