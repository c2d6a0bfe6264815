"""Reward model: Bradley-Terry training reaches high held-out pairwise accuracy on a learnable preference,
and the saved checkpoint scores (prompt, response) pairs through llmlab and loads in transformers."""

from __future__ import annotations

import pytest
import torch

from llmlab.cli.post_train import main as post_cli
from llmlab.train.reward import RewardModel
from helpers import write_jsonl


def test_reward_model_learns_and_scores(tmp_path, tiny_ckpt):
    from llmlab.train import tasks
    # a preference a tiny model can learn: a JSON reply beats the same number as plain text
    def pairs(items):
        return [{"messages": it["messages"], "chosen": it["answer"], "rejected": str(it["value"])} for it in items]

    records = pairs(tasks.make_tasks("json_format", 40, seed=1))
    train = write_jsonl(tmp_path / "t.jsonl", pairs(tasks.make_tasks("json_format", 96, seed=0)))
    val = write_jsonl(tmp_path / "v.jsonl", records)
    out = tmp_path / "rm"
    assert post_cli(["reward", str(tiny_ckpt), str(train), "--val-data", str(val), "--out-dir", str(out),
                     "--seq-len", "96", "--micro-batch", "8", "--lr", "3e-3", "--min-lr", "3e-4",
                     "--warmup-steps", "5", "--max-steps", "60", "--no-progress", "--dtype", "float32",
                     "--threads", "1", "--peak-flops", "1e12", "--eval-every", "0"]) == 0
    rm = RewardModel.load(out / "reward_model")
    chosen = rm.score_batch([r["messages"] for r in records], [r["chosen"] for r in records])
    rejected = rm.score_batch([r["messages"] for r in records], [r["rejected"] for r in records])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(records)
    assert accuracy >= 0.9
    assert rm.score(records[0]["messages"], records[0]["chosen"]) == pytest.approx(chosen[0], abs=1e-5)

    # transformers reads the directory as a sequence classifier with the same scores
    from transformers import AutoModelForSequenceClassification
    from llmlab.train.chat_data import render_prompt, render_reply
    hf = AutoModelForSequenceClassification.from_pretrained(out / "reward_model", dtype=torch.float32).eval()
    ids = render_prompt(rm.tokenizer, records[0]["messages"]) + render_reply(rm.tokenizer, records[0]["messages"],
                                                                              records[0]["chosen"])
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, 0].item()
    assert theirs == pytest.approx(chosen[0], abs=1e-4)
