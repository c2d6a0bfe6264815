"""LLM-as-a-judge: pointwise, pairwise, reference-guided and G-Eval grading, win rates, ratings, and the judge's
report on its own reliability."""

from llmlab.eval.judge.judge import Judge, load_prompt, load_rubric, parse_rating, parse_verdict

__all__ = ["Judge", "load_prompt", "load_rubric", "parse_rating", "parse_verdict"]
