"""The loop closes: arena votes from a scripted voter -> preference pairs -> DPO -> the new checkpoint in the arena
beside the old one, where the same voter prefers it (win rate above 50% with a bootstrap interval).

The model is the tiny random checkpoint (fast); the voter's preference is one such a model can learn from a few dozen
pairs: the arithmetic prompts ask for the number only, so it prefers the answer that starts with a digit. Answers
are 4 tokens, which puts DPO's signal on the first ones."""

import httpx
import numpy as np

from helpers import arena_battle, running_arena
from llmlab.api import load
from llmlab.cli.main import main
from llmlab.eval.arena import arena_report
from llmlab.serve.feedback import export_arena_pairs, read_votes
from llmlab.train import tasks

PROMPTS = [t["messages"][-1]["content"] for t in tasks.make_tasks("arithmetic", 64, seed=1)]  # "... number only."


def scripted_vote(a: str, b: str) -> str:
    """The arithmetic prompts ask for the number only: prefer the answer that starts with a digit."""
    da, db = a[:1].isdigit(), b[:1].isdigit()
    return "a" if da > db else "b" if db > da else "tie"


def arena_round(llms, db, n, seed):
    with running_arena(llms, db, seed=seed) as url, httpx.Client(base_url=url, timeout=120) as client:
        for k in range(n):
            battle_id, texts = arena_battle(client, PROMPTS[k % len(PROMPTS)], max_tokens=4,
                                            seed=seed * 1000 + 2 * k)
            vote = scripted_vote(texts["a"], texts["b"])
            r = client.post("/arena/vote", json={"battle_id": battle_id, "vote": vote, "voter": "script"})
            assert r.status_code == 200
    return read_votes(db)


def test_arena_votes_dpo_and_the_new_model_wins(tiny_ckpt, tmp_path, capsys):
    old = load(str(tiny_ckpt))
    # round 1: the old model against itself (two samples), the voter picks
    arena_round({"old": old, "old-b": load(str(tiny_ckpt))}, tmp_path / "round1.sqlite", 160, seed=1)
    pairs = tmp_path / "pairs.jsonl"
    n_pairs = export_arena_pairs(tmp_path / "round1.sqlite", pairs)
    assert n_pairs >= 8
    assert main(["dpo", str(tiny_ckpt), str(pairs), "--out-dir", str(tmp_path / "dpo"), "--seq-len", "64",
                 "--micro-batch", "8", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup-steps", "2", "--no-progress",
                 "--dtype", "float32", "--threads", "1", "--peak-flops", "1e12", "--beta", "0.5",
                 "--max-steps", "40"]) == 0
    capsys.readouterr()
    # round 2: the DPO model beside the old one, new prompts' seeds
    votes = arena_round({"old": old, "new": load(str(tmp_path / "dpo" / "model"))}, tmp_path / "round2.sqlite", 64,
                        seed=2)
    decided = np.array([(v["vote"] == "a") == (v["model_a"] == "new") for v in votes if v["vote"] in ("a", "b")])
    rng = np.random.default_rng(0)
    boot = [decided[rng.integers(0, len(decided), len(decided))].mean() for _ in range(1000)]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    print(f"new wins {decided.mean():.2f} of {len(decided)} decided battles, 95% CI [{lo:.2f}, {hi:.2f}]")
    assert len(decided) >= 10 and lo > 0.5
    board = arena_report(votes, n_boot=100)["human"]
    assert board[0]["model"] == "new" and board[0]["ci95"][0] > board[1]["ci95"][1]
