"""SamplingParams: what a request asks of the sampler, validated (no PyTorch: the lite runner takes them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # callables (context ids: prompt + generated, logits (1, V)) -> logits, applied in order before the constraint's
    # mask and the sampler (e.g. llmlab.safety.watermark.WatermarkProcessor); logprobs stay the raw model's
    logits_processors: list = field(default_factory=list)

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
        if not all(callable(p) for p in self.logits_processors):
            raise LLMLabError("logits_processors must be callables (context ids, logits) -> logits")
        # a value no prompt could ever satisfy is an error; a prompt that leaves less room is capped instead
        if context_len is not None and self.max_new_tokens > context_len:
            raise LLMLabError(
                f"max_new_tokens is {self.max_new_tokens} but the model's context window is {context_len} tokens")
        return self
