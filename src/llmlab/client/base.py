"""What every program that uses a model asks of it: the request and result types and the ModelClient protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from llmlab.errors import LLMLabError


@dataclass
class GenParams:
    """One generation request's options. None means the model's own default (its generation_config.json)."""
    max_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # sample i of a prompt uses seed + i, in-process and on llmlab's server alike
    n: int = 1  # samples per prompt; in-process they share one prefill and decode as one batch
    logprobs: bool = False  # the log-probability of each generated token
    top_logprobs: int = 0  # > 0: also the n most likely tokens at each step

    def validate(self) -> "GenParams":
        if self.max_tokens < 1:
            raise LLMLabError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.n < 1:
            raise LLMLabError(f"n must be at least 1, got {self.n}")
        if self.top_logprobs < 0:
            raise LLMLabError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        return self

    def sampling_options(self) -> dict:
        """The options that were given, as SamplingParams / OpenAI fields (None ones are left to the model)."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class Generation:
    text: str
    finish_reason: str = "stop"  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[str] | None = None  # the generated tokens' texts (when logprobs or top_logprobs were asked)
    logprobs: list[float] | None = None  # per generated token
    top_logprobs: list[dict[str, float]] | None = None  # per generated token: {token text: logprob}
    tool_calls: list[dict] | None = None  # chat_tools: OpenAI tool calls ({id, type, function: {name, arguments}})


@dataclass
class LogLik:
    logprob: float  # sum over the continuation's tokens
    n_tokens: int
    greedy: bool = False  # every continuation token was the most likely one


class ModelClient(Protocol):
    """A model in this process (LocalClient) or behind any OpenAI-compatible endpoint (EndpointClient)."""
    name: str  # for people: the model and where it runs
    model_id: str  # which model answers, whatever its address (what resumed results are keyed by)

    def complete(self, prompts: list, params: GenParams, chat: bool = True) -> list[list[Generation]]:
        """params.n generations per prompt. chat=True: a str is a user message, a list is messages."""

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        """The first generation of each prompt."""

    def stream(self, prompt, params: GenParams, chat: bool = True) -> Iterator[str]:
        """Text deltas of one generation as they are produced."""

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLik]:
        """log P(continuation | context) for each (context, continuation) of raw text."""

    def loglikelihood_rolling(self, texts: list[str]) -> list[LogLik]:
        """log P(text) of whole texts, however long: windows of the context length, each scoring new tokens."""

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` (exact in-process, an estimate for endpoints without /tokenize)."""

    def chat_text(self, prompt) -> str | None:
        """The raw text a chat prompt renders to (template and generation prompt included), or None if unknown."""

    def chat_tools(self, messages: list[dict], tools: list[dict], params: GenParams, tool_choice="auto",
                   parallel_tool_calls: bool = True) -> Generation:
        """One answer to OpenAI-style messages (tool_calls and tool results included) with OpenAI tool definitions
        and tool_choice ("none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}): text
        holds the content ("" when there is none), tool_calls the calls (finish_reason "tool_calls")."""


def chat_messages(prompt) -> list[dict]:
    """A chat prompt as messages: a str is one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
