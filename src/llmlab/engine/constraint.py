"""Constrained decoding: a token mask from a grammar (JSON Schema, regex, Lark/EBNF) applied before the one sampler.

The grammar engine is llguidance (what vLLM and SGLang use): it compiles a grammar against the tokenizer's
vocabulary and computes the exact mask of allowed next tokens. On SmolLM2's 49k vocabulary, mask + budget
closing take ~0.4-0.75 ms of CPU per token; the hand-written JSON parser this replaces took ~0.5-1.3 ms on real
model logits to find only a few valid candidates (~70 ms when the 64 likeliest tokens were all invalid, ~460 ms
for a whole mask), and covered a small JSON Schema subset. Because the mask is applied before sampling,
temperature, top-k, top-p, min-p, the repetition penalty and the seed all work under a constraint, and the
reported logprobs are the raw model's. The first mask of a process costs about a second (llguidance's lazy setup).

llguidance cannot end a value early when the token budget runs out, so this module adds that: after every
token it finds a short closing (greedily on a copy of the matcher: its forced tokens, else the most closing
character it accepts, else its lowest allowed token) and, once the closing needs every token left, forces it token by token. A token whose closing would
not fit in the budget left is refused and the row samples again. So the output always parses and matches
the grammar, also when max_tokens runs out; a forced close finishes with "length", a value that closed on
its own with "stop".
"""

from __future__ import annotations

import json
from typing import Callable, Protocol

import numpy as np
import torch

from llmlab.errors import LLMLabError

# JSON whitespace between tokens: at most this many characters in a row, so a model cannot pad forever
JSON_WHITESPACE = r"[ \t\n\r]{0,16}"
# characters tried when closing, most closing first; a second order tries brackets before quotes (shorter when
# no string is open: "{}" rather than '{"":""}')
CLOSING_ORDERS = ('"}])>\':,0nft[{' + "aeioulrsc123456789xyzbdghjkmpqvwAEIOULRSC-. ",
                  '}])>"' + ':,0nft[{' + "aeioulrsc123456789")
MAX_CLOSING_CHARS = 256


class Constraint(Protocol):
    """What the sampler needs from a constraint; one instance per generated sequence."""

    finished: bool  # nothing may follow: the sequence ends here
    forced: bool  # the closing was forced by the token budget (finish reason "length")

    def allowed(self, remaining: int) -> torch.Tensor:
        """(V,) bool: the tokens that may come next, when `remaining` tokens (this one included) may still come."""

    def accept(self, token: int, remaining: int) -> bool:
        """Advance over a sampled token; False (and no change) if it leaves no way to finish within the budget."""

    def fallback(self) -> int:
        """A token accept() always takes: the first of the shortest known closing."""


class TokenVocab:
    """The tokenizer as llguidance sees it, built once per tokenizer (about a second for a 49k vocabulary)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ll = None
        self.size = tokenizer.vocab_size
        self.char_ids = {}  # closing characters that are one token each

    @property
    def ll(self):
        if self._ll is None:
            import llguidance

            backend = getattr(self.tokenizer, "backend", None)
            if backend is None or not hasattr(backend, "to_str"):
                raise LLMLabError("constrained decoding needs a Hugging Face `tokenizers` tokenizer")
            stops = sorted(getattr(self.tokenizer, "stop_token_ids", ()) or ())
            self._ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.size, eos_token=stops or None)
            for ch in dict.fromkeys("".join(CLOSING_ORDERS)):
                ids = self.tokenizer.encode(ch)
                if len(ids) == 1:
                    self.char_ids[ch] = ids[0]
        return self._ll


def compile_schema(schema: dict | None) -> str:
    """The llguidance grammar for a JSON schema (None: any JSON object, as response_format json_object asks)."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise LLMLabError("the JSON schema must be an object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
    except ValueError as e:
        raise LLMLabError(f"bad JSON schema: {e}") from None
    return _checked(grammar, "JSON schema")


def compile_grammar(kind: str, text: str) -> str:
    """The llguidance grammar for kind "regex" (Rust regex syntax) or "lark" (Lark EBNF, llguidance's dialect)."""
    import llguidance

    if kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(text)
    elif kind == "lark":
        grammar = llguidance.LLMatcher.grammar_from_lark(text)
    else:
        raise LLMLabError(f"unknown grammar kind {kind!r} (regex, lark)")
    return _checked(grammar, kind)


def _checked(grammar: str, what: str) -> str:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        message = messages[0].splitlines()[0] if messages else "invalid"
        if message.startswith("Unimplemented keys: "):  # 'Unimplemented keys: ["uniqueItems"]'
            keys = json.loads(message[len("Unimplemented keys: "):])
            raise LLMLabError(f"the {what} uses '{keys[0]}', which constrained decoding does not support")
        raise LLMLabError(f"the {what} cannot be used for constrained decoding: {message}")
    return grammar


class GrammarConstraint:
    """One sequence's constraint: an llguidance matcher plus the budget-aware closing described above."""

    def __init__(self, grammar: str, vocab: TokenVocab):
        import llguidance

        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise LLMLabError(f"constrained decoding: {self.matcher.get_error().splitlines()[0]}")
        self.bits = torch.zeros(1, (vocab.size + 31) // 32, dtype=torch.int32)
        self.plan = self._closing()  # token ids that finish the value from here (None: none found)
        self.forced = False

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def min_tokens(self) -> int:
        """Tokens the shortest closing takes from the start (what max_tokens must at least allow)."""
        if self.plan is None:
            raise LLMLabError("constrained decoding: no short output satisfies this grammar")
        return max(1, len(self.plan))

    def allowed(self, remaining: int) -> torch.Tensor:
        if self.forced or (self.plan is not None and len(self.plan) >= remaining and self.plan):
            self.forced = True
            mask = torch.zeros(self.vocab.size, dtype=torch.bool)
            mask[self.plan[0]] = True
            return mask
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bits)
        if self.matcher.is_error():
            raise LLMLabError(f"constrained decoding: {self.matcher.get_error().splitlines()[0]}")
        # 32 tokens per little-endian int32 word, lowest bit first; numpy's unpackbits takes ~5 us where the
        # equivalent torch shifts took milliseconds when intra-op threads compete on a busy machine
        bits = np.unpackbits(self.bits.numpy().view(np.uint8), bitorder="little")[:self.vocab.size]
        return torch.from_numpy(bits.view(np.bool_))

    def accept(self, token: int, remaining: int) -> bool:
        tail = self.plan[1:] if self.plan and token == self.plan[0] else None  # still a valid closing after it
        if self.forced:
            if tail is None:
                raise LLMLabError("constrained decoding: a token outside the forced closing was chosen")
            self._consume(token)
            self.plan = tail
            return True
        self._consume(token)
        plan = self._closing()
        if tail is not None and (plan is None or len(tail) < len(plan)):
            plan = tail
        if plan is not None and len(plan) > remaining - 1:
            self.matcher.rollback(1)
            return False
        self.plan = plan
        return True

    def fallback(self) -> int:
        if not self.plan:
            raise LLMLabError("constrained decoding: no token continues the output within the token budget")
        return self.plan[0]

    def _consume(self, token: int):
        if not self.matcher.consume_token(token):
            raise LLMLabError(f"constrained decoding: token {token} was refused: "
                              f"{self.matcher.get_error().splitlines()[0]}")

    def _closing(self) -> list[int] | None:
        """Token ids that complete the value from here: the shorter of two greedy searches, re-encoded."""
        if self.matcher.is_accepting():
            return []
        best = None
        for order in CLOSING_ORDERS:
            ids = self._greedy_closing(order, MAX_CLOSING_CHARS if best is None else len(best) - 1)
            if ids is not None and (best is None or len(ids) < len(best)):
                best = ids
        if best is None:
            return None
        shorter = self.vocab.tokenizer.encode(self.vocab.tokenizer.decode(best))  # whole words, not characters;
        if len(shorter) < len(best) and self.matcher.validate_tokens(shorter) == len(shorter):  # checked, since
            best = shorter  # a tokenization may cut where the grammar cannot
        return best

    def _greedy_closing(self, order: str, limit: int) -> list[int] | None:
        """Walk a copy of the matcher to an accepting state: forced tokens first, then the first character of
        `order` it accepts, else the lowest allowed token id (single bytes in byte-level vocabularies)."""
        matcher, out = self.matcher.deep_copy(), []
        char_ids = self.vocab.char_ids
        while len(out) < limit:
            if matcher.is_accepting():
                return out
            ids = matcher.compute_ff_tokens()
            if not ids:
                ids = [next((t for ch in order if (t := char_ids.get(ch)) is not None
                             and matcher.validate_tokens([t]) == 1), None)]
            if ids[0] is None:
                ids = [self._lowest_allowed(matcher)]
            if ids[0] is None or not matcher.consume_tokens(ids):
                return None
            out += ids
        return None

    def _lowest_allowed(self, matcher) -> int | None:
        from llguidance.torch import fill_next_token_bitmask

        bits = torch.zeros_like(self.bits)
        fill_next_token_bitmask(matcher, bits)
        allowed = np.flatnonzero(np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:self.vocab.size])
        allowed = [t for t in allowed[:64].tolist() if not self.vocab.ll.is_special_token(t)]
        return allowed[0] if allowed else None


def grammar_constraint_factory(vocab: TokenVocab, grammar: str, budget: int) -> Callable[[], GrammarConstraint]:
    """A factory of fresh constraints for one request; refuses a budget too small for the shortest output."""
    needed = GrammarConstraint(grammar, vocab).min_tokens()
    if budget < needed:
        raise LLMLabError(f"max_tokens is {budget}, but the shortest output this format allows takes {needed} tokens")
    return lambda: GrammarConstraint(grammar, vocab)


def json_constraint_factory(vocab: TokenVocab, schema: dict | None, budget: int) -> Callable[[], GrammarConstraint]:
    """Constraints that make the output one JSON value matching `schema` (None: any JSON object) in `budget` tokens."""
    return grammar_constraint_factory(vocab, compile_schema(schema), budget)

