"""RL: GRPO and PPO raise a trivial verifiable reward on a tiny model within a short run; GAE against a hand
computation; a stopped run resumes exactly; `llmlab rl` end to end with before/after scores and the KL to the
reference."""

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


class Stop(Exception):
    pass


def stopping_reward(at_call: int, how: str):
    """digit_fraction, but on its at_call-th call (the step whose rollout it scores) it stops the run: "interrupt"
    presses Ctrl-C (the step finishes and is saved), "crash" raises (nothing of the step is saved)."""
    calls = 0

    def reward(text, item):
        nonlocal calls
        calls += 1
        if calls == at_call:
            if how == "interrupt":
                import signal
                signal.raise_signal(signal.SIGINT)
            else:
                raise Stop()
        return digit_fraction(text, item)

    return reward


@pytest.mark.parametrize("algo,how,lora", [("grpo", "interrupt", False), ("ppo", "crash", False),
                                           ("grpo", "crash", True)])
def test_rl_resumes_exactly(tmp_path, tiny_ckpt, algo, how, lora):
    """Stopped at step 3 (Ctrl-C saves step 3; a crash leaves the checkpoint of step 2), resumed to step 5: the
    same weights, rewards and KL as a run that never stopped."""
    from llmlab.errors import LLMLabError
    from llmlab.train.sft import LoRAConfig, load_base, prepare_model

    items = tasks.make_tasks("arithmetic", 16, seed=0)
    per_step = 2 * 2  # prompts_per_step * group_size: reward calls per step

    def fresh():
        model, tokenizer, _ = load_base(tiny_ckpt)
        torch.manual_seed(0)  # the same adapter initialisation every time
        return prepare_model(model, LoRAConfig(r=4, alpha=8, dropout=0.1) if lora else None), tokenizer

    def config(out, **kw):
        return RLConfig(**{**dict(algo=algo, out_dir=str(out), steps=5, prompts_per_step=2, group_size=2,
                                  max_new_tokens=6, lr=1e-2, min_lr=1e-3, warmup_steps=1, minibatch=2,
                                  update_epochs=2, save_every=2, threads=1), **kw})

    model, tokenizer = fresh()
    whole = rl_train(model, tokenizer, items, config(tmp_path / "whole"), reward_fn=digit_fraction)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "stopped"
    model, tokenizer = fresh()
    stop = stopping_reward(2 * per_step + 1, how)  # the first reward of step 3
    if how == "interrupt":
        assert rl_train(model, tokenizer, items, config(out), reward_fn=stop)["interrupted"]
    else:
        with pytest.raises(Stop):
            rl_train(model, tokenizer, items, config(out), reward_fn=stop)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_0000000{3 if how == 'interrupt' else 2}"
    with pytest.raises(LLMLabError, match="already holds an RL run"):
        rl_train(*fresh(), items, config(out), reward_fn=digit_fraction)
    with pytest.raises(LLMLabError, match="lr was"):
        rl_train(*fresh(), items, config(out, lr=5e-3), reward_fn=digit_fraction, resume=True)

    model, tokenizer = fresh()  # the starting checkpoint again: the reference is rebuilt from it
    resumed = rl_train(model, tokenizer, items, config(out), reward_fn=digit_fraction, resume=True)
    assert not resumed["interrupted"]
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=0, msg=name)
    assert any(not torch.equal(value, fresh()[0].state_dict()[name]) for name, value in expected.items())
    assert len(resumed["history"]) == 5
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["step"] == b["step"]
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2, 3, 4, 5]  # no step logged twice


def test_rl_cli_reports_before_after_and_kl(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "rl"
    assert post_cli(["rl", str(tiny_ckpt), "--task", "arithmetic", "--prompts", "8", "--eval-prompts", "4",
                     "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                     "--out-dir", str(out), "--threads", "1"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(shown["before"]) == {"score"} and 0 <= shown["after"]["score"] <= 1
    assert shown["kl"] is not None
    assert (out / "model" / "model.safetensors").is_file() and (out / "results.json").is_file()
    args = ["rl", str(tiny_ckpt), "--task", "arithmetic", "--prompts", "8", "--eval-prompts", "4",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--out-dir", str(out),
            "--threads", "1"]
    assert post_cli(args + ["--steps", "3"]) == 1  # the directory holds a run: continuing it must be asked for
    assert post_cli(args + ["--steps", "3", "--resume"]) == 0  # one more step from the saved step 2
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2, 3]
    assert post_cli(["rl", str(tiny_ckpt), "--algo", "grpo", "--group-size", "1", "--out-dir", str(out)]) == 1


def test_align_experiment_runs_at_tiny_size(tmp_path, tiny_ckpt):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
    import align
    out = tmp_path / "align"
    align.run(str(tiny_ckpt), "arithmetic", n_train=8, n_eval=2, rm_steps=1, dpo_steps=1, rl_steps=1,
              max_new_tokens=2, out=out, shots=2, keep_adapter=True, lora_r=2)
    rows = json.loads((out / "align.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["base", "reward model", "DPO (LoRA)", "GRPO (LoRA, verifiable reward)"]
    assert all(0 <= r.get("heldout_score", 0) <= 1 for r in rows) and rows[2]["kl_to_start"] is not None
    assert 0 <= rows[1]["rm_heldout_pairwise_accuracy"] <= 1
    assert (out / "align.png").is_file() and (out / "align.md").is_file()
    assert not (out / "reward_model").exists() and not (out / "dpo" / "checkpoints").exists()  # results stay small
    # every prompt opens with the same solved demonstrations, which are neither training nor held-out items
    items = align.with_demonstrations(tasks.make_tasks("arithmetic", 3, seed=0), "arithmetic", 2)
    assert [len(it["messages"]) for it in items] == [5, 5, 5] and items[0]["messages"][:4] == items[2]["messages"][:4]
    assert [m["role"] for m in items[0]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert items[0]["messages"][1]["content"] == tasks.make_tasks("arithmetic", 1, seed=align.DEMO_SEED)[0]["answer"]
    assert (out / "adapter").is_dir()
