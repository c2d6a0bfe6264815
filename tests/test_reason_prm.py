"""The process reward model: Math-Shepherd labels on hand-made traces (real SmolLM2 rollouts), a tiny PRM trained
through the one loop ranking held-out good steps above bad ones, and the PRM as a scorer in best-of-N and tree
search."""

import random

import pytest

from llmlab.api import load
from llmlab.client import LocalClient
from llmlab.errors import LLMLabError
from llmlab.reason import best_of_n, make_items, tree_of_thoughts
from llmlab.reason.prm import (PRM, PRMScorer, arithmetic_trace, arithmetic_traces, label_steps, ranking_accuracy,
                               split_steps, train_prm)
from llmlab.train.config import TrainConfig


@pytest.fixture(scope="module")
def client(smollm2_gguf):
    return LocalClient(load(smollm2_gguf))


def test_split_steps_and_exact_labels_of_a_slip():
    assert split_steps("3 + 4 = 7.\n\n 7 * 2 = 14.\nThe answer is 14.") == ["3 + 4 = 7.", "7 * 2 = 14.",
                                                                           "The answer is 14."]
    item = {"task": "arithmetic", "question": "Compute 3 + 4 * 2, working from left to right.", "answer": "14",
            "kind": "number", "solution": ["3 + 4 = 7.", "7 * 2 = 14.", "The answer is 14."]}
    right = arithmetic_trace(item, random.Random(0))
    assert right.steps == item["solution"] and right.labels == [1.0, 1.0, 1.0]
    slip = arithmetic_trace(item, random.Random(0), wrong_step=0)
    first = int(slip.steps[0].split("= ")[1].rstrip("."))
    assert first != 7 and slip.steps[1] == f"{first} * 2 = {first * 2}."  # later steps carry the wrong value
    assert slip.labels == [0.0, 0.0, 0.0]
    assert arithmetic_trace(item, random.Random(0), wrong_step=1).labels == [1.0, 0.0, 0.0]


def test_math_shepherd_labels_on_hand_made_traces(client):
    """A step is good when rollouts from it reach the right answer often enough: after a right first step SmolLM2
    finishes with the right answer, after a wrong one with the wrong answer; a step stating the final answer is
    checked directly (no rollouts)."""
    item = {"task": "arithmetic1", "question": "What is 7 + 5?", "answer": "12", "kind": "number"}
    good = label_steps(client, item, ["7 + 5 = 12.", "The answer is 12."], rollouts=2, threshold=0.5,
                       max_tokens=12, temperature=0.3)
    bad = label_steps(client, item, ["7 + 5 = 13.", "The answer is 13."], rollouts=2, threshold=None,
                      max_tokens=12, temperature=0.3)
    assert good == [1.0, 1.0]
    assert bad == [0.0, 0.0]  # fractions: no rollout after the slip reached 12
    with pytest.raises(LLMLabError, match="rollouts must be at least 1"):
        label_steps(client, item, ["x"], rollouts=0)


def small_items(n, seed):
    """Sums of 1..3 in the arithmetic tasks' format: few enough facts for a tiny model to learn in seconds."""
    rng = random.Random(f"prm-test/{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 3), rng.randint(1, 3)
        out.append({"task": "arithmetic1", "question": f"What is {a} + {b}?", "answer": str(a + b), "kind": "number",
                    "solution": [f"{a} + {b} = {a + b}.", f"The answer is {a + b}."]})
    return out


@pytest.fixture(scope="module")
def tiny_prm(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("prm")
    cfg = TrainConfig(out_dir=str(out), seq_len=128, micro_batch=16, max_steps=60, lr=3e-3, min_lr=3e-4,
                      warmup_steps=10, dtype="float32", threads=1, progress=False, eval_every=0, save_every=0,
                      peak_flops=1e12, seed=0)
    # slips of 10-19: a 2-layer, 64-wide model sees them within seconds (off-by-one slips need far more steps);
    # a PRM whose step tags, labels or loss were misaligned would still rank at chance
    slips = range(10, 20)
    train = arithmetic_traces(small_items(400, seed=0), seed=0, slips=slips)
    held_out = arithmetic_traces(small_items(60, seed=1), seed=1, slips=slips)
    result = train_prm(tiny_ckpt, train, cfg, val_traces=held_out)
    return result, held_out


def test_a_tiny_prm_ranks_held_out_good_steps_above_bad_ones(tiny_prm):
    result, held_out = tiny_prm
    assert result["steps"] == 60
    # chance is 0.5; the saved directory reads back with the same ranking
    assert result["val"] > 0.8
    assert ranking_accuracy(PRM.load(result["path"]), held_out) == pytest.approx(result["val"], abs=1e-3)


def test_the_prm_scores_best_of_n_and_tree_search(tiny_prm, client):
    path = tiny_prm[0]["path"]
    item = make_items("arithmetic1", 1, seed=0)[0]
    r = best_of_n(client, item, n=3, scorer=f"prm:{path}", max_tokens=16, seed=3)
    scores = r.trace.scores
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert r.answer == r.trace.answers[scores.index(max(scores))]  # never a worse-scored candidate
    assert r.trace.scored_tokens > 0
    # a whole solution is as good as its weakest step
    scorer = PRMScorer(path)
    steps = ["1 + 2 = 3.", "The answer is 3."]
    per_step = scorer.prm.step_scores(item, [steps])[0]
    assert scorer(item, ["\n".join(steps)]) == [pytest.approx(min(per_step))]
    t = tree_of_thoughts(client, item, breadth=2, beam=1, max_steps=2, step_tokens=12, scorer=f"prm:{path}",
                         budget=48)
    assert t.trace.completion_tokens <= 48 and t.trace.steps and t.trace.steps[0]["depth"] == 1
