"""Scorers for best-of-N and tree search: a verifier, the model's own likelihood, a value prompt, a reward model,
a process reward model (prm.py).

A scorer is a function (item, texts, meter, logprobs) -> one float per text, higher is better. `texts` are
whole samples (best-of-N) or partial solutions (tree search); logprobs[i] holds the tokens' log-probabilities
of texts[i] when the caller has them.
"""

from __future__ import annotations

from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.reason.prompts import reasoning_prompt, value_prompt
from llmlab.reason.tasks import extract_answer, is_correct
from llmlab.reason.vote import mean_logprob

SCORERS = ["verifier", "likelihood", "value", "reward:PATH", "prm:PATH"]


def verifier(item, texts, meter=None, logprobs=None) -> list[float]:
    """1 for a text whose final answer is right, else 0: the task's own checker (an oracle, so best-of-N with it
    is pass@N, the ceiling any learned verifier approaches)."""
    return [float(is_correct(extract_answer(t, item), item)) for t in texts]


def likelihood(item, texts, meter=None, logprobs=None) -> list[float]:
    """The sample's mean token log-probability under the model that wrote it (free: sampling returns it)."""
    if logprobs is None or any(lp is None for lp in logprobs):
        raise LLMLabError("the likelihood scorer needs the samples' log-probabilities (the endpoint returned none)")
    return [mean_logprob(lp) for lp in logprobs]


def value(item, texts, meter, logprobs=None) -> list[float]:
    """The model judges its own (partial) solution: log P(" Yes") - log P(" No") after a value prompt."""
    contexts = [meter.chat_text(value_prompt(item, t)) for t in texts]
    if any(c is None for c in contexts):
        raise LLMLabError("the value scorer needs the endpoint's chat template (it publishes none)")
    scores = meter.loglikelihood([(c, a) for c in contexts for a in ("Yes", "No")])
    return [scores[2 * i].logprob - scores[2 * i + 1].logprob for i in range(len(texts))]


class RewardModelScorer:
    """A reward model trained with `llmlab reward` (a sequence classifier), run in this process."""

    def __init__(self, path: str | Path):
        from llmlab.train.reward import RewardModel
        self.model = RewardModel.load(path)

    def __call__(self, item, texts, meter=None, logprobs=None) -> list[float]:
        prompt = reasoning_prompt(item)
        scores = self.model.score_batch([prompt] * len(texts), list(texts))
        if meter is not None:
            meter.trace.scored_tokens += sum(len(self.model.tokenizer.encode(prompt + t)) for t in texts)
        return scores


def make_scorer(spec):
    """A scorer from its name ("verifier", "likelihood", "value", "reward:PATH", "prm:PATH") or a callable."""
    if callable(spec):
        return spec
    if spec in ("verifier", "likelihood", "value"):
        return {"verifier": verifier, "likelihood": likelihood, "value": value}[spec]
    if isinstance(spec, str) and spec.startswith("reward:"):
        return RewardModelScorer(spec[len("reward:"):])
    if isinstance(spec, str) and spec.startswith("prm:"):
        from llmlab.reason.prm import PRMScorer
        return PRMScorer(spec[len("prm:"):])
    raise LLMLabError(f"unknown scorer {spec!r} (choose from {', '.join(SCORERS)})")
