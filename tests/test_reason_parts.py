"""The parts of llmlab.reason that need no model: tasks, answer extraction, votes, the tree search, budgets."""

import math

import pytest

from llmlab.errors import LLMLabError
from llmlab.reason import beam_search, extract_answer, majority_vote, make_items, weighted_vote
from llmlab.reason.scorers import make_scorer, verifier
from llmlab.reason.strategies import critique_passes
from llmlab.reason.tasks import load_jsonl, normalise_number
from llmlab.reason.trace import check_budget

NUM = {"kind": "number", "answer": "18"}


@pytest.mark.parametrize("text, expected", [
    ("14 + 15 - 2 = 30 - 2 = 24\nThe answer is 24.", "24"),
    ("The answer is 1,234.", "1234"),
    ("First 3 + 4 = 7, then 7 * 2 = 14. So the answer is: 14", "14"),
    ("so x = 12 #### 12", "12"),
    ("We get \\boxed{-7} in the end", "-7"),
    ("Answer: 3.50 dollars", "3.5"),
    ("5 + 3 = 8", "8"),  # no answer statement: the last number written
    ("The answer is 7.0", "7"),
    ("The answer is N.\nsince 4 + 5 = 9", "9"),  # a statement without a number falls back to the last number
    ("I cannot tell.", None),
])
def test_extract_number(text, expected):
    assert extract_answer(text, NUM) == expected


def test_extract_list_text_and_bios():
    lst = {"kind": "list"}
    assert extract_answer("Sorted: 3, 12, 45\nThe answer is 3, 12, 45.", lst) == "3, 12, 45"
    assert extract_answer("12, 45, 67", lst) == "12, 45, 67"
    assert extract_answer("The first is 3.\n3, 5, 9\nDone.", lst) == "3, 5, 9"
    text = {"kind": "text"}
    assert extract_answer("Let me think.\nThe answer is The Eiffel Tower!", text) == "eiffel tower"
    assert extract_answer("Paris", text) == "paris"
    assert extract_answer("He studied at MIT, then Stanford University.", {"kind": "bios:university"}) == \
        "Stanford University"
    assert extract_answer("Born on March 3, 1975 (not May 1, 1980). The answer is May 1, 1980.",
                          {"kind": "bios:birth_date"}) == "May 1, 1980"
    assert extract_answer("No idea", {"kind": "bios:major"}) is None


def test_normalise_number():
    assert [normalise_number(x) for x in ["1,000", "-3", "2.50", "x"]] == ["1000", "-3", "2.5", None]


def test_items_are_seeded_and_correct():
    a, b = make_items("arithmetic", 20, seed=3), make_items("arithmetic", 20, seed=3)
    assert a == b and a != make_items("arithmetic", 20, seed=4)
    for item in a:  # the worked solution's final line states the answer, and extraction reads it back
        assert extract_answer("\n".join(item["solution"]), item) == item["answer"]
    for task in ["word_problems", "arithmetic3", "add", "count_letters", "sort_list", "bios"]:
        for item in make_items(task, 8):
            assert item["task"] == task and item["question"] and item["answer"]
            assert extract_answer(f"The answer is {item['answer']}.", item) == item["answer"]
            assert "Reply with" not in item["question"]  # each strategy adds its own format instruction


def test_word_problem_answers_follow_their_steps():
    for item in make_items("word_problems", 30, seed=1):
        steps = item["solution"]
        # the last arithmetic step's result is the answer
        assert extract_answer(steps[-2], item) == item["answer"]


def test_jsonl_tasks(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "2+2?", "answer": "4"}\n\n{"question": "Capital of France?", "answer": "Paris"}\n')
    items = load_jsonl(path)
    assert [i["kind"] for i in items] == ["number", "text"] and items[1]["answer"] == "paris"
    assert make_items(str(path), 1) == items[:1]
    path.write_text('{"question": "no answer"}\n')
    with pytest.raises(LLMLabError, match="needs"):
        load_jsonl(path)


def test_bad_task_input():
    with pytest.raises(LLMLabError, match="unknown task 'nope'"):
        make_items("nope", 3)
    with pytest.raises(LLMLabError, match="at least 1"):
        make_items("arithmetic", 0)
    with pytest.raises(LLMLabError, match="no such task file"):
        make_items("/nonexistent/x.jsonl", 3)


def test_majority_vote():
    assert majority_vote(["3", "4", "3", None]) == ("3", 0.5)
    assert majority_vote([None, "5", None]) == ("5", 1 / 3)  # no answer never wins against an answer
    assert majority_vote([None, None]) == (None, 0.0)
    assert majority_vote(["7", "8", "8", "7"])[0] == "7"  # a tie goes to the answer seen first
    assert majority_vote(["8", "7", "7", "8"])[0] == "8"


def test_weighted_vote():
    # two unlikely samples say 3, one very likely sample says 4: weighting by probability picks 4
    answers, lps = ["3", "4", "3"], [math.log(0.1), math.log(0.9), math.log(0.1)]
    assert majority_vote(answers)[0] == "3"
    best, share = weighted_vote(answers, lps)
    assert best == "4" and share == pytest.approx(0.9 / 1.1)
    assert weighted_vote(["3", "4"], [0.0, 0.0])[0] == "3"  # equal weights: the first seen
    assert weighted_vote([None, "2"], [0.0, -5.0])[0] == "2"


def test_verifier_best_of_n_never_picks_a_worse_candidate():
    item = {"kind": "number", "answer": "12"}
    texts = ["The answer is 11.", "The answer is 12.", "13", "no idea"]
    scores = verifier(item, texts)
    assert scores == [0.0, 1.0, 0.0, 0.0]
    assert make_scorer("verifier") is verifier
    with pytest.raises(LLMLabError, match="unknown scorer"):
        make_scorer("oracle")


def test_critique_passes():
    assert critique_passes("CORRECT")
    assert critique_passes("Correct. Every step is right.")
    assert not critique_passes("Incorrect: 3 + 4 is 7, not 8.")
    assert not critique_passes("The second step is wrong.")
    assert not critique_passes("This is not correct.")


def test_budget_too_small_for_one_sample():
    check_budget(None, 100)
    check_budget(100, 100)
    with pytest.raises(LLMLabError, match="too small for one sample of up to 100 tokens"):
        check_budget(99, 100)


# ---- the tree search on toy problems whose optimum is known ------------------------------------------------

# A tree of depth 3 over the moves "a" and "b"; each path's value is the sum of its edges' rewards. The first
# move "a" looks best (+5 vs +1) but every path through it ends low; the optimum is "bba" = 1 + 5 + 10 = 16.
REWARD = {"a": 5, "b": 1, "aa": 0, "ab": 0, "ba": 0, "bb": 5, "aaa": 0, "aab": 1, "aba": 0, "abb": 1,
          "baa": 2, "bab": 0, "bba": 10, "bbb": 0}


def value(path: str) -> float:
    return sum(REWARD[path[:i]] for i in range(1, len(path) + 1))


def best_completion(path: str) -> float:  # an exact value function: the best total reachable from here
    return value(path) if len(path) == 3 else max(best_completion(path + m) for m in "ab")


def toy_search(beam, breadth, score, budget=None):
    expansions = []

    def expand(states):
        if budget is not None:
            states = states[:max(0, budget - len(expansions))]
        expansions.extend(states)
        return [[s + m for m in "ab"[:breadth]] for s in states]

    best, s, log = beam_search("", expand, lambda xs: [score(x) for x in xs], lambda x: len(x) == 3, beam=beam)
    return best, expansions


def test_tree_search_finds_the_known_optimum():
    # an exact value function: beam 1 is enough
    assert toy_search(beam=1, breadth=2, score=best_completion)[0] == "bba"
    # a myopic value (the reward so far): greedy falls for "a"; a beam of 2 keeps "b" alive and finds the optimum
    assert toy_search(beam=1, breadth=2, score=value)[0] != "bba"
    best, expansions = toy_search(beam=2, breadth=2, score=value)
    assert best == "bba" and len(expansions) <= 1 + 2 + 2  # within the budget of a beam of 2 over depth 3
    # exhaustive beam finds it too; a budget of one expansion stops the search early at depth 1
    assert toy_search(beam=4, breadth=2, score=value)[0] == "bba"
    best, expansions = toy_search(beam=4, breadth=2, score=value, budget=1)
    assert len(expansions) == 1 and len(best) == 1


def test_tree_search_breadth_one_is_greedy():
    # one child per state: the search follows the single path, whatever the beam and the scorer
    for beam in (1, 3):
        for score in (value, best_completion):
            assert toy_search(beam=beam, breadth=1, score=score)[0] == "aaa"
    # and with breadth 2 and beam 1, each step takes the best-scored child: greedy on the value
    greedy = ""
    while len(greedy) < 3:
        greedy = max((greedy + m for m in "ab"), key=value)
    assert toy_search(beam=1, breadth=2, score=value)[0] == greedy


def test_beam_must_be_positive():
    with pytest.raises(LLMLabError, match="beam must be at least 1"):
        beam_search("", lambda s: [[]], lambda xs: [], lambda x: True, beam=0)


@pytest.mark.parametrize("args, message", [
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["-k", "0"], "-k must be at least 1"),
    (["-k", "-3"], "-k must be at least 1"),
    (["--budget", "10", "--max-tokens", "64"], "too small for one sample of up to 64 tokens"),
    (["--strategy", "cot", "-k", "4"], "-k does not apply to strategy 'cot'"),
    (["--strategy", "cot", "--weighted"], "--weighted does not apply to strategy 'cot'"),
    (["--strategy", "cot", "--sweep", "1,2"], "'cot' has none"),
    (["--sweep", "1,x"], "comma-separated integers"),
    (["--strategy", "cot", "--strong-model", "smollm2"], "apply to router and debate"),
    (["--strategy", "best-of-n", "--scorer", "prm:/nonexistent/prm"], "no process reward model directory at"),
    (["--strategy", "tree", "--budget", "10", "--step-tokens", "48"], "too small for one sample of up to 48"),
])
def test_cli_bad_input_is_one_line_before_any_model_loads(args, message, capsys):
    from llmlab.cli.main import main
    assert main(["reason", "--model", "/nonexistent/model"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
