"""RL: GRPO and PPO raise a trivial verifiable reward on a tiny model within a short run; GAE against a hand
computation; `llmlab rl` end to end with before/after scores and the KL to the reference."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.train import tasks
from llmlab.train.post_commands import main as post_cli
from llmlab.train.rl import RLConfig, gae, rl_train
from test_sft import tiny_ckpt  # noqa: F401 (fixture)


def digit_fraction(text: str, item) -> float:
    """Trivial and dense: the share of the reply's characters that are digits."""
    return sum(c.isdigit() for c in text) / (len(text) + 1)


@pytest.mark.parametrize("algo,lora", [("grpo", False), ("ppo", False), ("grpo", True)])
def test_rl_raises_a_verifiable_reward(tmp_path, tiny_ckpt, algo, lora):
    from llmlab.train.sft import LoRAConfig, load_base, prepare_model
    model, tokenizer, _ = load_base(tiny_ckpt)
    # a random tiny model's lm_head is what keeps its next-token distribution near uniform, so the adapter
    # must reach it for a short run to move the policy
    prepare_model(model, LoRAConfig(r=8, alpha=32, targets=("q_proj", "v_proj", "up_proj", "lm_head")) if lora else None)
    cfg = RLConfig(algo=algo, out_dir=str(tmp_path), steps=16, prompts_per_step=4, group_size=4, max_new_tokens=8,
                   lr=2e-2, min_lr=2e-3, kl_coef=0.0, minibatch=16, update_epochs=2, threads=1)
    result = rl_train(model, tokenizer, tasks.make_tasks("arithmetic", 32, seed=0), cfg, reward_fn=digit_fraction)
    rewards = [r["reward"] for r in result["history"]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 0.5 and last > first + 0.3
    h = result["history"]
    assert h[-1]["kl"] > h[0]["kl"] and h[-1]["entropy"] < h[0]["entropy"]
    assert all(k in h[-1] for k in ("reward", "kl", "response_length", "entropy"))


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last position is padding
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.3
    d1 = 0.5 + g * 0.3 - 0.4
    d0 = 0.0 + g * 0.4 - 0.2
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    assert gae(rewards, values, mask, g, lam)[0].tolist() == pytest.approx([a0, a1, a2, 0.0])


def test_rl_cli_reports_before_after_and_kl(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "rl"
    assert post_cli(["rl", str(tiny_ckpt), "--task", "arithmetic", "--prompts", "8", "--eval-prompts", "4",
                     "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                     "--out-dir", str(out), "--threads", "1"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(shown["before"]) == {"score"} and 0 <= shown["after"]["score"] <= 1
    assert shown["kl"] is not None
    assert (out / "model" / "model.safetensors").is_file() and (out / "results.json").is_file()
    assert post_cli(["rl", str(tiny_ckpt), "--algo", "grpo", "--group-size", "1", "--out-dir", str(out)]) == 1


def test_align_experiment_runs_at_tiny_size(tmp_path, tiny_ckpt):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
    import align
    out = tmp_path / "align"
    align.run(str(tiny_ckpt), "arithmetic", n_train=8, n_eval=2, rm_steps=1, dpo_steps=1, rl_steps=1,
              max_new_tokens=2, out=out)
    rows = json.loads((out / "align.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["base", "reward model", "DPO", "GRPO (verifiable reward)"]
    assert all(0 <= r.get("heldout_score", 0) <= 1 for r in rows) and rows[2]["kl_to_start"] is not None
    assert (out / "align.png").is_file() and (out / "align.md").is_file()
