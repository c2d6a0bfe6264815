"""DPO/IPO: the loss against a hand computation, log 2 at the start, preference data errors, and training
that raises the chosen-over-rejected margin (full and LoRA with the adapter-off reference)."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.train.chat_data import load_pairs, preference_pair
from llmlab.train.dpo import dpo_loss
from llmlab.train.metrics import read_metrics
from llmlab.cli.post_train import main as post_cli
from helpers import write_jsonl


def test_dpo_loss_matches_a_hand_computation():
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    beta = 0.5
    # pair 1: (-3 + 4) - (-5 + 4.5) = 1.5; pair 2: (-10 + 9) - (-4 + 6) = -3
    expected = (-math.log(1 / (1 + math.exp(-0.5 * 1.5))) - math.log(1 / (1 + math.exp(0.5 * 3)))) / 2
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, -0.5]) and rejected.tolist() == pytest.approx([-0.25, 1.0])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    assert ipo.item() == pytest.approx(((1.5 - 1) ** 2 + (-3 - 1) ** 2) / 2)


def test_identical_policy_and_reference_give_log_2():
    logps = torch.tensor([-7.0, -2.5, -11.0])
    loss, _, _ = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2))


def test_bad_preference_data(tmp_path, tiny_tok):
    with pytest.raises(LLMLabError, match="same reply"):
        preference_pair({"prompt": "2+2?", "chosen": "4", "rejected": "4"}, tiny_tok)
    with pytest.raises(LLMLabError, match="needs 'prompt' or 'messages'"):
        preference_pair({"chosen": "4", "rejected": "5"}, tiny_tok)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}], raw_lines=["{oops"])
    with pytest.raises(LLMLabError, match=r"p.jsonl:2: malformed"):
        load_pairs(path, tiny_tok)
    assert load_pairs(path, tiny_tok, skip_bad=True)[1] == 1


def dpo_args(ckpt, data, out, *extra):
    return ["dpo", str(ckpt), str(data), "--out-dir", str(out), "--seq-len", "96", "--micro-batch", "8",
            "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "2", "--no-progress", "--dtype", "float32",
            "--threads", "1", "--peak-flops", "1e12", "--beta", "0.5", *extra]


@pytest.mark.parametrize("extra", [[], ["--lora", "--lora-r", "8", "--reference", "adapter_off", "--lr", "1e-2"]])
def test_dpo_raises_the_margin(tmp_path, tiny_ckpt, extra):
    from llmlab.train import tasks
    records = tasks.preference_pairs(tasks.make_tasks("arithmetic", 32, seed=0))
    data = write_jsonl(tmp_path / "p.jsonl", records)
    assert post_cli(dpo_args(tiny_ckpt, data, tmp_path / "o", "--max-steps", "25", *extra)) == 0
    rows = [r for r in read_metrics(tmp_path / "o" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert rows[-1]["reward_margin"] > 0.5 and rows[-1]["reward_accuracy"] > 0.8
    assert rows[-1]["loss"] < 0.5


def test_dpo_cli_rejects_equal_pair(tmp_path, tiny_ckpt, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    assert post_cli(dpo_args(tiny_ckpt, data, tmp_path / "o", "--max-steps", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert "p.jsonl:1" in err and "same reply" in err and "\n" not in err
