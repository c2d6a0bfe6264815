"""The model client's generation calls (stream, generate) over the lite runner (llmlab.engine.native.lite): what
`llmlab generate` and `llmlab chat` ask of a model, in a process without PyTorch. Scoring needs LocalClient.
A chat's earlier turns stay in the runner's KV cache: each turn prefills only what is new (LiteModel.tokens' reuse)."""

from __future__ import annotations

from typing import Iterator

from llmlab.client.base import GenParams, Generation
from llmlab.errors import LLMLabError


class LiteClient:
    def __init__(self, model):
        self.model, self.tokenizer, self.name = model, model.tokenizer, str(model.path)

    @property
    def model_id(self) -> str:
        return self.name

    @property
    def context_len(self) -> int:
        return self.model.context_len

    def _sampling(self, params: GenParams):
        params.validate()
        if params.n != 1 or params.logprobs or params.top_logprobs:
            raise LLMLabError("the lite runner gives one sample without logprobs: use the PyTorch path (LocalClient)")
        return self.model.params(max_new_tokens=params.max_tokens, stop=list(params.stop), seed=params.seed,
                                 **params.sampling_options())

    def stream(self, prompt, params: GenParams, chat: bool = True) -> Iterator[str]:
        return self.model.stream(self.tokenizer.prompt_ids(prompt, raw=not chat), self._sampling(params), reuse=True)

    def generate(self, prompts: list, params: GenParams, chat: bool = True) -> list[Generation]:
        out = []
        for prompt in prompts:
            ids = self.tokenizer.prompt_ids(prompt, raw=not chat)
            text = "".join(self.model.stream(ids, self._sampling(params), reuse=True))
            out.append(Generation(text, self.model.finish_reason, len(ids), self.model.sampled))
        return out
