"""Sampling parameters and the pure functions that turn a row of logits into the next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmlab.errors import LLMLabError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256  # capped per prompt so that prompt + new tokens fit the context window
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; HF convention, over prompt + generated tokens
    stop: list[str] = field(default_factory=list)  # text is cut before the first stop string
    stop_token_ids: set[int] | None = None  # None: the tokenizer's stop_token_ids (EOS, end of turn)
    seed: int | None = None
    logprobs: bool = False  # log-probability of each generated token under the raw model distribution
    top_logprobs: int = 0  # also the n most likely tokens at each step (needs logprobs)
    ignore_eos: bool = False  # never stop on a stop token id

    def validate(self, context_len: int | None = None) -> "SamplingParams":
        """Raise LLMLabError naming the first impossible value; return self so calls can chain."""
        if self.temperature < 0:
            raise LLMLabError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LLMLabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LLMLabError(f"top_k must be >= 0 (0 means off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise LLMLabError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise LLMLabError(f"repetition_penalty must be > 0 (1 means off), got {self.repetition_penalty}")
        if self.max_new_tokens <= 0:
            raise LLMLabError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.top_logprobs < 0:
            raise LLMLabError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        # a value no prompt could ever satisfy is an error; a prompt that leaves less room is capped instead
        if context_len is not None and self.max_new_tokens > context_len:
            raise LLMLabError(
                f"max_new_tokens is {self.max_new_tokens} but the model's context window is {context_len} tokens")
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen (seen: (B, V) bool) less likely: divide positive logits, multiply negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose total probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens; 0 for the top one
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). seen (B, V) marks prompt + generated tokens for the penalty;
    allowed (B, V') marks the tokens a constraint permits (V' <= V: tokens past the tokenizer's are never allowed).

    The constraint's mask comes first, so every option below works under it; then, as in Hugging Face,
    repetition penalty, temperature, top-k, top-p, min-p, and one draw.
    """
    logits = logits.float()
    if allowed is not None:
        if allowed.shape[-1] < logits.shape[-1]:
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[-1]), value=False)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def row_generator(seed: int | None, index: int, device="cpu") -> torch.Generator:
    """The random stream of sample `index` of a prompt: seed + index, so a prompt's samples do not depend on what
    else is batched with it, and the engine, the batcher (the server) and the client agree for the same seed."""
    return new_generator(None if seed is None else seed + index, device)


def new_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A private random stream: the same seed gives the same samples, whatever else uses torch's global RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh, non-deterministic
    else:
        generator.manual_seed(seed)
    return generator
