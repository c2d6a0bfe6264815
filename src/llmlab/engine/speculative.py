"""Speculative decoding with prompt-lookup drafts: guess the next k tokens from an earlier n-gram of the context,
check them all in one forward of k + 1 tokens, keep the longest prefix the model agrees with.

Greedy output is the plain engine's (each kept token is the model's own argmax); with sampling, rejection
sampling keeps the target distribution (Leviathan et al. 2023, Chen et al. 2023): the draft is a point mass
q(x) = 1, so a drafted token x is kept with probability p(x), and on rejection the token is drawn from p with
x removed and renormalised. Stop tokens, stop strings and max_new_tokens end a sequence exactly as in
Engine.generate, because every decided token goes through the same Sequence.add.

The state between verify steps: the cache holds every token before `pending`, the last decided token, which
is fed (with the drafts behind it) at position `pos`. Slots written for rejected drafts are simply written over
later: a query at position t attends only to slots <= t, which this step has just written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from llmlab.engine.sampling import (SamplingParams, apply_repetition_penalty, min_p_filter, top_k_filter,
                                    top_p_filter)
from llmlab.engine.scoring import logprobs_and_top
from llmlab.engine.sequence import Completion, Sequence, TokenInfo, choose, new_sequence
from llmlab.errors import LLMLabError

DRAFT_TOKENS = 5  # k: tokens proposed per verify step
MAX_NGRAM = 3  # the longest context suffix looked up (then shorter ones, down to 1 token)
# a request whose drafts are mostly wrong pays for k + 1 tokens per call and gets ~1: after this many drafted
# tokens, if fewer than this share were kept, it stops drafting (plain decode steps, same output)
JUDGE_AFTER, MIN_ACCEPTANCE = 24, 0.15


@dataclass
class SpeculativeStats:
    """How well the drafts did, for usage reports and benchmarks."""
    verify_steps: int = 0  # model forwards after the prompt (each decides one or more tokens)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    tokens: int = 0  # tokens decided (sampled), counting a stop token

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.verify_steps if self.verify_steps else 0.0


def lookup_draft(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens (n = max_ngram
    down to 1); [] when no suffix occurred before. This is llama.cpp's "lookup" / prompt lookup decoding."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first: recent text predicts best
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


def target_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution sample_next draws from (temperature > 0): penalty, temperature, top-k, top-p, min-p."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = logits / params.temperature
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    return logits.softmax(dim=-1)


def decide(seq: Sequence, logits: torch.Tensor, draft: int | None) -> int:
    """The next token of seq from its logits (1, V), given the drafted token there (None: nothing drafted).

    Greedy: the model's own choice (the draft only counts as kept if it is the same token). Sampling: keep the
    draft with probability p(draft), else draw from p without it, which leaves the token distributed as p.
    """
    if draft is None or seq.params.temperature == 0:
        return choose(seq, logits)
    probs = target_probs(logits, seq.params, seq.seen)[0]
    p_draft = float(probs[draft])
    if float(torch.rand((), generator=seq.generator)) < p_draft:
        return draft
    rest = probs.clone()
    rest[draft] = 0.0
    return int(torch.multinomial(rest / rest.sum(), 1, generator=seq.generator))


def record(seq: Sequence, logits: torch.Tensor, token: int):
    """seq.add the token, with its logprobs when the request wants them (as sequence.step reports them)."""
    info = TokenInfo(token)
    if seq.params.logprobs:
        chosen, top = logprobs_and_top(logits, torch.tensor([token], device=logits.device), seq.params.top_logprobs)
        info.logprob = float(chosen[0])
        if top is not None:
            info.top = dict(zip(top[1][0].tolist(), top[0][0].tolist()))
    seq.add(info)


class SpeculativeDecoder:
    """Prompt-lookup speculative decoding of one prompt on an Engine's model."""

    def __init__(self, engine, draft_tokens: int = DRAFT_TOKENS, max_ngram: int = MAX_NGRAM,
                 min_acceptance: float = MIN_ACCEPTANCE):
        if draft_tokens < 1:
            raise LLMLabError(f"draft_tokens must be >= 1, got {draft_tokens}")
        if max_ngram < 1:
            raise LLMLabError(f"max_ngram must be >= 1, got {max_ngram}")
        self.engine, self.k, self.max_ngram, self.min_acceptance = engine, draft_tokens, max_ngram, min_acceptance
        self.stats = SpeculativeStats()  # summed over every call

    def generate(self, prompt: list[int], params: SamplingParams | None = None) -> Completion:
        seq = None
        for seq in self.steps(prompt, params or SamplingParams()):
            pass
        return seq.completion()

    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text of the completion piece by piece; the pieces join to generate()'s text."""
        for seq in self.steps(prompt, params or SamplingParams()):
            delta = seq.text.take(final=seq.finish_reason is not None)
            if delta:
                yield delta

    @torch.no_grad()
    def steps(self, prompt: list[int], params: SamplingParams) -> Iterator[Sequence]:
        """Yields the sequence after every verify step, until it finished."""
        engine = self.engine
        params.validate(engine.context_len)
        engine._check_prompt(prompt)
        seq = new_sequence(engine.tokenizer, params, prompt, min(params.max_new_tokens, engine.context_len - len(prompt)),
                           vocab_size=engine.model.config.vocab_size, device=engine.device)
        # the prompt's last token is fed with the first drafts, so even the first new token can be drafted
        cache = engine.model.new_cache(1, engine._cache_len(len(prompt) + seq.limit + self.k))
        if len(prompt) > 1:
            _, one = engine.prefill(prompt[:-1])
            cache.copy_row(0, one, length=len(prompt) - 1)
        context = list(prompt)
        pending, pos = prompt[-1], len(prompt) - 1
        mine = SpeculativeStats()  # this request's own, to turn drafting off when it does not pay
        while seq.finish_reason is None:
            room = min(self.k, seq.limit - seq.sampled - 1, cache.max_len - pos - 1)
            if mine.drafted >= JUDGE_AFTER and mine.acceptance_rate < self.min_acceptance:
                room = 0
            draft = lookup_draft(context, room, self.max_ngram) if room > 0 else []
            logits = self.verify(pending, draft, pos, cache)
            self.stats.verify_steps += 1
            self.stats.drafted += len(draft)
            mine.drafted += len(draft)
            for i in range(len(draft) + 1):
                drafted = draft[i] if i < len(draft) else None
                token = decide(seq, logits[i:i + 1], drafted)
                record(seq, logits[i:i + 1], token)
                self.stats.tokens += 1
                context.append(token)
                if token != drafted or seq.finish_reason is not None:
                    break
                self.stats.accepted += 1
                mine.accepted += 1
            pending, pos = context[-1], pos + i + 1
            yield seq

    def verify(self, pending: int, draft: list[int], pos: int, cache) -> torch.Tensor:
        """Logits (1 + len(draft), V) after pending and after each draft token: one forward at pos, pos + 1, ..."""
        engine = self.engine
        if not draft:  # a plain decode step (the compiled one when the engine has it)
            return engine.decode_step(torch.tensor([[pending]], device=engine.device),
                                      torch.tensor([[pos]], device=engine.device), cache)
        ids = torch.tensor([[pending] + draft], device=engine.device)
        input_pos = torch.arange(pos, pos + ids.shape[1], device=engine.device)[None]
        return engine.model(ids, input_pos=input_pos, kv_cache=cache)[0].float()


def speculative_generate(engine, prompt: list[int], params: SamplingParams | None = None,
                         draft_tokens: int = DRAFT_TOKENS) -> tuple[Completion, SpeculativeStats]:
    """One completion with prompt-lookup drafts, and how the drafts did."""
    decoder = SpeculativeDecoder(engine, draft_tokens)
    return decoder.generate(prompt, params), decoder.stats
