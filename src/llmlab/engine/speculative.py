"""Speculative decoding: a drafter (llmlab.engine.draft: prompt lookup, a draft model, the model's own 4-bit copy)
guesses the next k tokens, the target model checks them all in one forward of k + 1 tokens, and the longest
prefix it agrees with is kept, plus one token of its own. On the native decode path (llmlab.engine.native) that
forward is one native step of k + 1 rows sharing one cache row; otherwise the PyTorch forward of k + 1 tokens.

Greedy output is the plain engine's (each kept token is the target's own argmax; on the native path a verify row
computes exactly what a one-row step does: its kernels never depend on the batch). With sampling, rejection
sampling keeps the target distribution p (Leviathan et al. 2023, Chen et al. 2023): a token x drawn from the
draft's q is kept with probability min(1, p(x)/q(x)); on rejection the token is drawn from norm(max(0, p - q)).
A lookup draft is a point mass (q(x) = 1): x is kept with probability p(x), else drawn from p without x.
Stop tokens, stop strings and max_new_tokens end a sequence exactly as in Engine.generate, because every decided
token goes through the same Sequence.add.

The state between verify steps: the cache holds every token before the last decided one, which is fed (with the
drafts behind it) at position `pos`. Slots written for rejected drafts are simply written over
later: a query at position t attends only to slots <= t, which this step has just written.

How many tokens to draft is decided every step from what was measured (auto_off=True, the default): a drafting
step's extra cost per draft token over a plain step (timed: a native verify of k + 1 rows is one call, but each
row still costs compute), and how often drafts of that strength were kept (see best_draft_length); a step where
drafting would not pay is a plain step. Drafting also turns itself off for the rest of a request when the measured
time per token of its speculative steps is above that of plain steps (untimed: when too few drafts are kept).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from llmlab.engine.draft import LookupDrafter, lookup_draft, make_drafter  # noqa: F401 (re-exported)
from llmlab.engine.sampling import SamplingParams, sampling_probs
from llmlab.engine.scoring import logprobs_and_top
from llmlab.engine.sequence import Completion, Sequence, TokenInfo, choose, new_sequence
from llmlab.errors import LLMLabError

DRAFT_TOKENS = 7  # k: the most tokens drafted per verify step (best_draft_length picks fewer when they cost more)
# a request whose drafts are mostly wrong pays for k + 1 tokens per call and gets ~1: after this many drafted
# tokens, if speculative steps cost more time per token than plain ones (measured), or, before plain steps are
# timed, fewer than this share were kept, it stops drafting (plain decode steps, same output)
JUDGE_AFTER, MIN_ACCEPTANCE = 24, 0.15
LOSS_MARGIN = 1.1  # timed: drafting loses at this many plain steps' time per token (break-even requests, noisy
# clocks: without a margin the replay of experiments/prompt_lookup.py turned off requests that went on to win)
PLAIN_PROBES = 3  # plain steps timed (once per decoder) before drafting, to know what speculation must beat
PRIOR_SLOPE = 0.35  # a draft token's cost in plain steps (verify row + drafting), assumed until drafting is timed
PRIOR_WEIGHT = 4  # pseudo-counts of the decoder's acceptance rate in a request's own estimate


@dataclass
class SpeculativeStats:
    """How well the drafts did, for usage reports, /metrics and benchmarks."""
    verify_steps: int = 0  # target forwards that decided tokens (the prompt's prefill decides one)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    tokens: int = 0  # tokens decided (sampled), counting a stop token
    turned_off: int = 0  # requests that stopped drafting because it did not pay
    spec_seconds: float = 0.0  # time in steps that drafted, and the tokens they decided
    spec_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.verify_steps if self.verify_steps else 0.0

    def add(self, other: "SpeculativeStats"):
        for name in ("verify_steps", "drafted", "accepted", "tokens", "turned_off", "spec_seconds", "spec_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def report(self) -> dict:
        """The fields a server response's usage carries."""
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "verify_steps": self.verify_steps,
                "tokens_per_step": round(self.tokens_per_step, 4), "turned_off": bool(self.turned_off)}


def speculation_loses(stats: SpeculativeStats, plain_step_seconds: float | None, min_acceptance: float) -> bool:
    """Whether a request should stop drafting: judged after JUDGE_AFTER drafted tokens, on seconds per token of its
    drafting steps against a plain step's when plain steps were timed, else on its acceptance rate. (A native
    verify row costs ~0.07 of a step: drafts kept less often than MIN_ACCEPTANCE still paid, and the floor turned
    off requests that were winning; experiments/prompt_lookup.py.)"""
    if stats.drafted < JUDGE_AFTER:
        return False
    if not stats.accepted:  # nothing kept: whatever the clock says (a noisy plain step), drafting only costs
        return True
    if plain_step_seconds is None or not stats.spec_tokens:
        return stats.acceptance_rate < min_acceptance
    return stats.spec_seconds / stats.spec_tokens > LOSS_MARGIN * plain_step_seconds


def best_draft_length(acceptance: float, slope: float, most: int) -> int:
    """The number of drafts j <= most that decides the most tokens per second, 0 for a plain step: a step with j
    drafts decides 1 + a + ... + a^j tokens on average (a draft is kept with probability a when the ones before
    it were) and costs 1 + slope * j plain steps."""
    best, best_rate, expected = 0, 1.0, 1.0
    for j in range(1, most + 1):
        expected += acceptance ** j
        rate = expected / (1 + slope * j)
        if rate > best_rate:
            best, best_rate = j, rate
    return best


def decide(seq: Sequence, logits: torch.Tensor, draft: int | None, q: torch.Tensor | None = None) -> int:
    """The next token of seq from its logits (1, V), given the drafted token there (None: nothing drafted) and the
    distribution q (V,) it was drawn from (None: a point mass, as a lookup draft).

    Greedy: the model's own choice (the draft only counts as kept if it is the same token). Sampling: keep the
    draft with probability min(1, p/q), else draw from norm(max(0, p - q)), which leaves the token distributed as p.
    """
    if draft is None or seq.params.temperature == 0:
        return choose(seq, logits)
    p = sampling_probs(logits, seq.params, seq.seen)[0]
    q_draft = 1.0 if q is None else float(q[draft])
    if float(torch.rand((), generator=seq.generator)) * q_draft < float(p[draft]):
        return draft
    if q is None:
        rest = p.clone()
        rest[draft] = 0.0
    else:
        rest = (p - q.to(p.device)).clamp_min(0.0)
    if float(rest.sum()) <= 0:  # p == q up to rounding: a rejection had (almost) no probability; p is then right
        rest = p
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
    """Speculative decoding of one prompt at a time on an Engine's model, with drafts from `drafter` (default:
    prompt lookup; see llmlab.engine.draft, or give "lookup", "self" or "draft:PATH")."""

    def __init__(self, engine, drafter=None, draft_tokens: int = DRAFT_TOKENS, min_acceptance: float = MIN_ACCEPTANCE,
                 auto_off: bool = True, max_ngram: int | None = None):
        if draft_tokens < 1:
            raise LLMLabError(f"draft_tokens must be >= 1, got {draft_tokens}")
        if isinstance(drafter, str):
            drafter = make_drafter(drafter, engine.model, engine.tokenizer)
        if max_ngram is not None:
            drafter = LookupDrafter(max_ngram)
        self.engine, self.drafter, self.k = engine, drafter or LookupDrafter(), draft_tokens
        self.min_acceptance, self.auto_off = min_acceptance, auto_off
        self.plain_seconds: deque[float] = deque(maxlen=16)  # recent plain decode steps, what drafting must beat
        self.draft_steps: deque[tuple[float, int]] = deque(maxlen=32)  # (seconds, drafts) of recent drafting steps
        self.kept: dict[int, list[float]] = {}  # draft strength -> [drafts kept, rejections], recent requests
        self.stats = SpeculativeStats()  # summed over every call
        self.last = SpeculativeStats()  # the latest request's own

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

    def plain_step_seconds(self) -> float | None:
        return statistics.median(self.plain_seconds) if len(self.plain_seconds) >= PLAIN_PROBES else None

    def draft_slope(self) -> float:
        """A draft token's measured cost in plain steps: (drafting step - plain step) / drafts, median of recent."""
        plain = self.plain_step_seconds()
        if plain is None or len(self.draft_steps) < PLAIN_PROBES:
            return PRIOR_SLOPE
        return max(0.0, statistics.median((t - plain) / n for t, n in self.draft_steps) / plain)

    def draft_length(self, strength: int, mine: dict, room: int) -> int:
        """How many tokens to draft now: all room has with auto_off off, else what best_draft_length says for the
        acceptance rate of drafts of this strength (the request's own, over the decoder's as a prior)."""
        if not self.auto_off:
            return room
        kept, rejected = self.kept.get(strength, (0.0, 0.0))
        prior = (kept + 1) / (kept + rejected + 2)
        kept, rejected = mine.get(strength, (0, 0))
        acceptance = (kept + PRIOR_WEIGHT * prior) / (kept + rejected + PRIOR_WEIGHT)
        return best_draft_length(acceptance, self.draft_slope(), room)

    def observe(self, strength: int, mine: dict, kept: int, rejected: bool):
        for table in (self.kept, mine):
            entry = table.setdefault(strength, [0.0, 0.0])
            entry[0], entry[1] = entry[0] + kept, entry[1] + rejected
        entry = self.kept[strength]
        if entry[0] + entry[1] > 500:  # forget slowly: the decoder's prior follows what it serves lately
            entry[0], entry[1] = entry[0] / 2, entry[1] / 2

    @torch.no_grad()
    def steps(self, prompt: list[int], params: SamplingParams, mine: SpeculativeStats | None = None
              ) -> Iterator[Sequence]:
        """Yields the sequence after every verify step, until it finished. `mine` collects this request's stats."""
        engine = self.engine
        params.validate(engine.context_len)
        if params.logits_processors:  # its drafts are accepted from sampling_probs, which knows nothing of them
            raise LLMLabError("speculative decoding cannot honour logits processors (e.g. a watermark)")
        engine._check_prompt(prompt)
        limit = min(params.max_new_tokens, engine.context_len - len(prompt))
        seq = new_sequence(engine.tokenizer, params, prompt, limit, vocab_size=engine.model.config.vocab_size,
                           device=engine.device)
        # the prompt is prefilled as Engine.generate does, so the cache and every logit are the plain path's (a
        # verify row equals a one-row step): greedy output is the plain output. Its logits decide the first token,
        # drafted too (one draft, checked for free), so even the first token goes through the rejection sampling.
        cache = engine.model.new_cache(1, engine._cache_len(len(prompt) + seq.limit + self.k))
        logits, one = engine.prefill(prompt)
        cache.copy_row(0, one, length=len(prompt))
        draft_state = self.drafter.start(prompt, cache.max_len)
        context, pos = list(prompt), len(prompt) - 1
        strength = draft_state.strength(context)
        draft, q = draft_state.propose(context, 1, seq) if strength else ([], None)
        self.last = mine = mine if mine is not None else SpeculativeStats()
        drafting, kept, started = True, {}, None  # kept: this request's [drafts kept, rejections] by draft strength
        while True:
            for i in range(logits.shape[0]):  # a verify: 1 + len(draft) rows; the prefill: one
                drafted = draft[i] if i < len(draft) else None
                token = decide(seq, logits[i:i + 1], drafted, q[i] if q is not None and drafted is not None else None)
                record(seq, logits[i:i + 1], token)
                context.append(token)
                if token != drafted or seq.finish_reason is not None:
                    break
            kept_now = i + (drafted is not None and token == drafted)  # i + 1 when a stop token was a kept draft
            self.account(mine, kept, strength, len(draft), kept_now, i + 1, started)
            if drafting and speculation_loses(mine, self.plain_step_seconds() if self.auto_off else None,
                                              self.min_acceptance):
                drafting, mine.turned_off = False, 1
            pos += i + 1  # the cache now holds every token before context[-1], which is fed next at pos
            if seq.finish_reason is not None:
                self.stats.add(mine)
                yield seq
                return
            yield seq
            started = time.perf_counter()
            room = min(self.k, seq.limit - seq.sampled - 1, cache.max_len - pos - 1)
            probing = self.auto_off and len(self.plain_seconds) < PLAIN_PROBES
            strength = draft_state.strength(context) if drafting and room > 0 and not probing else 0
            want = self.draft_length(strength, kept, room) if strength else 0
            draft, q = draft_state.propose(context, want, seq) if want else ([], None)
            logits = self.verify(context[-1], draft, pos, cache)

    def account(self, mine: SpeculativeStats, kept: dict, strength: int, drafted: int, kept_now: int, decided: int,
                started: float | None):
        """Count one target forward (started None: the prefill, not timed) in the stats and the length policy."""
        mine.verify_steps += 1
        mine.drafted += drafted
        mine.accepted += kept_now
        mine.tokens += decided
        if drafted:
            self.observe(strength, kept, kept_now, kept_now < drafted and decided == kept_now + 1)
        if started is None:
            return
        seconds = time.perf_counter() - started
        if drafted:
            mine.spec_seconds, mine.spec_tokens = mine.spec_seconds + seconds, mine.spec_tokens + decided
            self.draft_steps.append((seconds, drafted))
        else:
            self.plain_seconds.append(seconds)

    def verify(self, pending: int, draft: list[int], pos: int, cache) -> torch.Tensor:
        """Logits (1 + len(draft), V) after pending and after each draft token: one forward at pos, pos + 1, ..."""
        engine = self.engine
        if not draft:  # a plain decode step (the compiled one when the engine has it)
            return engine.decode_step(torch.tensor([[pending]], device=engine.device),
                                      torch.tensor([[pos]], device=engine.device), cache)
        ids = torch.tensor([[pending] + draft], device=engine.device)
        input_pos = torch.arange(pos, pos + ids.shape[1], device=engine.device)[None]
        if engine.native_step is not None:
            # the native step as k + 1 rows of one sequence sharing cache row 0: one C++ call, causal because
            # every row's key and value are written before any row attends (30 layers of PyTorch cost more)
            return engine.native_step(ids.view(-1, 1), input_pos.view(-1, 1), cache,
                                      cache_rows=torch.zeros(ids.shape[1], dtype=torch.long))
        return engine.model(ids, input_pos=input_pos, kv_cache=cache)[0].float()


def speculative_generate(engine, prompt: list[int], params: SamplingParams | None = None,
                         draft_tokens: int = DRAFT_TOKENS, drafter=None) -> tuple[Completion, SpeculativeStats]:
    """One completion with speculative drafts (prompt lookup unless a drafter is given), and how the drafts did."""
    decoder = SpeculativeDecoder(engine, drafter, draft_tokens)
    return decoder.generate(prompt, params), decoder.stats
