"""JSON-constrained decoding: only tokens that keep the output a valid prefix of JSON (matching a schema) may come.

A character-level incremental parser holds the state as an immutable tuple of frames (a pushdown
automaton), so trying a candidate token is cheap: feed its characters to a copy and see if one is refused.
At each step the candidates are taken in order of probability and the first valid ones win; when the token
budget is nearly spent, the shortest valid ending (closing strings, required keys, brackets) is forced, so
the output always parses and validates.

The schema subset: type (one or a list of object/array/string/number/integer/boolean/null), enum, const,
properties, required, additionalProperties, items; annotation keywords are ignored. Objects with
`properties` only get declared keys, each at most once; `}` comes only after every required key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from llmlab.errors import LLMLabError

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "format", "strict",
               "readOnly", "writeOnly", "deprecated"}
SUPPORTED = {"type", "enum", "const", "properties", "required", "additionalProperties", "items"} | ANNOTATIONS
MAX_WHITESPACE = 16  # consecutive whitespace characters allowed (keeps a model from padding forever)
MAX_NUMBER_CHARS = 24
WHITESPACE = " \t\n\r"
FIRST_CANDIDATES = 64  # candidates tried before widening the search to the whole vocabulary
SAMPLE_AMONG = 16  # with temperature > 0: sample among this many valid candidates


@dataclass(frozen=True)
class Node:
    """One compiled schema."""
    types: frozenset | None = None  # None: any type
    enum: tuple | None = None  # JSON texts of the allowed values
    properties: tuple = ()  # ((name, Node), ...)
    restrict_keys: bool = False  # only declared keys
    required: frozenset = frozenset()
    items: "Node | None" = None

    def prop(self, name: str) -> "Node":
        return dict(self.properties).get(name, ANY)


ANY = Node()


def compile_schema(schema: dict | None) -> Node:
    """A Node for a JSON schema (None: any JSON object, as response_format json_object asks)."""
    if schema is None:
        return Node(types=frozenset({"object"}))
    return _compile(schema, "schema")


def _compile(schema, where: str) -> Node:
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise LLMLabError(f"{where} must be a JSON schema object")
    unsupported = set(schema) - SUPPORTED
    if unsupported:
        raise LLMLabError(f"{where} uses '{sorted(unsupported)[0]}', which constrained decoding does not support "
                          f"(supported: {', '.join(sorted(SUPPORTED - ANNOTATIONS))})")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise LLMLabError(f"{where}.type must be one or more of {', '.join(TYPES)}")
        types = frozenset(types)
    enum = None
    if "const" in schema:
        enum = (json.dumps(schema["const"], ensure_ascii=False),)
    elif "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise LLMLabError(f"{where}.enum must be a non-empty list")
        enum = tuple(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    if enum is not None and types is not None:
        def type_ok(text):
            v = json.loads(text)
            kind = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v))
            if kind is None:  # a number
                return "number" in types or ("integer" in types and float(v).is_integer())
            return kind in types
        enum = tuple(t for t in enum if type_ok(t))
        if not enum:
            raise LLMLabError(f"{where}: no enum value has the schema's type")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise LLMLabError(f"{where}.properties must be an object")
    props = tuple((name, _compile(sub, f"{where}.properties.{name}")) for name, sub in properties.items())
    required = schema.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise LLMLabError(f"{where}.required must be a list of property names")
    additional = schema.get("additionalProperties", True)
    if additional not in (True, False):
        raise LLMLabError(f"{where}.additionalProperties must be true or false")
    if additional is False or props:
        missing = [r for r in required if r not in properties]
        if missing:
            raise LLMLabError(f"{where}: required property '{missing[0]}' is not in properties")
    items = _compile(schema["items"], f"{where}.items") if "items" in schema else None
    return Node(types=types, enum=enum, properties=props, restrict_keys=bool(props) or additional is False,
                required=frozenset(required), items=items)


# ---- the incremental parser --------------------------------------------------------------------------------
# A state is (frames, whitespace run). Frames, innermost last:
#   ("V", node)                                expecting a value
#   ("O", node, seen keys, phase, key)         phases: "k0" after {, "col" after a key, "in" in a value,
#                                              "c" after a value, "k" after a comma
#   ("A", node, phase)                         phases: "v0" after [, "in" in a value, "c" after a value
#   ("S", allowed raw texts or None, is_key, raw so far, escape)   escape: 0, 1 after \, 2-5 hex digits left+1
#   ("N", integer only, DFA state, text)
#   ("L", candidate texts, text)               one of a few literal texts (true/false/null, enum values)
#   ("D",)                                     the whole value is done

NUMBER_DFA = {  # state -> [(characters, next state)]
    "start": [("-", "minus"), ("0", "zero"), ("123456789", "int")],
    "minus": [("0", "zero"), ("123456789", "int")],
    "zero": [(".", "dot"), ("eE", "exp")],
    "int": [("0123456789", "int"), (".", "dot"), ("eE", "exp")],
    "dot": [("0123456789", "frac")],
    "frac": [("0123456789", "frac"), ("eE", "exp")],
    "exp": [("+-", "exps"), ("0123456789", "expd")],
    "exps": [("0123456789", "expd")],
    "expd": [("0123456789", "expd")],
}
NUMBER_COMPLETE = {"zero", "int", "frac", "expd"}


def initial_state(node: Node):
    return ((("V", node),), 0)


def _after_value(frames: tuple) -> tuple:
    """frames without the finished value's frame; tell the parent a value ended."""
    if not frames:
        return (("D",),)
    top = frames[-1]
    if top[0] == "O":
        return frames[:-1] + (("O", top[1], top[2] | {top[4]}, "c", None),)
    if top[0] == "A":
        return frames[:-1] + (("A", top[1], "c"),)
    raise AssertionError(top)


def _keys_left(node: Node, seen) -> list[str]:
    return [name for name, _ in node.properties if name not in seen]


def _raw(text: str) -> str:
    """The JSON string body of text (between the quotes)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def feed(state, text: str):
    """The state after text, or None if text cannot continue valid JSON here."""
    for ch in text:
        state = _feed_char(state, ch)
        if state is None:
            return None
    return state


def _feed_char(state, ch: str):
    frames, ws = state
    top = frames[-1]
    kind = top[0]
    if ch in WHITESPACE and kind in "VOAD" and not (kind == "D"):
        return (frames, ws + 1) if ws < MAX_WHITESPACE else None
    rest = frames[:-1]
    if kind == "V":
        node = top[1]
        if node.enum is not None:
            return _feed_char(((*rest, ("L", node.enum, "")), 0), ch)
        allowed = node.types
        ok = (lambda t: allowed is None or t in allowed)
        if ch == "{" and ok("object"):
            return ((*rest, ("O", node, frozenset(), "k0", None)), 0)
        if ch == "[" and ok("array"):
            return ((*rest, ("A", node, "v0")), 0)
        if ch == '"' and ok("string"):
            return ((*rest, ("S", None, False, "", 0)), 0)
        if (ch == "-" or ch.isdigit()) and (ok("number") or ok("integer")):
            number = ("N", not ok("number"), "start", "")
            return _feed_char(((*rest, number), 0), ch)
        if ch in "tf" and ok("boolean"):
            return _feed_char(((*rest, ("L", ("true", "false"), "")), 0), ch)
        if ch == "n" and ok("null"):
            return _feed_char(((*rest, ("L", ("null",), "")), 0), ch)
        return None
    if kind == "O":
        _, node, seen, phase, key = top
        if phase in ("k0", "k") and ch == '"':
            allowed = tuple(_raw(k) for k in _keys_left(node, seen)) if node.restrict_keys else None
            if allowed == ():
                return None
            return ((*frames, ("S", allowed, True, "", 0)), 0)
        if phase in ("k0", "c") and ch == "}" and node.required <= seen:
            return (_after_value(rest), 0)
        if phase == "c" and ch == ",":
            if node.restrict_keys and not _keys_left(node, seen):
                return None
            return ((*rest, ("O", node, seen, "k", None)), 0)
        if phase == "col" and ch == ":":
            return ((*rest, ("O", node, seen, "in", key), ("V", node.prop(key) if node.restrict_keys else ANY)), 0)
        return None
    if kind == "A":
        _, node, phase = top
        if phase in ("v0", "c") and ch == "]":
            return (_after_value(rest), 0)
        if phase == "c" and ch == ",":
            return ((*rest, ("A", node, "in"), ("V", node.items or ANY)), 0)
        if phase == "v0":
            return _feed_char(((*rest, ("A", node, "in"), ("V", node.items or ANY)), 0), ch)
        return None
    if kind == "S":
        _, allowed, is_key, raw, escape = top
        if escape == 0 and ch == '"':
            if allowed is not None and raw not in allowed:
                return None
            if is_key:
                parent = rest[-1]
                return ((*rest[:-1], ("O", parent[1], parent[2], "col", json.loads(f'"{raw}"'))), 0)
            return (_after_value(rest), 0)
        if escape == 0:
            if ch == "\\":
                escape = 1
            elif ord(ch) < 0x20:
                return None
        elif escape == 1:
            if ch == "u":
                escape = 5
            elif ch in '"\\/bfnrt':
                escape = 0
            else:
                return None
        else:
            if ch not in "0123456789abcdefABCDEF":
                return None
            escape = 0 if escape == 2 else escape - 1
        raw += ch
        if allowed is not None and not any(a.startswith(raw) for a in allowed):
            return None
        return ((*rest, ("S", allowed, is_key, raw, escape)), 0)
    if kind == "N":
        _, integer, dfa, text = top
        for chars, nxt in NUMBER_DFA[dfa]:
            if ch in chars and not (integer and ch in ".eE") and len(text) < MAX_NUMBER_CHARS:
                return ((*rest, ("N", integer, nxt, text + ch)), 0)
        if dfa in NUMBER_COMPLETE:  # the number ended: the character belongs to the parent
            return _feed_char((_after_value(rest), 0), ch)
        return None
    if kind == "L":
        _, candidates, text = top
        longer = text + ch
        if any(c.startswith(longer) for c in candidates):
            if longer in candidates and not any(c != longer and c.startswith(longer) for c in candidates):
                return (_after_value(rest), 0)  # nothing can extend it: done now
            return ((*rest, ("L", candidates, longer)), 0)
        if text in candidates:
            return _feed_char((_after_value(rest), 0), ch)
        return None
    return None  # "D": nothing may follow


def is_complete(state) -> bool:
    """The output is a whole JSON value (a bare number at the top level is whole once it is a number)."""
    frames = state[0]
    if frames[-1][0] == "D":
        return True
    if len(frames) == 1:
        top = frames[0]
        return (top[0] == "N" and top[2] in NUMBER_COMPLETE) or (top[0] == "L" and top[2] in top[1])
    return False


def _minimal_start(node: Node) -> str:
    if node.enum is not None:
        return min(node.enum, key=len)
    types = node.types or {"null"}
    for t, text in (("null", "null"), ("integer", "0"), ("number", "0"), ("boolean", "false"), ("string", '""'),
                    ("array", "["), ("object", "{")):
        if t in types:
            return text
    raise AssertionError(types)


def closing_text(state) -> str:
    """The shortest-ish text that completes the JSON value from this state."""
    out = []
    for _ in range(10_000):
        frames = state[0]
        top = frames[-1]
        kind = top[0]
        if kind == "D" or (len(frames) == 1 and is_complete(state)):
            return "".join(out)
        if kind == "V":
            piece = _minimal_start(top[1])
        elif kind == "O":
            _, node, seen, phase, key = top
            if phase == "col":
                piece = ":"
            else:
                missing = sorted(node.required - seen)
                left = missing or (_keys_left(node, seen) if phase == "k" and node.restrict_keys else [])
                if phase == "k":
                    piece = f'"{_raw(left[0])}"' if left else '"k"'
                elif missing:
                    piece = ("," if phase == "c" else "") + f'"{_raw(missing[0])}"'
                else:
                    piece = "}"
        elif kind == "A":
            piece = "]"
        elif kind == "S":
            _, allowed, _, raw, escape = top
            piece = "0" * (escape - 1) if escape >= 2 else ("n" if escape == 1 else "")
            if allowed is not None:
                piece += min((a for a in allowed if a.startswith(raw)), key=len)[len(raw):]
            piece += '"'
        elif kind == "N":
            if top[2] in NUMBER_COMPLETE:  # end the number by hand: the parent decides what follows
                state = (_after_value(frames[:-1]), 0)
                continue
            piece = "0"
        else:  # "L"
            _, candidates, text = top
            if text in candidates:
                state = (_after_value(frames[:-1]), 0)
                continue
            piece = min((c for c in candidates if c.startswith(text)), key=len)[len(text):]
        new = feed(state, piece)
        assert new is not None, (state, piece)
        state = new
        out.append(piece)
    raise AssertionError("closing_text did not terminate")


# ---- decoding -------------------------------------------------------------------------------------------


class TokenVocab:
    """Each token's text, or None for tokens never allowed in JSON output (special tokens, partial characters)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts = None

    @property
    def texts(self) -> list[str | None]:
        if self._texts is None:
            backend = self.tokenizer.backend
            added = set(backend.get_added_tokens_decoder()) if hasattr(backend, "get_added_tokens_decoder") else set()
            texts = []
            for i in range(self.tokenizer.vocab_size):
                t = self.tokenizer.decode([i])
                texts.append(None if i in added or not t or "\ufffd" in t else t)
            self._texts = texts
        return self._texts


@dataclass
class JsonConstraint:
    """The batcher's per-sequence constraint: choose() a token, advance() with it, stop when finished."""
    node: Node
    vocab: TokenVocab
    state: tuple = None
    forced_left: int = 0  # forced closing tokens still to be advanced over
    was_forced: bool = False
    _tried: dict = field(default_factory=dict)  # token -> state after it, from the last choose()

    def __post_init__(self):
        self.state = initial_state(self.node)

    @property
    def finished(self) -> bool:
        return self.forced_left == 0 and is_complete(self.state)

    def min_tokens(self) -> int:
        return len(self.vocab.tokenizer.encode(closing_text(self.state))) + 1

    def forced_tokens(self, remaining: int) -> list[int] | None:
        """The closing tokens when the budget leaves no room for more, else None."""
        text = closing_text(self.state)
        if remaining > len(text) + 1:  # a token has at least one character: surely room
            return None
        ids = self.vocab.tokenizer.encode(text)
        if remaining > len(ids) + 1:
            return None
        self.state = feed(self.state, text)
        self.forced_left = len(ids)
        self.was_forced = True
        return ids

    def choose(self, logits: torch.Tensor, params, generator) -> int:
        """The most likely valid token (temperature 0), or a draw among the most likely valid ones."""
        logits = logits[0].float()
        texts = self.vocab.texts
        self._tried = {}
        order = logits.topk(FIRST_CANDIDATES).indices.tolist()
        valid = self._valid(order, texts, need=1 if params.temperature == 0 else SAMPLE_AMONG)
        if not valid:
            order = logits.argsort(descending=True).tolist()
            valid = self._valid(order, texts, need=1)
        if not valid:  # cannot happen while single-character tokens exist; close the value instead
            text = closing_text(self.state)
            raise LLMLabError(f"no token continues the JSON output (expected something like {text[:10]!r})")
        if params.temperature == 0 or len(valid) == 1:
            return valid[0]
        scores = logits[valid] / params.temperature
        probs = scores.softmax(-1)
        if params.top_p < 1:  # nucleus over the valid candidates
            keep = (probs.cumsum(-1) - probs) < params.top_p
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        return valid[int(torch.multinomial(probs, 1, generator=generator))]

    def _valid(self, order, texts, need: int) -> list[int]:
        valid = []
        for token in order:
            text = texts[token]
            if text is None:
                continue
            new = feed(self.state, text)
            if new is not None:
                self._tried[token] = new
                valid.append(token)
                if len(valid) >= need:
                    break
        return valid

    def advance(self, token: int):
        if self.forced_left:
            self.forced_left -= 1
            return
        new = self._tried.get(token)
        if new is None:
            new = feed(self.state, self.vocab.texts[token] or "")
        if new is None:
            raise LLMLabError("a token outside the JSON constraint was chosen")
        self.state = new
