"""Test-time compute: chain of thought, self-consistency, best-of-N, tree search, revision, routing and debate,
as plain functions over a model client, each returning the answer and a trace of what it spent."""

from llmlab.reason.run import STRATEGIES, evaluate, solve, sweep
from llmlab.reason.strategies import best_of_n, cot, debate, direct, revise, router, self_consistency
from llmlab.reason.tasks import TASKS, extract_answer, is_correct, make_items
from llmlab.reason.trace import Meter, Result, Trace
from llmlab.reason.tree import beam_search, tree_of_thoughts
from llmlab.reason.vote import majority_vote, weighted_vote

__all__ = ["Meter", "Result", "STRATEGIES", "TASKS", "Trace", "beam_search", "best_of_n", "cot", "debate", "direct",
           "evaluate", "extract_answer", "is_correct", "majority_vote", "make_items", "revise", "router",
           "self_consistency", "solve", "sweep", "tree_of_thoughts", "weighted_vote"]
