"""`llmlab audit`: the card (markdown + JSON + plots) on a tiny model, every rate with its interval, and a missing
section module listed as skipped rather than dropped."""

import json

import pytest

from llmlab.cli.main import main
from llmlab.client import connect
from llmlab.safety.audit import module_section


def _rates(node, path=""):
    """Every dict in the card that holds a rate, with where it is."""
    if isinstance(node, dict):
        if "rate" in node and "n" in node:
            yield path, node
        for k, v in node.items():
            yield from _rates(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _rates(v, f"{path}[{i}]")


def test_audit_card_on_a_tiny_model(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "card"
    assert main(["audit", str(tiny_ckpt), "--sections", "judge,extraction,hallucination", "--out",
                 str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert [s["name"] for s in card["sections"]] == ["judge", "extraction", "hallucination"]  # in the order asked
    assert all(s["status"] == "ok" for s in card["sections"]), [s["markdown"] for s in card["sections"]]
    rates = list(_rates(card))
    assert len(rates) > 8
    for where, r in rates:  # no safety number without its interval
        assert r["n"] == 0 or (r["ci95"][0] <= r["rate"] <= r["ci95"][1]), where
    md = (out / "card.md").read_text()
    assert md.startswith("# Safety audit: ") and f"llmlab audit {tiny_ckpt} --budget small" in md
    for s in card["sections"]:
        for plot in s["plots"]:
            assert (out / plot).stat().st_size > 1000 and f"]({plot})" in md
    assert "Cohen's kappa" in md and "leak rate" in md


def test_a_missing_section_module_is_reported(tiny_ckpt, tmp_path):
    section = module_section("no_such_module", connect(model=str(tiny_ckpt)), "small", tmp_path)
    assert section["status"] == "skipped" and "could not be imported" in section["markdown"]


def test_a_time_budget_cuts_sections_and_says_so(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "card"
    assert main(["audit", str(tiny_ckpt), "--sections", "judge,gcg", "--max-minutes", "0", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert [(s["name"], s["status"]) for s in card["sections"]] == [("judge", "cut"), ("gcg", "cut")]
    md = (out / "card.md").read_text()
    assert "time budget of 0 minutes" in md and "--sections gcg" in md and "--max-minutes 0" in md


def test_a_negative_time_budget_is_refused(tiny_ckpt, tmp_path, capsys):
    assert main(["audit", str(tiny_ckpt), "--max-minutes", "-1", "--out", str(tmp_path / "card")]) == 2
    assert "max_minutes must be at least 0" in capsys.readouterr().err


def test_resume_adds_sections_to_an_existing_card(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "card"
    assert main(["audit", str(tiny_ckpt), "--sections", "gcg,judge", "--max-minutes", "0", "--out", str(out)]) == 0
    assert main(["audit", str(tiny_ckpt), "--sections", "judge", "--resume", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    # the card's own order (judge first), judge re-run, gcg kept as it was
    assert [(s["name"], s["status"]) for s in card["sections"]] == [("judge", "ok"), ("gcg", "cut")]
    md = (out / "card.md").read_text()
    assert "--sections gcg,judge --max-minutes 0" in md and "--sections judge --resume" in md
    # a card of another budget is not silently mixed in
    assert main(["audit", str(tiny_ckpt), "--budget", "full", "--sections", "judge", "--resume", "--out",
                 str(out)]) == 2
    assert "same model and budget" in capsys.readouterr().err


def test_resume_refuses_a_file_that_is_not_a_card(tmp_path):
    from llmlab.errors import LLMLabError
    from llmlab.safety.audit import _resumed_card
    card = {"model": "smollm2", "budget": "small", "sections": [], "command": "llmlab audit smollm2"}
    path = tmp_path / "card.json"
    for text in ("{oops", "[1]"):
        path.write_text(text)
        with pytest.raises(LLMLabError, match="--resume adds to an existing card"):
            _resumed_card(card, path)
