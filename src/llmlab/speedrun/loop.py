"""The loop from people's votes back to training, on a simulated population: the speedrun's model answers bios
questions twice in arena battles, scripted voters prefer the correct answer (else a wrong one of the right kind), the votes go to the arena's SQLite
table and are exported as preference pairs, DPO trains a new model on them, and a second arena puts the new model
beside the old one: the Bradley-Terry leaderboard and the win rate (with bootstrap intervals) say which is preferred.

It is the path a user takes with `llmlab arena serve` → votes → `llmlab arena export` → `llmlab dpo` →
`llmlab arena serve` → `llmlab arena leaderboard`, with the HTTP server replaced by direct calls to the same store
(the server's path is tested end to end in tests/test_arena_loop.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from llmlab.speedrun.config import SpeedrunConfig

ROUND1_QUESTIONS = 384  # battles of the old model against itself, whose votes become the pairs
ROUND2_QUESTIONS = 256  # questions for the new model against the old one, ROUND2_SAMPLES battles each
ROUND2_SAMPLES = 4
TEMPERATURE = 1.0  # people meet sampled answers: the model's whole distribution, not only its greedy answer
VOTERS = ("voter-1", "voter-2", "voter-3")  # the battles are shared out among them
LOOP_DPO_STEPS, LOOP_DPO_PASSES, LOOP_DPO_LR, LOOP_DPO_BETA = 40, 4, 1e-4, 0.1


def answer_score(answer: str, item: dict, kinds: dict[str, set]) -> int:
    """2 for the correct answer, 1 for a wrong one of the right kind (some person's value of the attribute asked
    about), 0 for anything else."""
    from llmlab.train.tasks import normalise
    text = normalise(answer)
    return 2 if text == item["answer"] else 1 if text in kinds[item["attribute"]] else 0


def scripted_vote(answer_a: str, answer_b: str, item: dict, kinds: dict[str, set]) -> str:
    """The population's preference: the correct answer, else one of the right kind; equal answers are a tie, or
    both bad when neither is of the right kind."""
    a, b = answer_score(answer_a, item, kinds), answer_score(answer_b, item, kinds)
    return "a" if a > b else "b" if b > a else "tie" if a else "both_bad"


def sample_answers(model, tokenizer, items: list[dict], seed: int, n: int = 1) -> list[list[str]]:
    """n sampled answers per question (sample i of a question uses seed + i), batched through the engine."""
    from llmlab.engine import Engine, SamplingParams
    from llmlab.train.chat_data import render_prompt
    engine = Engine(model, tokenizer)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=32, seed=seed)
    out = []
    for i in range(0, len(items), 64):
        chunk = items[i:i + 64]
        done = engine.generate([render_prompt(tokenizer, it["messages"]) for it in chunk], params, n=n)
        out += [[c.text for c in done[k * n:(k + 1) * n]] for k in range(len(chunk))]
    return out


def battle_round(store, items, answers_a, answers_b, names_a, names_b, rng, kinds) -> None:
    """Store one battle per question and its scripted vote, through the arena's own store (as the server does)."""
    for k, (it, a, b, name_a, name_b) in enumerate(zip(items, answers_a, answers_b, names_a, names_b)):
        battle_id = f"battle-loop-{rng.getrandbits(64):016x}"
        store.add_battle(battle_id, it["messages"], name_a, name_b, a, b)
        store.vote(battle_id, scripted_vote(a, b, it, kinds), VOTERS[k % len(VOTERS)])


def win_rate(votes: list[dict], model: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of the decided battles (a or b) that `model` won, with a 95% bootstrap interval."""
    won = np.array([v["model_" + v["vote"]] == model for v in votes if v["vote"] in ("a", "b")], dtype=float)
    if not len(won):
        return {"decided": 0, "win_rate": None, "ci95": None}
    rng = np.random.default_rng(seed)
    boot = [won[rng.integers(0, len(won), len(won))].mean() for _ in range(n_boot)]
    return {"decided": len(won), "win_rate": float(won.mean()), "ci95": np.quantile(boot, [0.025, 0.975]).tolist()}


def dpo_on_pairs(run_dir: Path, cfg: SpeedrunConfig, pairs_path: Path) -> dict:
    """DPO of the run's model (also the reference) on the exported pairs; the checkpoint goes to loop/model."""
    import json

    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.speedrun.post_training import finetune_config, loss_ends
    from llmlab.train.chat_data import preference_pair
    from llmlab.train.dpo import dpo_objective
    from llmlab.train.loop import train
    from llmlab.train.sft import prepare_model, save_result

    model, tokenizer, path = load_checkpoint(run_dir / "model")
    records = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    pairs = [preference_pair(r, tokenizer, f"pair {i}") for i, r in enumerate(records)]
    steps = max(1, min(LOOP_DPO_STEPS, LOOP_DPO_PASSES * len(pairs) // cfg.micro_batch))
    tcfg = finetune_config(run_dir / "loop", cfg, steps, LOOP_DPO_LR, "float32", cfg.seq_len, cfg.micro_batch)
    objective = dpo_objective(model.float(), pairs, tokenizer, tcfg, LOOP_DPO_BETA)
    policy = train(prepare_model(model, None), objective, tcfg).model.eval()
    save_result(policy, tokenizer, run_dir / "loop", None, str(path))
    return {"steps": steps, "lr": LOOP_DPO_LR, "beta": LOOP_DPO_BETA,
            **loss_ends(run_dir / "loop" / "metrics.jsonl")}


def run_loop(run_dir: Path, cfg: SpeedrunConfig, world) -> dict:
    """Round 1 (old vs old) → pairs → DPO → round 2 (new vs old) → leaderboard. Returns the loop's summary."""
    from llmlab.checkpoint.load import load_checkpoint
    from llmlab.eval.arena import arena_report
    from llmlab.serve.feedback import FeedbackStore, export_arena_pairs, read_votes
    from llmlab.train.tasks import bios_qa_items

    loop_dir = run_dir / "loop"
    loop_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"loop/{cfg.seed}")
    items = bios_qa_items(world, "all")
    rng.shuffle(items)
    kinds = {a: {getattr(p, a) for p in world.people} for a in {it["attribute"] for it in items}}
    # round 2 asks questions of the same population as round 1 (a deployed model meets the same kinds of questions
    # again), freshly drawn: some were voted on in round 1, most answers are new samples
    first, second = items[:ROUND1_QUESTIONS], rng.sample(items, min(ROUND2_QUESTIONS, len(items)))
    old, tokenizer, _ = load_checkpoint(run_dir / "model")
    old = old.float().eval()
    db1, db2 = loop_dir / "round1.sqlite", loop_dir / "round2.sqlite"
    store = FeedbackStore(db1)
    try:
        twice = sample_answers(old, tokenizer, first, seed=cfg.seed, n=2)
        battle_round(store, first, [a for a, _ in twice], [b for _, b in twice], ["old"] * len(first),
                     ["old"] * len(first), rng, kinds)
    finally:
        store.close()
    round1 = read_votes(db1)
    n_pairs = export_arena_pairs(db1, loop_dir / "pairs.jsonl")
    if n_pairs == 0:  # every battle a tie: nothing to learn from (a model that is always right, or never)
        return {"round1_votes": len(round1), "pairs": 0, "note": "no battle had one correct answer"}
    dpo = dpo_on_pairs(run_dir, cfg, loop_dir / "pairs.jsonl")
    new, _, _ = load_checkpoint(loop_dir / "model")
    new = new.float().eval()
    # the same random streams for both models: where DPO changed nothing the two answers are the same (a tie), so the
    # decided battles measure the change, not sampling noise
    answers = {name: [a for group in sample_answers(model, tokenizer, second, seed=cfg.seed + 1000, n=ROUND2_SAMPLES)
                      for a in group] for name, model in (("old", old), ("new", new))}
    second = [it for it in second for _ in range(ROUND2_SAMPLES)]  # a battle per sample
    sides = [rng.random() < 0.5 for _ in second]  # True: the new model is A
    names_a = ["new" if s else "old" for s in sides]
    names_b = ["old" if s else "new" for s in sides]
    store = FeedbackStore(db2)
    try:
        battle_round(store, second, [answers[n][k] for k, n in enumerate(names_a)],
                     [answers[n][k] for k, n in enumerate(names_b)], names_a, names_b, rng, kinds)
    finally:
        store.close()
    votes = read_votes(db2)
    correct = {name: sum(answer_score(a, it, kinds) == 2 for a, it in zip(answers[name], second)) / len(second)
               for name in answers}
    report = arena_report(votes, n_boot=200, seed=cfg.seed)
    return {"round1_votes": len(round1), "pairs": n_pairs, "dpo": dpo, "round2_votes": len(votes),
            "sampled_correct": correct, "new_vs_old": win_rate(votes, "new", seed=cfg.seed),
            "leaderboard": report["human"], "style_controlled": report["style_controlled"]["rows"],
            "temperature": TEMPERATURE, "voters": len(VOTERS)}


def loop_report(loop: dict | None) -> list[str]:
    """The report's section on the loop (nothing for runs without one)."""
    if not loop:
        return []
    L = ["", "## The loop: votes → DPO → arena", "",
         f"{loop['round1_votes']} arena battles of the final model against itself (bios questions, answers sampled "
         f"at temperature {TEMPERATURE:g}), voted by {len(VOTERS)} scripted voters who prefer the correct answer (else one of the right kind), "
         f"gave {loop['pairs']} preference pairs (`loop/round1.sqlite` → `loop/pairs.jsonl`)."]
    if not loop["pairs"]:
        return L + ["", "No battle had exactly one correct answer: nothing to train on, no second round."]
    w, d = loop["new_vs_old"], loop["dpo"]
    L += [f"DPO on them ({d['steps']} steps, lr {d['lr']:g}, beta {d['beta']:g}; loss {d['first_loss']:.3f} → "
          f"{d['final_loss']:.3f}) made `loop/model`. In {loop['round2_votes']} new battles (questions drawn again from all of them), "
          f"new against old (`loop/round2.sqlite`), answers were correct {loop['sampled_correct']['old']:.1%} (old) "
          f"and {loop['sampled_correct']['new']:.1%} (new) of the time.", ""]
    if w["decided"]:
        lo, hi = w["ci95"]
        L += [f"**The new model won {w['win_rate']:.1%} of the {w['decided']} decided battles (95% bootstrap CI "
              f"{lo:.1%} to {hi:.1%}).**", ""]
    L += ["| model | Bradley-Terry rating | 95% CI | length-controlled rating |", "|---|---|---|---|"]
    style = {r["model"]: r["rating"] for r in loop["style_controlled"]}
    for r in loop["leaderboard"]:
        lo, hi = r["ci95"]
        L.append(f"| {r['model']} | {r['rating']:.0f} | {lo:.0f} to {hi:.0f} | {style.get(r['model'], float('nan')):.0f} |")
    return L
