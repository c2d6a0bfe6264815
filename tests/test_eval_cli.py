"""`llmlab eval` and `llmlab judge` handlers, through their own argparse wiring (cli.py registers add_commands)."""

import argparse
import json

import pytest

from llmlab.errors import LLMLabError
from llmlab.cli import eval as commands


def run(argv) -> int:
    p = argparse.ArgumentParser()
    commands.add_commands(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_eval_list_and_bad_task(tmp_path, capsys):
    assert run(["eval", "list"]) == 0
    assert "bios_mc" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: multiple_choice\ndata: d.jsonl\nprompt: p\nchoices: c\n")
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(LLMLabError, match="missing field 'gold'"):  # refused before any model loads
        run(["eval", str(bad), "--model", "does-not-matter"])


def test_eval_and_judge_commands(smollm2_gguf, tmp_path, capsys):
    assert run(["eval", "bios_mc", "--model", str(smollm2_gguf), "--limit", "2", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and (tmp_path / "e" / "report.md").exists()
    assert len((tmp_path / "e" / "bios_mc" / "items.jsonl").read_text().splitlines()) == 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "What is 1 + 1?", "answer_a": "2", "answer_b": "3", "label": "A"}) + "\n")
    assert run(["judge", "agreement", "--judge-model", str(smollm2_gguf), "--pairs", str(pairs), "--max-tokens", "8",
                "--no-repeat", "--out", str(tmp_path / "j")]) == 0
    out = capsys.readouterr().out
    assert "judge self-report" in out and "parse failures" in out
    rep = json.loads((tmp_path / "j" / "report.json").read_text())
    recs = [json.loads(l) for l in (tmp_path / "j" / "judgments.jsonl").read_text().splitlines()]
    assert rep["parse_failures"] == sum(r["parse_error"] for r in recs)
