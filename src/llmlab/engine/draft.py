"""Drafters for speculative decoding: who guesses the next k tokens that the target model then checks.

Three kinds, one interface (`start(prompt, max_len)` gives a per-request draft whose `propose(context, k, seq)`
returns k tokens and, for sampled drafts, the distribution q each was drawn from, (k, V); None = point masses):

- `LookupDrafter`: n-grams of the context (prompt lookup); free, strong on input-grounded tasks;
- `ModelDrafter`: a smaller model with the same tokenizer, decoding k tokens with its own KV cache;
- `self_drafter(model)`: the target's own 4-bit copy (llmlab.model.quant) drafts, the dense model verifies.

`make_drafter("lookup" | "self" | "draft:PATH", model, tokenizer)` builds one from the CLI's --speculate value.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from llmlab.engine.batcher import common_prefix_len
from llmlab.engine.sampling import sampling_probs
from llmlab.errors import LLMLabError

MAX_NGRAM = 3  # the longest context suffix looked up (then shorter ones, down to 1 token)
SPECULATE_HELP = "lookup (n-grams of the context), self (the model's 4-bit copy drafts) or draft:PATH (a small model)"


def lookup_draft(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens (n = max_ngram
    down to 1); [] when no suffix occurred before. This is llama.cpp's "lookup" / prompt lookup decoding."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first: recent text predicts best
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


# ---- prompt lookup ---------------------------------------------------------------------------------------------


class LookupDrafter:
    name = "lookup"

    def __init__(self, max_ngram: int = MAX_NGRAM):
        if max_ngram < 1:
            raise LLMLabError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def start(self, prompt: list[int], max_len: int) -> "LookupDrafter":
        return self  # nothing per request: the context is all it reads

    def propose(self, context: list[int], k: int, seq) -> tuple[list[int], None]:
        return lookup_draft(context, k, self.max_ngram), None


# ---- a draft model ---------------------------------------------------------------------------------------------


class ModelDrafter:
    """A model with the target's tokenizer that drafts autoregressively (greedy, or sampled from q)."""

    def __init__(self, model, name: str = "draft"):
        self.model, self.name = model.eval(), name
        self.device = model.model.norm.weight.device  # (the embedding may be packed: llmlab.engine.native)

    def start(self, prompt: list[int], max_len: int) -> "ModelDraft":
        return ModelDraft(self, prompt, max_len)


class ModelDraft:
    """One request's draft-model state: its KV cache holds `cached` (a prefix of the context, plus drafts that may
    have been rejected; slots past the context's common prefix are simply written over, as in the target's cache)."""

    def __init__(self, drafter: ModelDrafter, prompt: list[int], max_len: int):
        self.model, self.device = drafter.model, drafter.device
        self.cache = self.model.new_cache(1, min(max_len, self.model.config.max_seq_len))
        self.cached: list[int] = []
        if len(prompt) > 1:
            self.feed(prompt[:-1], 0)

    @torch.no_grad()
    def feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Run tokens at positions start, start + 1, ...; the next-token logits after the last one (1, V)."""
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        logits = self.model(ids, input_pos=pos, kv_cache=self.cache, last_only=True)[:, -1].float()
        self.cached = self.cached[:start] + list(tokens)
        return logits

    def propose(self, context: list[int], k: int, seq) -> tuple[list[int], torch.Tensor | None]:
        k = min(k, self.cache.max_len - len(context))  # a draft model may have a shorter context than the target
        if k <= 0:
            return [], None
        start = min(common_prefix_len(self.cached, context), len(context) - 1)  # >= 1 token must run
        logits = self.feed(context[start:], start)
        params, greedy = seq.params, seq.params.temperature == 0
        tokens, qs = [], []
        for i in range(k):
            if greedy:  # a guess of the target's argmax; what is kept is decided by the target alone
                token = int(logits.argmax(-1))
            else:  # q: the same transform of the draft's logits as the target's sampler applies to its own
                q = sampling_probs(logits, params, seq.seen)[0]
                token = int(torch.multinomial(q, 1, generator=seq.generator))
                qs.append(q)
            tokens.append(token)
            if i < k - 1:
                logits = self.feed([token], len(context) + i)
        return tokens, (torch.stack(qs) if qs else None)


def self_drafter(model) -> ModelDrafter:
    """The target's own 4-bit copy as the draft (the dense model verifies): same tokenizer, ~4× fewer bytes a step.
    Refused for a model that already decodes from packed weights (llmlab.load's default for a 4-bit GGUF)."""
    from llmlab.model.quant import quantize_int4
    from llmlab.model.transformer import MLP, Attention
    projections = [p for m in model.modules() if isinstance(m, (Attention, MLP))
                   for name, p in m.named_children() if name.endswith("_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):  # packed ones have no dense weight to copy
        raise LLMLabError("--speculate self drafts with a 4-bit copy of a higher-precision model, but this model "
                          "decodes from packed 4-bit weights already: add --exact (the fp32 model verifies) or use "
                          "--speculate lookup or draft:PATH")
    return ModelDrafter(quantize_int4(copy.deepcopy(model)), name="self")


def load_draft_model(path: str, model, tokenizer) -> ModelDrafter:
    """A draft model from a checkpoint or GGUF, refused unless it speaks the target's tokenizer."""
    from llmlab.checkpoint.load import load_checkpoint
    draft, draft_tokenizer, _ = load_checkpoint(path)
    if draft.config.vocab_size != model.config.vocab_size:
        raise LLMLabError(f"the draft model {path} has {draft.config.vocab_size} tokens in its vocabulary but the "
                          f"target has {model.config.vocab_size}: a draft must use the same tokenizer")
    probe = "Speculative decoding: the draft's tokens must mean the same to the target. 1234 Ünïcødé <|im_end|>"
    if tokenizer is not None and (draft_tokenizer.encode(probe) != tokenizer.encode(probe)
                                  or draft_tokenizer.vocab_size != tokenizer.vocab_size):
        raise LLMLabError(f"the draft model {path} has another tokenizer than the target: it cannot draft for it")
    return ModelDrafter(draft.to(model.model.embed_tokens.weight.device), name=f"draft:{path}")


def check_speculate(spec: str) -> str:
    """The --speculate value, checked before any model loads."""
    if spec in ("lookup", "self") or (spec.startswith("draft:") and len(spec) > len("draft:")):
        return spec
    raise LLMLabError(f"--speculate {spec!r}: give {SPECULATE_HELP}")


def make_drafter(spec: str, model, tokenizer=None):
    check_speculate(spec)
    if spec == "lookup":
        return LookupDrafter()
    if spec == "self":
        return self_drafter(model)
    return load_draft_model(spec[len("draft:"):], model, tokenizer)
