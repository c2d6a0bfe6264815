"""The arena server: SmolLM2 and a tiny random model side by side in headless Chromium (Debian's, via Playwright),
the vote in SQLite, the names shown only after the vote; bad votes are clear 4xx with nothing written."""

import json
import sqlite3
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from llmlab.api import load
from llmlab.serve.app import create_app
from llmlab.serve.feedback import export_arena_pairs, read_votes
from llmlab.serve.routes_arena import install_arena
from llmlab.serve.run import address, bind, uvicorn_server
from llmlab.serve.state import ServerOptions
from llmlab.serve.testing import running_server


@contextmanager
def running_arena(llms: dict, db, seed=0):
    first = next(iter(llms))
    options = ServerOptions(model_name=first, max_batch=2, max_len=512, db=str(db))
    app = create_app(llms[first], options)
    install_arena(app, llms, options, seed=seed)
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the arena server did not start"
        time.sleep(0.02)
    try:
        yield address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


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


def battle(client, prompt="Hi", max_tokens=8, seed=None):
    """Run one battle over HTTP; returns its id and the streamed texts."""
    texts, battle_id = {"a": "", "b": ""}, None
    with client.stream("POST", "/arena/battle", json={"messages": [{"role": "user", "content": prompt}],
                                                      "max_tokens": max_tokens, "seed": seed}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                assert "model_a" not in data and "error" not in data
                if "side" in data:
                    texts[data["side"]] += data["delta"]
                battle_id = data.get("battle_id", battle_id)
    return battle_id, texts


def test_bad_votes_are_clear_4xx_and_write_nothing(models, tmp_path):
    db = tmp_path / "arena.sqlite"
    with running_arena(models, db) as url, httpx.Client(base_url=url, timeout=120) as client:
        battle_id, _ = battle(client)
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
