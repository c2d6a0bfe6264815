"""The web chat in headless Chromium (Debian's, driven by Playwright), and the feedback it stores in SQLite."""

import argparse
import json
import sqlite3

import pytest

from llmlab.api import load
from llmlab.cli import serve as commands
from llmlab.serve.feedback import FeedbackStore, export_feedback
from llmlab.serve.testing import running_server


def test_chat_page_streams_stops_and_stores_a_thumbs_down(browser, smollm2_gguf, tmp_path):
    db = tmp_path / "feedback.sqlite"
    llm = load(smollm2_gguf)
    with running_server(llm, model_name="smollm2", max_batch=2, max_len=512, db=str(db)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'smollm2'")
        page.fill("#system", "You are a storyteller.")
        page.fill("#max-tokens", "300")
        page.fill("#input", "Tell me a long story about a lighthouse.")
        page.click("#send")
        answer = page.locator(".msg.assistant .text").first
        # streamed: text appears while the Stop button is still enabled
        page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 10")
        assert page.is_enabled("#stop")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant.done")
        stopped_text = answer.text_content()
        assert 10 < len(stopped_text)
        assert page.is_disabled("#stop")
        page.fill(".msg.assistant .comment", "too long")
        page.click(".msg.assistant .down")
        page.wait_for_selector(".msg.assistant .fb-status:text('saved')")
        page.close()

    rows = sqlite3.connect(db).execute("SELECT rating, comment, answer, messages FROM feedback").fetchall()
    assert len(rows) == 1
    rating, comment, text, messages = rows[0]
    assert (rating, comment, text) == (-1, "too long", stopped_text)
    assert json.loads(messages) == [{"role": "system", "content": "You are a storyteller."},
                                    {"role": "user", "content": "Tell me a long story about a lighthouse."}]
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_feedback_export_sft_and_pairs(tmp_path):
    db = tmp_path / "f.sqlite"
    store = FeedbackStore(db)
    prompt = [{"role": "user", "content": "Capital of France?"}]
    store.add("c1", "a1", prompt, "Berlin.", -1, comment="wrong")
    store.add("c1", "a2", prompt, "Paris.", 1, replaces="a1")
    store.add("c2", "b1", [{"role": "user", "content": "Hi"}], "Hello!", 1)
    store.add("c2", "b1", [{"role": "user", "content": "Hi"}], "Hello!", 1)  # a repeated vote updates the row
    store.close()
    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    parser = argparse.ArgumentParser()
    commands.add_commands(parser.add_subparsers())
    args = parser.parse_args(["feedback", "export", "--db", str(db), "--sft", str(sft), "--pairs", str(pairs)])
    assert args.func(args) == 0
    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert sft_rows == [{"messages": prompt + [{"role": "assistant", "content": "Paris."}]},
                        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    pair_rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert pair_rows == [{"messages": prompt, "chosen": "Paris.", "rejected": "Berlin."}]
    assert export_feedback(db) == {"sft": 2, "pairs": 1}
