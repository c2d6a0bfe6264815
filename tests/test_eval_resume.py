"""A resumed eval or judge run never mixes models or settings into one record (issue: cached items of one model
were reported under another's name)."""

import pytest

import llmlab
from helpers import make_tiny_chat_checkpoint
from llmlab.client import LocalClient
from llmlab.errors import LLMLabError
from llmlab.eval.judge import Judge
from llmlab.eval.judge.run import run_judge
from llmlab.eval.tasks import load_task, run_task


def test_eval_resume_refuses_another_model(tiny_ckpt, tmp_path):
    other = make_tiny_chat_checkpoint(tmp_path / "other", seed=1)
    task = load_task("bios_mc")
    first = run_task(task, LocalClient(llmlab.load(tiny_ckpt)), tmp_path / "out", limit=2)
    again = run_task(task, LocalClient(llmlab.load(tiny_ckpt)), tmp_path / "out", limit=3)  # same model: resumes
    assert again["n"] == 3 and first["n"] == 2
    with pytest.raises(LLMLabError, match="another run.*model"):
        run_task(task, LocalClient(llmlab.load(other)), tmp_path / "out", limit=3)
    fresh = run_task(task, LocalClient(llmlab.load(other)), tmp_path / "other_out", limit=3)
    assert fresh["n"] == 3


def test_judge_resume_refuses_other_settings(tiny_ckpt, tmp_path):
    items = [{"id": 0, "question": "2 + 2?", "answer": "4"}]
    judge = Judge(LocalClient(llmlab.load(tiny_ckpt)), max_tokens=4)
    run_judge(judge, "pointwise", items, tmp_path, repeat=False)
    judge.temperature = 0.5
    with pytest.raises(LLMLabError, match="temperature"):
        run_judge(judge, "pointwise", items, tmp_path, repeat=False)
