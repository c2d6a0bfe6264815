"""LoRA: identity at initialisation, merge == unmerged, PEFT loads our adapters with the same outputs,
only adapters train, the engine runs unmerged adapters, and adapters for another base are refused."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.model import ModelConfig, Transformer
from llmlab.api import load_with_adapter
from llmlab.model.lora import (LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter,
                               trainable_parameters)
from llmlab.cli.post_train import main as post_cli
from helpers import make_tiny_chat_checkpoint, sft_args, write_jsonl


def tiny_model(seed=0, **overrides):
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    return Transformer(ModelConfig(**{**cfg, **overrides})).init_weights(seed=seed)


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def test_lora_at_init_is_identity_and_merge_matches():
    model = tiny_model()
    before = model(IDS)
    apply_lora(model, r=4, alpha=8)
    assert torch.equal(model(IDS), before)  # by design: the same base call, plus B = 0 adds exact zeros
    randomise_adapters(model)
    unmerged = model(IDS)
    assert not torch.allclose(unmerged, before, atol=1e-4)
    merged = merge_lora(model)(IDS)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_only_adapters_train():
    model = apply_lora(tiny_model(), r=4, alpha=8, targets=("q_proj", "v_proj"))
    trainable, total = trainable_parameters(model)
    # per layer: q (32 -> 32) and v (32 -> 16), each A (r x in) + B (out x r)
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_peft_loads_our_adapter_with_the_same_outputs(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmlab.checkpoint.hf import save_hf_dir
    model = tiny_model()
    save_hf_dir(model, tmp_path / "base")
    apply_lora(model, r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
        ours = model.eval()(IDS)
    assert torch.allclose(ours, theirs, atol=1e-4)
    # and our loader reads it back onto a fresh base with the same outputs
    fresh = load_adapter(tiny_model(), tmp_path / "adapter")
    assert torch.allclose(fresh(IDS), ours, atol=1e-6)


def test_adapter_for_another_base_is_refused(tmp_path):
    model = apply_lora(tiny_model(), r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(LLMLabError, match="different base model"):
        load_adapter(tiny_model(dim=48, n_heads=4), tmp_path / "adapter")
    with pytest.raises(LLMLabError, match="not a LoRA adapter"):
        load_adapter(tiny_model(), tmp_path)


def test_lora_sft_cli_then_merge_and_engine(tmp_path):
    from llmlab.train import tasks
    ckpt = make_tiny_chat_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", tasks.sft_conversations(tasks.make_tasks("arithmetic", 32, seed=0)))
    out = tmp_path / "run"
    assert post_cli(sft_args(ckpt, data, out, "--max-steps", "4", "--lora", "--lora-r", "4")) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    unmerged = load_with_adapter(ckpt, out / "adapter")
    assert any(isinstance(m, LoRALinear) for m in unmerged.model.modules())
    assert post_cli(["merge", str(ckpt), str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    import llmlab
    merged = llmlab.load(tmp_path / "merged")
    prompt = [{"role": "user", "content": "What is 3 + 4? Reply with the number only."}]
    a = unmerged.chat(prompt, temperature=0, max_new_tokens=8)
    b = merged.chat(prompt, temperature=0, max_new_tokens=8)
    assert a == b
    # adapter trained on this base, applied to a different base model: one clear error, non-zero exit
    other = make_tiny_chat_checkpoint(tmp_path / "other", dim=32)
    assert post_cli(["merge", str(other), str(out / "adapter"), "--out", str(tmp_path / "m2")]) == 1


def test_lora_vs_full_experiment_runs_at_tiny_size(tmp_path):
    import argparse
    import lora_vs_full
    ckpt = make_tiny_chat_checkpoint(tmp_path / "base")
    args = argparse.Namespace(model=str(ckpt), family="arithmetic", steps=2, n_train=16, n_eval=2, micro_batch=2,
                              seq_len=64, max_new_tokens=2, threads=1, out=str(tmp_path / "out"))
    full = lora_vs_full.run_mode(argparse.Namespace(**vars(args), mode="full"))
    lora = lora_vs_full.run_mode(argparse.Namespace(**vars(args), mode="lora"))
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert 0 <= lora["heldout_accuracy"] <= 1 and lora["peak_memory_mb"] > 0
