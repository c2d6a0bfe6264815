"""Needle in a haystack, contamination and option-order sensitivity on SmolLM2, scored from the raw outputs."""

import json
import string

import numpy as np
import pytest

from llmlab.eval.contamination import check_contamination, exact_overlap
from llmlab.eval.metrics import normalize_answer
from llmlab.eval.niah import haystack, make_needle, run_niah
from llmlab.eval.order import cyclic_permutations, order_sensitivity


@pytest.fixture(scope="module")
def backend(smollm2_gguf):
    import llmlab
    from llmlab.client import LocalClient
    return LocalClient(llmlab.load(smollm2_gguf))


def test_haystack_places_the_needle():
    count = lambda s: len(s.split())
    needle, question, answer = make_needle(3)
    assert answer in needle and "secret code" in question
    assert haystack(count, 200, needle, 0.0).startswith(needle)
    assert haystack(count, 200, needle, 1.0).endswith(needle)
    mid = haystack(count, 200, needle, 0.5)
    assert 0.3 < mid.index(needle) / len(mid) < 0.7
    assert abs(count(mid) - 200) < 20


def test_number_needle_keeps_the_city_and_digits():
    needle, question, answer = make_needle(1)
    number_needle, number_question, number = make_needle(1, number=True)
    assert number.isdigit() and answer.endswith("-" + number) and number_question == question
    assert number_needle == needle.replace(answer, number)


def test_niah_small_grid(backend, tmp_path):
    s = run_niah(backend, lengths=[96, 256], depths=[0.0, 1.0], out_dir=tmp_path, max_tokens=20)
    assert len(s["exact"]) == 2 and len(s["exact"][0]) == 2
    for r in s["records"]:
        assert r["exact"] == float(normalize_answer(r["answer"]) in normalize_answer(r["output"]))
        assert r["exact"] <= r["fuzzy"] <= 1.0
        assert r["prompt"].count(r["needle"]) == 1
        i, j = s["depths"].index(r["depth"]), s["lengths"].index(r["length"])
        assert s["exact"][i][j] == r["exact"] and s["fuzzy"][i][j] == r["fuzzy"]
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 4


def test_contamination_flags_what_the_model_reproduces(backend, tmp_path):
    assert exact_overlap("a b x d", "a b c d") == 0.5
    texts = ["Monday Tuesday Wednesday Thursday Friday Saturday Sunday Monday Tuesday Wednesday Thursday Friday "
             "Saturday Sunday",  # a pattern any LM continues
             "zebra quantum lettuce harbor violin seventeen marble oxygen pencil glacier tulip monsoon"]
    s = check_contamination(backend, texts, threshold=0.8, out_dir=tmp_path)
    flagged = [r["flagged"] for r in s["records"]]
    assert flagged == [True, False]
    assert s["flagged"] == 1 and s["flagged_rate"] == 0.5
    assert (tmp_path / "contamination.jsonl").exists()


def test_order_sensitivity(backend, tmp_path):
    assert cyclic_permutations(3) == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    from llmlab.eval.builtin import bios_mc
    items = bios_mc(3, 0)
    s = order_sensitivity(backend, items, context_field="biography", out_dir=tmp_path)
    recs = s["records"]
    assert len(recs) == 3 * 4 and s["rotations"] == 4
    for r in recs:
        it = items[r["id"]]
        perm = cyclic_permutations(4)[r["rotation"]]
        letter = int(np.argmax(r["logliks"]))
        assert r["letter"] == string.ascii_uppercase[letter] and r["chosen"] == perm[letter]
        assert r["correct"] == float(perm[letter] == it["gold"])
    accs = [np.mean([r["correct"] for r in recs if r["rotation"] == k]) for k in range(4)]
    assert s["accuracy_per_rotation"] == pytest.approx(accs)
    assert s["accuracy_spread"] == pytest.approx(max(accs) - min(accs))
    same_letter = np.mean([len({r["letter"] for r in recs if r["id"] == i}) == 1 for i in range(3)])
    assert s["same_letter_rate"] == pytest.approx(same_letter)
    assert json.loads((tmp_path / "order.json").read_text())["accuracy_spread"] == s["accuracy_spread"]
