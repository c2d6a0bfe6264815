"""Drafters for speculative decoding: who guesses the next k tokens that the target model then checks.

Three kinds, one interface (`start(prompt, max_len)` gives a per-request draft whose `propose(context, k, seq)`
returns k tokens and, for sampled drafts, the distribution q each was drawn from, (k, V); None = point masses;
and whose `strength(context)` says what kind of draft comes next, for the decoder's acceptance statistics: the
length of the n-gram a lookup matched (0: nothing to draft), 1 for a model):

- `LookupDrafter`: n-grams of the context (prompt lookup); free, strong on input-grounded tasks;
- `ModelDrafter`: a smaller model with the same tokenizer, decoding k tokens with its own KV cache (native steps
  on its 4-bit packed copy where the kernel runs); it may know only the target's most frequent tokens (a
  checkpoint with `draft_vocab.json`, see DRAFT_VOCAB), so its output head costs a fraction of the target's;
- `self_drafter(model)`: the target's own 4-bit copy drafts (native steps), the dense model verifies.

`make_drafter("lookup" | "self" | "draft:PATH", model, tokenizer)` builds one from the CLI's --speculate value.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from llmlab.engine.batcher import common_prefix_len
from llmlab.engine.native import MAX_NATIVE_ROWS, NativeDecoder, load_library, unsupported_reason
from llmlab.engine.sampling import sampling_probs
from llmlab.errors import LLMLabError

MAX_NGRAM = 3  # the longest context suffix looked up (then shorter ones, down to 1 token)
STRONGEST = 8  # a lookup match's length (its draft's strength) is counted up to this
RECENT_MATCHES = 64  # occurrences of the matched n-gram looked at, latest first (a step's cost stays flat in a long
# context, where a common token occurs thousands of times)
DRAFT_VOCAB = "draft_vocab.json"  # {"token_ids": [...]}: the target's id of each of the draft's rows but its last,
# which stands for every other token (context tokens outside the list are fed as it; it is never drafted)
SPECULATE_HELP = "lookup (n-grams of the context), self (the model's 4-bit copy drafts) or draft:PATH (a small model)"


def lookup_draft(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """k tokens that followed an earlier occurrence of the context's end; [] when no suffix occurred before. Of the
    occurrences of the context's last n tokens (n = max_ngram down to 1, the longest that occurred), the one whose
    match runs furthest back (best_match): prompt lookup decoding (Saxena 2023; llama.cpp's "lookup"), choosing
    the source being copied rather than any recent repeat of a common phrase; nothing after a single token whose
    occurrences disagree. A continuation that runs into the end of the context repeats with its period (after
    "a b a b", "a b" is drafted again)."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        ends = [end for end in range(n, len(tokens)) if tokens[end - n:end] == tokens[-n:]]
        if ends:
            length, end = best_match(tokens, ends, n)
            return continuation(tokens, end, k) if length else []
    return []


def best_match(tokens: list[int], ends: list[int], n: int) -> tuple[int, int]:
    """(length, end) of the longest match with the context's end among earlier occurrences of its last n tokens
    that end at `ends` (ascending) with a token after them; lengths are counted up to STRONGEST, and the latest of
    equal ones wins (recent text predicts best). (0, -1) for a last token alone whose occurrences disagree on what
    follows (no strict majority): such drafts were kept ~1 time in 5. Replayed against SmolLM2's answers
    (experiments/prompt_lookup.py), both beat the latest n-gram's drafts on every prompt set and task group."""
    ends = ends[-RECENT_MATCHES:]
    if n == 1 and len(ends) > 1:
        follows = Counter(tokens[end] for end in ends)
        if 2 * max(follows.values()) <= len(ends):
            return 0, -1
    best, best_end = 0, -1
    for end in reversed(ends):
        length = n
        while length < STRONGEST and end > length and tokens[end - length - 1] == tokens[-length - 1]:
            length += 1
        if length > best:
            best, best_end = length, end
    return best, best_end


def continuation(tokens: list[int], begin: int, k: int) -> list[int]:
    """tokens[begin:begin + k], continued past the end with its own period (len(tokens) - begin)."""
    out = tokens[begin:begin + k]
    while len(out) < k:
        out.append(out[len(out) - (len(tokens) - begin)])
    return out


# ---- prompt lookup ---------------------------------------------------------------------------------------------


class LookupDrafter:
    name = "lookup"

    def __init__(self, max_ngram: int = MAX_NGRAM):
        if max_ngram < 1:
            raise LLMLabError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def start(self, prompt: list[int], max_len: int) -> "LookupDraft":
        return LookupDraft(self.max_ngram)


class LookupDraft:
    """lookup_draft over a growing context, indexed as it grows: every n-gram (n <= max_ngram) followed by a token
    is indexed once with where its continuation begins (rescanning a context of ~1,000 tokens took ~0.5 ms a step,
    a few percent of a native decode step)."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> the ends of its occurrences with a token after
        self.indexed = 0  # the n-grams ending before this position are in `ends`

    def _index(self, context: list[int]):
        """Index the n-grams that now have a token after them (the context only grows within a request)."""
        if len(context) < self.indexed:
            self.ends, self.indexed = {}, 0
        for end in range(max(self.indexed, 1), len(context)):
            for n in range(1, min(self.max_ngram, end) + 1):
                self.ends.setdefault(tuple(context[end - n:end]), []).append(end)
        self.indexed = len(context)

    def _match(self, context: list[int]) -> tuple[int, int]:
        """(length, end) of lookup_draft's match (best_match), (0, -1) if no suffix occurred before."""
        self._index(context)
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            ends = self.ends.get(tuple(context[-n:]))
            if ends:
                return best_match(context, ends, n)
        return 0, -1

    def strength(self, context: list[int]) -> int:
        """How far back the match runs (up to STRONGEST): a long match is text being copied, whose drafts are kept
        far more often than a short one's."""
        return self._match(context)[0]

    def propose(self, context: list[int], k: int, seq) -> tuple[list[int], None]:
        length, end = self._match(context)
        return (continuation(context, end, k) if length else []), None


# ---- a draft model ---------------------------------------------------------------------------------------------


class ModelDrafter:
    """A model with the target's tokenizer that drafts autoregressively (greedy, or sampled from q).

    Where the native kernel runs the model (native=True), draft steps are native steps on its 4-bit packed copy:
    a draft only guesses, and a PyTorch step of even a small model costs about what the target's native step does
    (its time is per-layer overhead), which no acceptance rate pays for. The prompt is prefilled in native chunks too where the
    kernel has them (NativeDecoder.prefill: 46 ms against PyTorch's 141 ms for a 144-token prompt, 6 layers)."""

    def __init__(self, model, name: str = "draft", native: bool = True, token_ids: list[int] | None = None,
                 vocab_size: int | None = None):
        self.model, self.name = model.eval(), name
        self.device = model.model.norm.weight.device  # (the embedding may be packed: llmlab.engine.native)
        self.step = native_step_for(self.model) if native else None
        self.token_ids = self.to_draft = None  # a draft with a vocabulary of its own: its rows' target ids, and back
        if token_ids is not None:
            other = model.config.vocab_size - 1  # the row for every token outside the list
            if len(token_ids) != other or not vocab_size or not 0 <= min(token_ids) <= max(token_ids) < vocab_size:
                raise LLMLabError(f"a draft vocabulary needs one target id below {vocab_size} for each of the model's "
                                  f"{other} rows but its last, got {len(token_ids)}")
            self.token_ids = torch.tensor(token_ids, dtype=torch.long)
            self.to_draft = torch.full((vocab_size,), other, dtype=torch.long)
            self.to_draft[self.token_ids] = torch.arange(other)

    def start(self, prompt: list[int], max_len: int) -> "ModelDraft":
        return ModelDraft(self, prompt, max_len)


class ModelDraft:
    """One request's draft-model state: its KV cache holds `cached` (a prefix of the context, plus drafts that may
    have been rejected; slots past the context's common prefix are simply written over, as in the target's cache)."""

    def __init__(self, drafter: ModelDrafter, prompt: list[int], max_len: int):
        self.model, self.device, self.step = drafter.model, drafter.device, drafter.step
        self.token_ids, self.to_draft = drafter.token_ids, drafter.to_draft
        self.cache = self.model.new_cache(1, min(max_len, self.model.config.max_seq_len))
        self.cached: list[int] = []
        if len(prompt) > 1:
            self.feed(prompt[:-1], 0)

    @torch.no_grad()
    def feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Run tokens at positions start, start + 1, ...; the next-token logits after the last one (1, V)."""
        ids = torch.tensor([tokens])
        ids = (ids if self.to_draft is None else self.to_draft[ids]).to(self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        if self.step is not None and len(tokens) <= MAX_NATIVE_ROWS:  # rows of one sequence in cache row 0
            rows = torch.zeros(len(tokens), dtype=torch.long)
            logits = self.step(ids.view(-1, 1), pos.view(-1, 1), self.cache, cache_rows=rows)[-1:]
        elif self.step is not None:  # the prompt: native chunks, ~5x a PyTorch forward's speed
            logits = self.step.prefill(ids.view(-1).tolist(), start, self.cache)
        else:
            logits = self.model(ids, input_pos=pos, kv_cache=self.cache, last_only=True)[:, -1].float()
        self.cached = self.cached[:start] + list(tokens)
        if self.token_ids is None:
            return logits
        full = logits.new_full((1, self.to_draft.shape[0]), float("-inf"))  # the target's vocabulary; the catch-all
        full[0, self.token_ids] = logits[0, :-1].to(full.dtype)  # row is never drafted
        return full

    def strength(self, context: list[int]) -> int:
        return 1

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


def native_step_for(model):
    """A NativeDecoder packing the model's weights in 4 bits, or None where the native kernel cannot run it."""
    if unsupported_reason(model) is not None or load_library() is None:
        return None
    return NativeDecoder(model)


def self_drafter(model) -> ModelDrafter:
    """The target's own 4-bit copy as the draft (the dense model verifies): same tokenizer, ~4× fewer bytes a step;
    native steps on packed copies of its weights where the kernel runs (no second model), else PyTorch 4-bit copies.
    Refused for a model that already decodes from packed weights (llmlab.load's default for a 4-bit GGUF)."""
    from llmlab.model.quant import quantize_int4
    from llmlab.model.transformer import MLP, Attention
    projections = [p for m in model.modules() if isinstance(m, (Attention, MLP))
                   for name, p in m.named_children() if name.endswith("_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):  # packed ones have no dense weight to copy
        raise LLMLabError("--speculate self drafts with a 4-bit copy of a higher-precision model, but this model "
                          "decodes from packed 4-bit weights already: add --exact (the fp32 model verifies) or use "
                          "--speculate lookup or draft:PATH")
    drafter = ModelDrafter(model, name="self")  # its native step holds the 4-bit copy; prefill is the dense model's
    if drafter.step is None:
        drafter = ModelDrafter(quantize_int4(copy.deepcopy(model)), name="self", native=False)
    return drafter


def load_draft_model(path: str, model, tokenizer) -> ModelDrafter:
    """A draft model from a checkpoint or GGUF, refused unless it speaks the target's tokenizer."""
    from llmlab.checkpoint.load import load_checkpoint
    vocab_file = Path(path) / DRAFT_VOCAB
    token_ids = None
    if vocab_file.is_file():  # a vocabulary of its own beside the target's tokenizer (load_checkpoint refuses that)
        from llmlab.checkpoint.hf import load_hf_dir
        from llmlab.tokenizer import Tokenizer
        draft, draft_tokenizer = load_hf_dir(path), Tokenizer.from_dir(path)
        try:
            token_ids = [int(t) for t in json.loads(vocab_file.read_text())["token_ids"]]
        except (ValueError, KeyError, TypeError) as e:
            raise LLMLabError(f"{vocab_file} is not a draft vocabulary ({e!r})") from None
    else:
        draft, draft_tokenizer, _ = load_checkpoint(path)
    if token_ids is None and draft.config.vocab_size != model.config.vocab_size:
        raise LLMLabError(f"the draft model {path} has {draft.config.vocab_size} tokens in its vocabulary but the "
                          f"target has {model.config.vocab_size}: a draft must use the same tokenizer")
    probe = "Speculative decoding: the draft's tokens must mean the same to the target. 1234 Ünïcødé <|im_end|>"
    if tokenizer is not None and (draft_tokenizer.encode(probe) != tokenizer.encode(probe)
                                  or draft_tokenizer.vocab_size != tokenizer.vocab_size):
        raise LLMLabError(f"the draft model {path} has another tokenizer than the target: it cannot draft for it")
    return ModelDrafter(draft.to(model.model.embed_tokens.weight.device), name=f"draft:{path}", token_ids=token_ids,
                        vocab_size=model.config.vocab_size)


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
