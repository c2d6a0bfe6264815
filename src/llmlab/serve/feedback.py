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

from llmlab.checkpoint.registry import cache_dir
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
CREATE TABLE IF NOT EXISTS arena_battles (  -- one row per arena battle: both answers, then (once) the vote
    battle_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    messages TEXT NOT NULL,          -- JSON list of {"role", "content"}: the conversation both models answered
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    vote TEXT CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),  -- NULL until the person votes
    voter TEXT,
    voted REAL
);
"""
VOTE_COLUMNS = ("battle_id", "messages", "model_a", "model_b", "answer_a", "answer_b", "vote", "voter", "voted")


class UnknownBattle(LLMLabError):
    """A vote for a battle the database does not hold."""


class AlreadyVoted(LLMLabError):
    """A second vote for one battle."""


def default_db() -> str:
    """Where the web chat's feedback lives unless told: the llmlab home ($LLMLAB_HOME, else ~/.cache/llmlab), next to
    the pulled models, not whatever directory the server was started in."""
    return str(cache_dir() / "feedback.sqlite")


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

    def add_battle(self, battle_id: str, messages: list[dict], model_a: str, model_b: str, answer_a: str,
                   answer_b: str):
        """Store an arena battle once both answers are complete; it waits for its vote."""
        with self.lock, self.db:
            self.db.execute("INSERT INTO arena_battles (battle_id, created, messages, model_a, model_b, answer_a,"
                            " answer_b) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (battle_id, time.time(), json.dumps(messages, ensure_ascii=False), model_a, model_b,
                             answer_a, answer_b))

    def vote(self, battle_id: str, vote: str, voter: str | None = None) -> dict:
        """Record the one vote of a battle (one UPDATE: nothing half-written) and return the battle, names included.
        UnknownBattle if there is no such battle, AlreadyVoted if it has its vote."""
        with self.lock, self.db:
            done = self.db.execute("UPDATE arena_battles SET vote = ?, voter = ?, voted = ? WHERE battle_id = ? AND"
                                   " vote IS NULL", (vote, voter, time.time(), battle_id)).rowcount
            row = self.db.execute(f"SELECT {', '.join(VOTE_COLUMNS)} FROM arena_battles WHERE battle_id = ?",
                                  (battle_id,)).fetchone()
        if row is None:
            raise UnknownBattle(f"there is no arena battle {battle_id!r}: vote with the battle_id the battle returned")
        if not done:
            raise AlreadyVoted(f"the battle {battle_id!r} has its vote already ({row[6]}); a battle takes one vote")
        return dict(zip(VOTE_COLUMNS, row))

    def close(self):
        self.db.close()


def read_votes(db_path: str | Path) -> list[dict]:
    """Every voted arena battle (oldest first), read-only, as dicts of VOTE_COLUMNS (messages parsed)."""
    if not Path(db_path).is_file():
        raise LLMLabError(f"no feedback database at {db_path}")
    db = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    try:
        rows = db.execute(f"SELECT {', '.join(VOTE_COLUMNS)} FROM arena_battles WHERE vote IS NOT NULL"
                          " ORDER BY voted").fetchall()
    except sqlite3.Error as e:
        raise LLMLabError(f"{db_path} has no arena votes table: {e}") from None
    finally:
        db.close()
    return [{**dict(zip(VOTE_COLUMNS, r)), "messages": json.loads(r[1])} for r in rows]


def export_arena_pairs(db_path: str | Path, pairs_path: str | Path) -> int:
    """Arena votes with a winner as preference pairs ({"messages", "chosen", "rejected"}, as export_feedback writes);
    ties and both-bad votes say nothing about which answer is better and are left out. Returns the count."""
    pairs = [{"messages": v["messages"], "chosen": v["answer_" + v["vote"]],
              "rejected": v["answer_" + ("b" if v["vote"] == "a" else "a")]}
             for v in read_votes(db_path) if v["vote"] in ("a", "b") and v["answer_a"] != v["answer_b"]]
    atomic_write_text(pairs_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))
    return len(pairs)


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
