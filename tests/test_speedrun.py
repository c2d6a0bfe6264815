"""`llmlab speedrun --preset ci` end to end: every stage runs (pretraining, SFT, DPO), the report and the
checkpoints are real and usable."""

import json
import math
import re
import sys

import pytest

from llmlab.errors import LLMLabError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One speedrun through its command (the path a user takes), shared by the tests below."""
    import argparse

    from llmlab.cli import speedrun as speedrun_commands

    out = tmp_path_factory.mktemp("speedrun") / "run"
    parser = argparse.ArgumentParser()
    speedrun_commands.add_commands(parser.add_subparsers())
    args = parser.parse_args(["speedrun", "--preset", "ci", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    return out


def test_report_has_every_section(run_dir):
    report = (run_dir / "report.md").read_text()
    for section in ("## Outcome per stage", "## Settings", "## Data", "## Tokenizer", "## Pretraining",
                    "## Evaluation", "## Samples", "## Post-training: SFT and DPO", "## Time per stage",
                    "bits per byte"):
        assert section in report, section
    for stage in ("corpus", "tokenizer", "pack", "pretrain", "evaluate", "sft", "dpo", "evaluate QA"):
        assert f"| {stage} |" in report
    for stage in ("pretrain", "sft", "dpo"):  # the before/after tables have a row per checkpoint
        assert f"| {stage} (`{stage}/model`) |" in report
        assert re.search(rf"^\| {stage} \| \d+ \|", report, re.M), stage


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


def test_pretraining_reads_every_document_once_per_epoch_in_a_new_order(run_dir):
    import numpy as np

    s = json.loads((run_dir / "summary.json").read_text())
    m = json.loads((run_dir / "shards" / "manifest.json").read_text())
    data = s["pretrain"]["data_tokens"]
    passes, per_pass = data["epochs_written"], m["documents"]["train"] // data["epochs_written"]
    assert m["tokens"]["train"] == passes * data["train"]
    assert per_pass == s["corpus"]["docs_kept"] - m["documents"]["val"]
    assert passes * data["train"] > s["pretrain"]["tokens"]  # the loop never wraps around to a repeated order
    tokens = np.fromfile(run_dir / "shards" / "train_000.bin", dtype=m["dtype"])
    docs = [tuple(d) for d in np.split(tokens, np.flatnonzero(tokens == m["eos_id"])[:-1] + 1)]
    first, second = docs[:per_pass], docs[per_pass:2 * per_pass]
    assert sorted(first) == sorted(second) and len(set(first)) == per_pass  # the same documents, each once
    assert first != second  # in another order


def test_checkpoint_loads_in_llmlab_and_transformers(run_dir):
    import torch

    import llmlab

    from llmlab.data.bios import QA_CHAT_TEMPLATE

    llm = llmlab.load(run_dir)  # a run directory resolves to its model/
    assert llm.path == run_dir / "model"
    assert llm.tokenizer.chat_template == QA_CHAT_TEMPLATE  # the QA format SFT used, so chat asks as it did
    # through the public API and the saved template, the model answers as the speedrun's own scoring recorded
    s = json.loads((run_dir / "summary.json").read_text())
    for e in s["post_training"]["rows"][-1]["examples"]:
        assert llm.generate(e["question"], temperature=0, max_new_tokens=32).strip() == e["got"], e

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
        for key in ("qa_trained", "right_kind", "qa_heldout", "heldout_right_kind"):
            assert 0.0 <= r[key] <= 1.0, (r["stage"], key)
        assert math.isfinite(r["known_bios_bpb"]) and r["known_bios_bpb"] > 0
    sft, dpo = post["sft"], post["dpo"]
    assert sft["steps"] == s["config"]["sft_steps"] and dpo["steps"] == s["config"]["dpo_steps"]
    assert sft["conversations"] == 6 * s["config"]["people"] // 2 and dpo["pairs"] == sft["conversations"]
    for key in ("first_loss", "final_loss"):
        assert math.isfinite(sft[key]) and math.isfinite(dpo[key]), key
    assert sft["final_loss"] < sft["first_loss"] - 0.5  # answer tokens: a large effect even at ci size
    # SFT did its job: the pretrained model continues text instead of answering (right only by a rare chance),
    # the SFT model answers questions about the people it was finetuned on, with a value of the kind asked for,
    # some of them right (measured on ci: 0% -> 42% right, 0% -> 54% of the right kind)
    assert rows[1]["qa_trained"] > rows[0]["qa_trained"] + 0.15
    assert rows[1]["right_kind"] > rows[0]["right_kind"] + 0.3
    # at DPO's first step the policy is its reference: every margin is 0, the loss is log 2
    assert dpo["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert math.isfinite(dpo["kl"])  # a sampled estimate: near 0 after a few small steps, of either sign
    for split in ("train_pairs", "heldout_pairs"):
        assert 0.0 <= dpo[split]["accuracy"] <= 1.0 and math.isfinite(dpo[split]["margin"]), split
    # DPO trained on these pairs (over an epoch at ci size): its implicit reward ranks them better than chance
    assert dpo["train_pairs"]["margin"] > 0 and dpo["train_pairs"]["accuracy"] > 0.5
    logged = [json.loads(l) for l in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_accuracy" in r and "reward_margin" in r for r in logged if "loss" in r)


def test_document_scores_are_the_models_cross_entropy(run_dir):
    """eval.knowledge.document_scores agrees with a plain cross-entropy over the same tokens."""
    import torch
    import torch.nn.functional as F

    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.eval.knowledge import document_scores

    model, tok, _ = load_checkpoint(run_dir / "pretrain" / "model")
    model = model.float().eval()
    texts = ["Alma Briar Forger was born in Boise, ID.", "Hugo Sage Vance worked for Keystone Steel."]
    got = document_scores(model, tok, texts)
    nll = n_bytes = 0.0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.eos_token_id] + tok.encode(t)])
            nll += F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
            n_bytes += len(t.encode())
    # float32 sums of the same log-probabilities in another order: 1e-5 relative is far above their rounding
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert got["documents"] == 2 and got["perplexity"] > 1.0


def test_trial_steps_time_every_thread_count(run_dir):
    """The thread count is chosen by timing real training steps at each candidate count, not from the load."""
    import torch

    from llmlab.speedrun import preset_config
    from llmlab.speedrun.pretraining import time_steps

    before = torch.get_num_threads()
    seconds = time_steps(run_dir, preset_config("ci"), [1, 2], rounds=1)
    assert sorted(seconds) == [1, 2] and all(s > 0 for s in seconds.values())
    assert torch.get_num_threads() == before
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["threads"] == "1"  # the ci preset names its count: nothing to choose, no trial steps
    assert "trial steps" not in s["stages"]


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
    from llmlab.speedrun import plan_steps, preset_config

    cfg = preset_config("default")
    full = {"max_steps": cfg.max_steps, "sft_steps": cfg.sft_steps, "dpo_steps": cfg.dpo_steps}
    assert plan_steps(cfg, cfg.time_budget, 0.001) == full  # a fast machine runs them all
    step_seconds = (0.3, 0.5, 1.0, 2.0)
    plans = [plan_steps(cfg, cfg.time_budget, s) for s in step_seconds]
    for key in full:  # the slower the machine, the fewer steps of every kind, in the recipe's proportions
        assert [p[key] for p in plans] == sorted((p[key] for p in plans), reverse=True) and plans[-1][key] < full[key]
    assert plans[-1]["max_steps"] / full["max_steps"] == pytest.approx(plans[-1]["sft_steps"] / full["sft_steps"],
                                                                       abs=0.02)
    # what is planned (every kind of step, and the evaluation reserve) fits the budget
    for p, s in zip(plans, step_seconds):
        assert (sum(p.values()) + 2 * cfg.eval_people) * s < cfg.time_budget
    assert plan_steps(cfg, 1.0, 100.0) == {"max_steps": 10, "sft_steps": 5, "dpo_steps": 2}  # never nothing
    with pytest.raises(LLMLabError, match="unknown speedrun setting"):
        preset_config("tiny", layers=3)


def test_the_loop_stage_stores_votes_and_rates_the_new_model(run_dir):
    """speedrun/loop.py: the arena battles and scripted votes are in the arena's SQLite table, their pairs exported,
    and the report has the loop's section (the ci model is too weak for its new model to win: see report.md of a
    tiny or default run)."""
    from llmlab.serve.feedback import read_votes

    loop = json.loads((run_dir / "summary.json").read_text())["loop"]
    votes = read_votes(run_dir / "loop" / "round1.sqlite")
    assert len(votes) == loop["round1_votes"] > 0 and {v["voter"] for v in votes} == {"voter-1", "voter-2", "voter-3"}
    assert loop["pairs"] == len((run_dir / "loop" / "pairs.jsonl").read_text().splitlines())
    assert "## The loop: votes → DPO → arena" in (run_dir / "report.md").read_text()
    if loop["pairs"]:
        assert {r["model"] for r in loop["leaderboard"]} == {"new", "old"}
        assert len(read_votes(run_dir / "loop" / "round2.sqlite")) == loop["round2_votes"]
