"""The `llmlab data ...` and `llmlab tokenizer train` commands, end to end on a tiny corpus."""

import argparse
import json

import pytest

from llmlab.cli.data import add_commands
from llmlab.data.pack import load_shards, tokenizer_sha256
from llmlab.errors import LLMLabError


def run(*argv):
    parser = argparse.ArgumentParser(prog="llmlab")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_bios_tokenizer_pack_clean(tmp_path, capsys):
    assert run("data", "bios", "--people", 30, "--seed", 1, "--augment", "multi,permute", "--out", tmp_path / "bios") == 0
    bios = tmp_path / "bios" / "biographies.jsonl"
    assert len(bios.read_text().splitlines()) == 150

    assert run("tokenizer", "train", bios, "--vocab-size", 320, "--out", tmp_path / "tok",
               "--heldout-fraction", 0.1) == 0
    out = capsys.readouterr().out
    assert "bytes/token on 15 held-out documents" in out

    assert run("data", "pack", bios, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "packed",
               "--val-fraction", 0.1) == 0
    train = load_shards(tmp_path / "packed", "train", tokenizer_sha256(tmp_path / "tok"))
    assert len(train) > 0

    assert run("data", "clean", bios, "--out", tmp_path / "clean.jsonl", "--min-words", 10,
               "--report", tmp_path / "rep") == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["docs_in"] == 150 and report["docs_kept"] >= 30
    assert "150 documents in" in capsys.readouterr().out


def test_errors_surface_as_llmlab_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(LLMLabError, match="bad.jsonl:2"):
        run("data", "clean", bad, "--out", tmp_path / "o.jsonl")
    with pytest.raises(LLMLabError, match="too small"):
        run("tokenizer", "train", bad, "--vocab-size", 100, "--out", tmp_path / "t", "--skip-bad")
