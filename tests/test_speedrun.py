"""`llmlab speedrun --preset ci` end to end: every stage runs (pretraining, SFT, DPO), the report and the
checkpoints are real and usable."""

import json
import math
import sys

import pytest

from llmlab.errors import LLMLabError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One speedrun through its command (the path a user takes), shared by the tests below."""
    import argparse

    from llmlab import speedrun_commands

    out = tmp_path_factory.mktemp("speedrun") / "run"
    parser = argparse.ArgumentParser()
    speedrun_commands.add_commands(parser.add_subparsers())
    args = parser.parse_args(["speedrun", "--preset", "ci", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    return out


def test_report_has_every_section(run_dir):
    report = (run_dir / "report.md").read_text()
    for section in ("## Settings", "## Data", "## Tokenizer", "## Pretraining", "## Evaluation", "## Samples",
                    "## Post-training: SFT and DPO", "## Time per stage", "bits per byte"):
        assert section in report, section
    for stage in ("corpus", "tokenizer", "pack", "pretrain", "evaluate", "sft", "dpo", "evaluate QA"):
        assert f"| {stage} |" in report
    for stage in ("pretrain", "sft", "dpo"):  # the before/after table has a row per checkpoint
        assert f"| {stage} (`{stage}/model`) |" in report


def test_plots_are_png(run_dir):
    for png in (run_dir / "pretrain" / "loss.png", run_dir / "stages.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
        assert f"]({png.relative_to(run_dir)})" in (run_dir / "report.md").read_text()


def test_summary_numbers_are_finite_and_loss_fell(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    pt = s["pretrain"]
    for key in ("first_loss", "final_loss", "val_loss", "val_bpb", "tokens_per_s"):
        assert math.isfinite(pt[key]) and pt[key] > 0, key
    assert pt["final_loss"] < pt["first_loss"] - 1.0
    # a model that learned the corpus predicts it far better than uniform over its vocabulary
    assert pt["val_loss"] < math.log(s["tokenizer"]["vocab_size"]) - 1.0
    assert pt["steps"] == s["config"]["max_steps"]
    # the metrics log agrees with the summary
    rows = [json.loads(l) for l in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r][-1] == pt["final_loss"]
    assert s["corpus"]["docs_in"] == s["config"]["people"] * 5
    assert s["corpus"]["docs_kept"] == s["corpus"]["docs_in"]  # differently worded copies are not near-duplicates
    assert 1.0 < s["tokenizer"]["bytes_per_token"] < 10.0
    ev = s["eval"]
    assert ev["facts"]["probes"] == 6 * s["config"]["eval_people"]
    assert all(0.0 <= a <= 1.0 for a in ev["facts"]["accuracy"].values())
    for k in ("heldout_known", "heldout_unseen"):
        assert math.isfinite(ev[k]["bits_per_byte"]) and ev[k]["bits_per_byte"] > 0
    for name, stage in s["stages"].items():
        assert stage["seconds"] >= 0, name


def test_checkpoint_loads_in_llmlab_and_transformers(run_dir):
    import torch

    import llmlab

    llm = llmlab.load(run_dir)  # a run directory resolves to its model/
    assert llm.path == run_dir / "model"
    assert llm.tokenizer.chat_template
    text = llm.generate("Alma", raw=True, temperature=0, max_new_tokens=5)
    assert isinstance(text, str)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
    ids = tok("Alma was born in", return_tensors="pt").input_ids
    assert ids[0].tolist() == llm.tokenizer.encode("Alma was born in")
    with torch.no_grad():
        ours = llm.model(ids).float()
        theirs = hf(ids).logits.float()
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)


def test_post_training_stages_report_real_numbers(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    post = s["post_training"]
    rows = post["rows"]
    assert [r["stage"] for r in rows] == ["pretrain", "sft", "dpo"]
    for r in rows:
        for key in ("qa_trained", "right_kind", "qa_heldout"):
            assert 0.0 <= r[key] <= 1.0, (r["stage"], key)
    sft, dpo = post["sft"], post["dpo"]
    assert sft["steps"] == s["config"]["sft_steps"] and dpo["steps"] == s["config"]["dpo_steps"]
    assert sft["conversations"] == 6 * s["config"]["people"] // 2 and dpo["pairs"] == sft["conversations"]
    for key in ("first_loss", "final_loss"):
        assert math.isfinite(sft[key]) and math.isfinite(dpo[key]), key
    assert sft["final_loss"] < sft["first_loss"] - 0.5  # answer tokens: a large effect even at ci size
    # the numbers chain: held-out QA before SFT / after SFT / after DPO, and the SFT checkpoint DPO starts from
    # (reloaded from disk) answers exactly as the model SFT ended with
    assert (rows[0]["qa_heldout"], rows[1]["qa_heldout"], rows[2]["qa_heldout"]) == (
        sft["before"], sft["after"], dpo["after"])
    assert dpo["before"] == sft["after"]
    # at DPO's first step the policy is its reference: every margin is 0, the loss is log 2
    assert dpo["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert math.isfinite(dpo["kl"])
    for split in ("train_pairs", "heldout_pairs"):
        assert 0.0 <= dpo[split]["accuracy"] <= 1.0 and math.isfinite(dpo[split]["margin"]), split
    # DPO trained on these pairs (over an epoch at ci size): its implicit reward ranks them better than chance
    assert dpo["train_pairs"]["margin"] > 0 and dpo["train_pairs"]["accuracy"] > 0.5
    logged = [json.loads(l) for l in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_accuracy" in r and "reward_margin" in r for r in logged if "loss" in r)


def test_every_stage_checkpoint_loads(run_dir):
    import torch

    from llmlab.checkpoint.hf import load_hf_dir

    models = {stage: load_hf_dir(run_dir / stage / "model") for stage in ("pretrain", "sft", "dpo")}
    final = load_hf_dir(run_dir / "model")
    for name, p in final.state_dict().items():  # the run's model is the last stage's
        assert torch.equal(p, models["dpo"].state_dict()[name]), name
    # each stage changed the weights it started from
    for before, after in (("pretrain", "sft"), ("sft", "dpo")):
        a, b = models[before].state_dict(), models[after].state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), (before, after)
    for stage in ("pretrain", "sft", "dpo"):
        assert (run_dir / stage / "model" / "tokenizer.json").is_file(), stage


def test_chat_answers_on_piped_stdin(run_dir, monkeypatch, capsys):
    """`llmlab chat --model RUN_DIR` with a message piped in (in-process: a subprocess only adds import time)."""
    import io

    from llmlab.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Where was Alma born?\n"))
    assert main(["chat", "--model", str(run_dir), "-n", "8", "-t", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.strip(), out.err


def test_refuses_a_non_empty_run_dir(run_dir, tmp_path):
    from llmlab.speedrun import speedrun

    with pytest.raises(LLMLabError, match="not empty"):
        speedrun(run_dir, preset="ci")
    with pytest.raises(LLMLabError, match="unknown speedrun preset"):
        speedrun(tmp_path / "x", preset="huge")


def test_time_budget_cuts_steps_to_fit():
    from llmlab.speedrun import preset_config, steps_within_budget

    cfg = preset_config("default")
    assert steps_within_budget(cfg, cfg.time_budget, 0.001) == cfg.max_steps  # a fast machine runs them all
    slow = [steps_within_budget(cfg, cfg.time_budget, s) for s in (0.5, 1.0, 2.0, 5.0)]
    assert slow == sorted(slow, reverse=True) and slow[-1] < cfg.max_steps
    # what is planned fits what is left of the budget
    assert all(n * s < cfg.time_budget for n, s in zip(slow, (0.5, 1.0, 2.0, 5.0)))
    assert steps_within_budget(cfg, 1.0, 100.0) >= 1
    # SFT and DPO, after pretraining, fit too
    assert all((n + cfg.sft_steps + cfg.dpo_steps) * s < cfg.time_budget for n, s in zip(slow, (0.5, 1.0, 2.0)))
    with pytest.raises(LLMLabError, match="unknown speedrun setting"):
        preset_config("tiny", layers=3)
