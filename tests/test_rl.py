"""RL: GRPO and PPO raise a trivial verifiable reward on a tiny model within a short run; the KL coefficient
holds the policy near the reference; GAE against a hand computation; a stopped run resumes exactly; `llmlab rl`
end to end, driven by a reward model trained with `llmlab reward`, with before/after scores and the KL."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.train import tasks
from llmlab.cli.post_train import main as post_cli
from llmlab.train.metrics import read_metrics
from llmlab.train.rl import RLConfig, gae, kl_to_reference, rl_train
from helpers import write_jsonl


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


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_kl_coefficient_holds_the_policy_near_the_reference(tmp_path, tiny_ckpt, algo):
    """The same run (same seed, same reward) with and without the KL term: with it, the trained policy stays far
    closer to the starting one (GRPO: the k3 loss term; PPO: the per-token KL penalty in the reward)."""
    from llmlab.train.sft import load_base, prepare_model
    items = tasks.make_tasks("arithmetic", 32, seed=0)
    probes = [it["messages"] for it in tasks.make_tasks("arithmetic", 16, seed=5)]  # held-out prompts
    start = load_base(tiny_ckpt)[0]
    kl = {}
    for coef in (0.0, 1.0):
        model, tokenizer, _ = load_base(tiny_ckpt)
        prepare_model(model, None)
        cfg = RLConfig(algo=algo, out_dir=str(tmp_path / str(coef)), steps=8, prompts_per_step=4, group_size=4,
                       max_new_tokens=8, lr=2e-2, min_lr=2e-3, kl_coef=coef, minibatch=16, update_epochs=2,
                       threads=1)
        rl_train(model, tokenizer, items, cfg, reward_fn=digit_fraction)
        kl[coef] = kl_to_reference(model, start, tokenizer, probes, max_new_tokens=8, seed=1)
    # measured: GRPO 13.5 nats without the term, 0.5 with it; PPO 15.4 and 1.8, and 5.8 and 2.1 with other random
    # streams of the same seed (inverse-transform draws): an 8-step run's size varies, the halving holds
    assert kl[0.0] > 3, kl  # without the term the policy moved far (else the comparison would prove nothing)
    assert kl[1.0] < 0.5 * kl[0.0], kl


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
    """Stopped in RL step 3 (Ctrl-C finishes and saves it; a crash leaves the checkpoint of step 2), resumed to
    step 5: the same weights, rewards and KL as a run that never stopped. One RL step (a rollout) is
    updates_per_rollout steps of the loop, and the loop saves only between rollouts."""
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

    upr = config(tmp_path).updates_per_rollout
    assert upr == 4  # 2 epochs over 2 minibatches of the 4 sequences
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
    saved_rollouts = 3 if how == "interrupt" else 2
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{saved_rollouts * upr:08d}"
    with pytest.raises(LLMLabError, match="already holds a training run"):
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
    assert len(resumed["history"]) == 5 * upr
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["step"] == b["step"]
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "reward" in r] == list(range(1, 5 * upr + 1))  # no step logged twice


def test_rl_cli_with_a_reward_model(tmp_path, tiny_ckpt, capsys):
    """`llmlab reward` trains a reward model (digits preferred to words), `llmlab rl --reward-model` raises its
    score on held-out prompts, reports the verifiable score next to it, writes the model, and resumes."""
    import random
    rng = random.Random(0)
    words = "the cat sat on a mat and then ran off to see its friend at home".split()
    pairs = [{"messages": it["messages"],
              "chosen": " ".join(str(rng.randrange(1000)) for _ in range(rng.randrange(1, 4))),
              "rejected": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 4)))}
             for it in tasks.make_tasks("arithmetic", 64, seed=1)]
    rm = tmp_path / "rm"
    assert post_cli(["reward", str(tiny_ckpt), str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--out-dir", str(rm),
                     "--seq-len", "64", "--micro-batch", "8", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "2",
                     "--max-steps", "20", "--no-progress", "--dtype", "float32", "--threads", "1",
                     "--peak-flops", "1e12", "--eval-every", "0"]) == 0
    out = tmp_path / "rl"
    args = ["rl", str(tiny_ckpt), "--task", "arithmetic", "--prompts", "8", "--eval-prompts", "4", "--reward-model",
            str(rm / "reward_model"), "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6",
            "--minibatch", "16", "--update-epochs", "2", "--lr", "2e-2", "--min-lr", "2e-3", "--kl-coef", "0",
            "--save-every", "4", "--out-dir", str(out), "--threads", "1"]
    capsys.readouterr()
    assert post_cli(args + ["--steps", "8"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(shown["before"]) == set(shown["after"]) == {"score", "rm_score"}
    # greedy replies to held-out prompts: measured -1.4 before, +1.7 after (a random policy scores 0 exactly
    # on the verifiable check, before and after: only the reward model's score can show the change)
    assert shown["after"]["rm_score"] > shown["before"]["rm_score"] + 1.0, shown
    assert shown["kl"] > 0.5, shown  # the policy moved away from the starting model
    assert json.loads((out / "results.json").read_text())["after"] == shown["after"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"  # the reward curve
    from safetensors.torch import load_file
    trained, start = load_file(out / "model" / "model.safetensors"), load_file(tiny_ckpt / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    history = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert len(history) == 8 * 2 and all(0 <= r["verifiable_score"] <= 1 for r in history)
    assert sum(r["reward"] for r in history[-4:]) > sum(r["reward"] for r in history[:4])  # the RM's score rose

    assert post_cli(args + ["--steps", "9"]) == 1  # the directory holds a run: continuing it must be asked for
    assert post_cli(args + ["--steps", "9", "--resume"]) == 0  # one more rollout from the saved step 8
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "reward" in r] == list(range(1, 19))
    assert post_cli(["rl", str(tiny_ckpt), "--algo", "grpo", "--group-size", "1", "--out-dir", str(out)]) == 1


def test_align_experiment_runs_at_tiny_size(tmp_path, tiny_ckpt):
    import align
    out = tmp_path / "align"
    align.run(str(tiny_ckpt), "arithmetic", n_train=8, n_eval=2, rm_steps=1, dpo_steps=1, rl_steps=1,
              max_new_tokens=2, out=out, shots=2, keep_adapter=True, lora_r=2)
    rows = json.loads((out / "align.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["base", "reward model", "DPO (LoRA)", "GRPO (LoRA, verifiable reward)"]
    assert all(0 <= r.get("heldout_score", 0) <= 1 for r in rows)
    # DPO trained: its adapter left its zero start (LoRA B starts at 0, so an untrained adapter changes nothing
    # and the KL to the start would be exactly 0)
    from safetensors.torch import load_file
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert rows[2]["kl_to_start"] != 0 and rows[2]["train_pair_accuracy_last"] is not None
    # GRPO ran its rollout: on a random tiny model the exact-match reward is 0 for every reply (so every
    # advantage is 0 and nothing can move: the reward-model test above is where RL is seen to learn)
    assert rows[3]["train_reward_first_half"] == 0 and rows[3]["kl_to_start"] is not None
    assert 0 <= rows[1]["rm_heldout_pairwise_accuracy"] <= 1
    assert (out / "align.png").is_file() and (out / "align.md").is_file()
    assert not (out / "reward_model").exists() and not (out / "dpo" / "checkpoints").exists()  # results stay small
    # every prompt opens with the same solved demonstrations, which are neither training nor held-out items
    items = align.with_demonstrations(tasks.make_tasks("arithmetic", 3, seed=0), "arithmetic", 2)
    assert [len(it["messages"]) for it in items] == [5, 5, 5] and items[0]["messages"][:4] == items[2]["messages"][:4]
    assert [m["role"] for m in items[0]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert items[0]["messages"][1]["content"] == tasks.make_tasks("arithmetic", 1, seed=align.DEMO_SEED)[0]["answer"]
    assert (out / "adapter").is_dir()
