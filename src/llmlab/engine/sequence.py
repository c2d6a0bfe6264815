"""One generated sequence and the one decode step every generation loop shares (the Engine's and the batcher's):
sample each row under its own parameters, random stream and constraint, record the token, decide if it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llmlab.engine.detokenize import IncrementalText
from llmlab.engine.sampling import SamplingParams, row_generator, sample_next
from llmlab.engine.scoring import logprobs_and_top

MAX_REJECTIONS = 8  # tokens a constraint may refuse for the budget before its closing is forced


@dataclass
class TokenInfo:
    """One generated token, for logprobs in responses."""
    id: int
    logprob: float | None = None  # under the raw model distribution (before penalty, temperature, filters, mask)
    top: dict[int, float] | None = None  # the most likely tokens, most likely first


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, without the stop token that ended generation
    text: str  # their text, cut before a stop string
    finish_reason: str  # "stop" (stop token, stop string, constraint closed) | "length" (max_new_tokens, context)
    logprobs: list[float] | None = None  # per token of token_ids, under the raw model distribution
    top_logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, most likely first
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens sampled, counting a stop token
    score: float | None = None  # beam search: sum of logprobs / length ** length_penalty


@dataclass
class Sequence:
    """One completion being generated in one row of a batch cache."""
    params: SamplingParams
    text: IncrementalText
    generator: torch.Generator
    stop_ids: frozenset
    prompt_len: int
    limit: int  # most tokens it may sample
    index: int = 0  # which of its prompt's n samples (its random stream is seed + index)
    constraint: object | None = None  # an llmlab.engine.constraint.Constraint: decides which tokens may come
    seen: torch.Tensor | None = None  # (1, V) prompt + generated tokens, for the repetition penalty
    request: object | None = None  # the batcher's Request it belongs to
    row: int = -1  # its row in the batch cache
    pos: int = 0  # where the next fed token is written in the cache
    sampled: int = 0  # tokens sampled, counting a stop token
    tokens: list[TokenInfo] = field(default_factory=list)
    unsent: list[TokenInfo] = field(default_factory=list)  # tokens not yet handed out (the batcher's sink)
    finish_reason: str | None = None
    prompt: list[int] = field(default_factory=list)  # the context logits processors see before the tokens

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def finish(self, reason: str):
        self.finish_reason = reason
        self.text.close()

    def add(self, info: TokenInfo):
        """Record a sampled token and decide whether the sequence ended with it."""
        self.sampled += 1
        token = info.id
        if self.seen is not None:
            self.seen[0, token] = True
        if token in self.stop_ids:
            self.finish("stop")
            return
        self.tokens.append(info)
        self.unsent.append(info)
        self.text.add(token)
        if self.text.stopped:
            self.finish("stop")
        elif self.constraint is not None and self.constraint.finished:
            # a complete value ends the answer: "stop" if it closed on its own, "length" if closed for the budget
            self.finish("length" if self.constraint.forced else "stop")
        elif self.sampled >= self.limit:
            self.finish("length")

    def completion(self) -> Completion:
        want = self.params.logprobs
        return Completion(
            token_ids=self.token_ids, text=self.text.text, finish_reason=self.finish_reason,
            logprobs=[t.logprob for t in self.tokens] if want else None,
            top_logprobs=[t.top for t in self.tokens] if want and self.params.top_logprobs else None,
            prompt_tokens=self.prompt_len, completion_tokens=self.sampled)


def stop_ids_of(params: SamplingParams, tokenizer) -> frozenset:
    if params.ignore_eos:
        return frozenset()
    return frozenset(tokenizer.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)


def new_sequence(tokenizer, params: SamplingParams, prompt: list[int], limit: int, index: int = 0,
                 constraint_factory: Callable | None = None, vocab_size: int = 0, device="cpu") -> Sequence:
    """Sample `index` of a prompt: its own random stream (seed + index), stop rules, penalty state, constraint."""
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop)
    seq = Sequence(params=params, text=IncrementalText(tokenizer, stop), generator=row_generator(params.seed, index, device),
                   stop_ids=stop_ids_of(params, tokenizer), prompt_len=len(prompt), limit=limit, index=index,
                   constraint=constraint_factory() if constraint_factory is not None else None, pos=len(prompt),
                   prompt=prompt)
    if params.repetition_penalty != 1.0:
        seq.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
        seq.seen[0, torch.tensor(prompt, device=device)] = True
    return seq


def choose(seq: Sequence, logits: torch.Tensor) -> int:
    """The row's next token from its logits (1, V): its logits processors, its constraint's mask, the one sampler."""
    for processor in seq.params.logits_processors:
        logits = processor(seq.prompt + seq.token_ids, logits)
    constraint = seq.constraint
    if constraint is None:
        return int(sample_next(logits, seq.params, seq.generator, seq.seen)[0])
    remaining = seq.limit - seq.sampled
    allowed = constraint.allowed(remaining).to(logits.device)[None]
    for _ in range(MAX_REJECTIONS):
        if not allowed.any():
            break
        token = int(sample_next(logits, seq.params, seq.generator, seq.seen, allowed)[0])
        if token in seq.stop_ids or constraint.accept(token, remaining):
            return token
        allowed = allowed.clone()  # this token leaves no room to close within the budget: draw again without it
        allowed[0, token] = False
    token = constraint.fallback()
    constraint.accept(token, remaining)
    return token


def choose_all(seqs: list[Sequence], logits: list[torch.Tensor]) -> list[int]:
    """choose() for every row. Rows under the same plain options (no constraint, no logits processors) are sampled
    together: one pass over their stacked logits instead of one per row (a quarter less time for a 16-row server
    step), each row still drawing from its own random stream, so it draws what it would draw alone."""
    tokens: list[int | None] = [None] * len(seqs)
    groups: dict[tuple, list[int]] = {}
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.constraint is None and not p.logits_processors:
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty), []).append(i)
        else:
            tokens[i] = choose(seq, logits[i])
    for rows in groups.values():
        if len(rows) == 1:
            tokens[rows[0]] = choose(seqs[rows[0]], logits[rows[0]])
            continue
        params = seqs[rows[0]].params
        batch = torch.cat([logits[i] for i in rows])
        seen = None if seqs[rows[0]].seen is None else torch.cat([seqs[i].seen for i in rows])
        chosen = sample_next(batch, params, [seqs[i].generator for i in rows], seen)
        for i, token in zip(rows, chosen.tolist()):
            tokens[i] = token
    return tokens


def step(seqs: list[Sequence], logits: list[torch.Tensor]) -> list[int]:
    """One token for each sequence from its logits (1, V) (views of a batch's, no copy): choose, score, record."""
    tokens = choose_all(seqs, logits)
    infos = [TokenInfo(t) for t in tokens]
    want = [i for i, seq in enumerate(seqs) if seq.params.logprobs]
    if want:  # one log-softmax for every row that reports logprobs
        k = max(seqs[i].params.top_logprobs for i in want)
        rows = torch.cat([logits[i] for i in want])
        chosen, top = logprobs_and_top(rows, torch.tensor([tokens[i] for i in want], device=rows.device), k)
        chosen = chosen.tolist()
        if top is not None:
            top_values, top_ids = top[0].tolist(), top[1].tolist()
        for j, i in enumerate(want):
            infos[i].logprob = chosen[j]
            n_top = seqs[i].params.top_logprobs
            if n_top:
                infos[i].top = dict(zip(top_ids[j][:n_top], top_values[j][:n_top]))
    for seq, info in zip(seqs, infos):
        seq.add(info)
    return tokens
