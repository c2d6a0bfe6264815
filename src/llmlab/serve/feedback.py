"""Thumbs up/down from the web chat, stored in SQLite, and exported as finetuning data (SFT and preference pairs).

One row per rated answer, holding the conversation it answered, so the export needs nothing else:
- SFT: every up-voted answer, as {"messages": [...conversation, {"role": "assistant", "content": answer}]};
- pairs: for one conversation prompt, an up-voted answer (a regeneration) against a down-voted one, as
  {"messages": [...conversation], "chosen": answer, "rejected": other answer}.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    conversation_id TEXT NOT NULL,
    answer_id TEXT NOT NULL UNIQUE,
    prompt_key TEXT NOT NULL,        -- hash of the messages: answers to the same prompt share it
    messages TEXT NOT NULL,          -- JSON list of {"role", "content"} before the answer
    answer TEXT NOT NULL,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    comment TEXT,
    replaces TEXT,                   -- answer_id of the answer this one regenerated
    model TEXT
);
CREATE INDEX IF NOT EXISTS feedback_prompt ON feedback (prompt_key);
"""


def prompt_key(conversation_id: str, messages: list[dict]) -> str:
    canonical = json.dumps([conversation_id, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class FeedbackStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")  # readers (export) never block the server's writes
            self.db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise LLMLabError(f"cannot open the feedback database {self.path}: {e}") from None

    def add(self, conversation_id: str, answer_id: str, messages: list[dict], answer: str, rating: int,
            comment: str | None = None, replaces: str | None = None, model: str | None = None) -> int:
        """Store (or update: a user may change their vote) the rating of one answer; returns its row id."""
        with self.lock, self.db:
            self.db.execute(
                "INSERT INTO feedback (created, conversation_id, answer_id, prompt_key, messages, answer, rating,"
                " comment, replaces, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(answer_id) DO UPDATE SET rating = excluded.rating, comment = excluded.comment,"
                " created = excluded.created",
                (time.time(), conversation_id, answer_id, prompt_key(conversation_id, messages),
                 json.dumps(messages, ensure_ascii=False), answer, rating, comment, replaces, model))
            return self.db.execute("SELECT id FROM feedback WHERE answer_id = ?", (answer_id,)).fetchone()[0]

    def close(self):
        self.db.close()


def export_feedback(db_path: str | Path, sft_path: str | Path | None = None,
                    pairs_path: str | Path | None = None) -> dict:
    """Write SFT conversations and preference pairs as JSONL; returns {"sft": count, "pairs": count}."""
    if not Path(db_path).is_file():
        raise LLMLabError(f"no feedback database at {db_path}")
    db = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT prompt_key, messages, answer, rating FROM feedback ORDER BY id").fetchall()
    except sqlite3.Error as e:
        raise LLMLabError(f"{db_path} is not an llmlab feedback database: {e}") from None
    finally:
        db.close()
    sft, by_prompt = [], {}
    for key, messages, answer, rating in rows:
        messages = json.loads(messages)
        if rating > 0:
            sft.append({"messages": messages + [{"role": "assistant", "content": answer}]})
        by_prompt.setdefault(key, (messages, [], []))[1 if rating > 0 else 2].append(answer)
    pairs = [{"messages": messages, "chosen": good, "rejected": bad}
             for messages, goods, bads in by_prompt.values() for good in goods for bad in bads if good != bad]
    if sft_path:
        atomic_write_text(sft_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in sft))
    if pairs_path:
        atomic_write_text(pairs_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))
    return {"sft": len(sft), "pairs": len(pairs)}
