"""The arena server: SmolLM2 and a tiny random model side by side in headless Chromium (Debian's, via Playwright),
the vote in SQLite, the names shown only after the vote; bad votes are clear 4xx with nothing written."""

import json
import sqlite3

import httpx
import pytest

from helpers import arena_battle, running_arena
from llmlab.api import load
from llmlab.serve.feedback import export_arena_pairs, read_votes
from llmlab.serve.testing import running_server


@pytest.fixture(scope="module")
def models(smollm2_gguf, tiny_ckpt):
    return {"smollm2": load(smollm2_gguf), "tiny": load(str(tiny_ckpt))}


def test_arena_page_votes_then_reveals_the_names(browser, models, tmp_path):
    db = tmp_path / "arena.sqlite"
    with running_arena(models, db) as url:
        page = browser.new_page()
        page.goto(url + "/arena")
        page.fill("#input", "What is the capital of France?")
        page.fill("#max-tokens", "24")
        page.click("#send")
        page.wait_for_selector("#vote-a:enabled")
        answers = {s: page.text_content(f"#answer-{s}") for s in "ab"}
        assert answers["a"] and answers["b"]
        assert page.text_content("#name-a") == page.text_content("#name-b") == ""  # anonymous until the vote
        assert sqlite3.connect(db).execute("SELECT vote FROM arena_battles").fetchall() == [(None,)]
        page.click("#vote-b")
        page.wait_for_selector("#status:text('vote saved')")
        names = {s: page.text_content(f"#name-{s}") for s in "ab"}
        page.close()
    assert sorted(names.values()) == ["smollm2", "tiny"]
    (vote,) = read_votes(db)
    assert (vote["vote"], vote["model_a"], vote["model_b"]) == ("b", names["a"], names["b"])
    assert (vote["answer_a"], vote["answer_b"]) == (answers["a"], answers["b"])
    assert vote["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    pairs = tmp_path / "pairs.jsonl"
    assert export_arena_pairs(db, pairs) == 1
    assert json.loads(pairs.read_text()) == {"messages": vote["messages"], "chosen": answers["b"],
                                             "rejected": answers["a"]}


def test_bad_votes_are_clear_4xx_and_write_nothing(models, tmp_path):
    db = tmp_path / "arena.sqlite"
    with running_arena(models, db) as url, httpx.Client(base_url=url, timeout=120) as client:
        battle_id, _ = arena_battle(client)
        r = client.post("/arena/vote", json={"battle_id": "battle-nope", "vote": "a"})
        assert r.status_code == 404 and "no arena battle 'battle-nope'" in r.json()["error"]["message"]
        r = client.post("/arena/vote", json={"battle_id": battle_id, "vote": "A"})
        assert r.status_code == 400  # not one of a, b, tie, both_bad
        r = client.post("/arena/vote", json={"battle_id": battle_id, "vote": "tie", "voter": "ann"})
        assert r.status_code == 200 and sorted([r.json()["model_a"], r.json()["model_b"]]) == ["smollm2", "tiny"]
        r = client.post("/arena/vote", json={"battle_id": battle_id, "vote": "a"})
        assert r.status_code == 409 and "has its vote already (tie)" in r.json()["error"]["message"]
        r = client.post("/arena/battle", json={"messages": []})
        assert r.status_code == 400
    rows = sqlite3.connect(db).execute("SELECT battle_id, vote, voter FROM arena_battles").fetchall()
    assert rows == [(battle_id, "tie", "ann")]  # the refused votes changed nothing


def test_single_model_server_has_no_arena(models, tmp_path):
    with running_server(models["tiny"], model_name="tiny", max_len=256) as url:
        r = httpx.post(url + "/arena/battle", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 404 and "llmlab arena serve" in r.json()["error"]["message"]
