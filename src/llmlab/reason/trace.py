"""What a strategy spent and saw: a metered client that counts tokens and enforces a budget, and the Trace."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmlab.client import GenParams, Generation, LogLik
from llmlab.errors import LLMLabError


@dataclass
class Trace:
    """A strategy's record of one question."""
    samples: list[str] = field(default_factory=list)  # every text the model generated, in order
    answers: list[str | None] = field(default_factory=list)  # the answer extracted from each sample (if any)
    sample_tokens: list[int] = field(default_factory=list)  # tokens generated for each sample
    scores: list[float] = field(default_factory=list)  # per sample, when the strategy scored them
    steps: list[dict] = field(default_factory=list)  # strategy-specific log (tree levels, critiques, rounds)
    prompt_tokens: int = 0  # prompt tokens processed (a prompt shared by n samples counts once)
    completion_tokens: int = 0  # tokens generated: the compute the papers plot
    scored_tokens: int = 0  # tokens run through loglikelihood or a reward model (no generation)
    calls: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.scored_tokens


@dataclass
class Result:
    answer: str | None
    trace: Trace


class Meter:
    """A client that counts every token it is asked for into a Trace and refuses to go over a budget of
    generated tokens. A call is charged its worst case (n samples x max_tokens) against the budget before it is
    made, so a run never spends more than its budget, whatever the samples' lengths."""

    def __init__(self, client, trace: Trace | None = None, budget: int | None = None):
        self.client, self.trace, self.budget = client, trace or Trace(), budget
        self.name = getattr(client, "name", "model")
        self.started = time.perf_counter()

    def affordable(self, max_tokens: int) -> int:
        """How many more samples of up to max_tokens the budget allows (a large number without a budget)."""
        if self.budget is None:
            return 1 << 30
        return max(0, (self.budget - self.trace.completion_tokens) // max_tokens)

    def complete(self, prompts: list, params: GenParams, chat: bool = True) -> list[list[Generation]]:
        wanted = len(prompts) * params.n
        if self.affordable(params.max_tokens) < wanted:
            raise LLMLabError(f"a budget of {self.budget} generated tokens cannot pay for {wanted} more sample(s) "
                              f"of up to {params.max_tokens} tokens")
        out = self.client.complete(prompts, params, chat)
        for gens in out:
            self.trace.calls += 1
            self.trace.prompt_tokens += max((g.prompt_tokens for g in gens), default=0)
            self.trace.completion_tokens += sum(g.completion_tokens for g in gens)
        return out

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        return [gens[0] for gens in self.complete(prompts, params, chat)]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        out = self.client.loglikelihood(pairs)
        self.trace.calls += 1
        self.trace.scored_tokens += sum(self.client.count_tokens(c) for c, _ in pairs) + sum(r.n_tokens for r in out)
        return out

    def count_tokens(self, text: str) -> int:
        return self.client.count_tokens(text)

    def chat_text(self, prompt) -> str | None:
        return self.client.chat_text(prompt)

    def finish(self, answer: str | None) -> Result:
        self.trace.seconds = time.perf_counter() - self.started
        return Result(answer, self.trace)


def check_budget(budget: int | None, max_tokens: int):
    """A budget must pay for at least one sample."""
    if budget is not None and budget < max_tokens:
        raise LLMLabError(f"a budget of {budget} generated tokens is too small for one sample of up to "
                          f"{max_tokens} tokens (raise --budget or lower --max-tokens)")
