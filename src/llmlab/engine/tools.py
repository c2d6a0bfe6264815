"""Tool calling: the generic tool format, the grammar a tool call is decoded under, and parsing calls back out.

The format is Hermes/Qwen's, used for every checkpoint (SmolLM2's chat template has no tool format of its own):
the tools are described in the system message as JSON inside <tools></tools>, and the model answers a call as

    <tool_call>
    {"name": "add", "arguments": {"a": 2, "b": 3}}
    </tool_call>

(several blocks, one per line, when parallel calls are allowed). An assistant message that made calls is
rendered back in the same form, and a `tool` message becomes a user turn holding <tool_response>...</tool_response>.

Decoding is constrained by one Lark grammar (llguidance) built from the request's tools: each call's name is one
of the tools and its arguments are decoded under that tool's JSON schema, so they always parse and validate.
tool_choice "auto" is the grammar's alternative between plain text (which may not contain "<tool_call>") and
calls; "required" allows only calls; a named function allows exactly one call of it; "none" adds no grammar and
does not describe the tools. This module knows nothing of HTTP: bad input raises LLMLabError. The server
(serve/routes_chat.py) and the in-process client (client/local.py, `chat_tools`) both decode calls through it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from llmlab.engine.constraint import GrammarConstraint, TokenVocab, compile_grammar
from llmlab.errors import LLMLabError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_PARALLEL = 4  # calls per answer when parallel calls are allowed: a small model would otherwise repeat calls
# the arguments are written compactly with spaces after separators: one canonical form a small model follows easily
ARGUMENT_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# ---- checking the request's tools --------------------------------------------------------------------------------


def check_tools(tools: list[dict]) -> dict[str, dict]:
    """{name: tool} for OpenAI tool definitions ({"type": "function", "function": {name, description, parameters}});
    a bad name, a duplicate or parameters that are not valid JSON Schema raise LLMLabError."""
    import jsonschema

    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") or {}
        name = fn.get("name", "")
        if not NAME.match(name):
            raise LLMLabError(f"tools[{i}].function.name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if name in out:
            raise LLMLabError(f"tools[{i}]: two tools are named {name!r}")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise LLMLabError(f"tools[{i}].function.parameters must be a JSON Schema object")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise LLMLabError(f"tools[{i}].function.parameters is not valid JSON Schema: {e.message}") from None
        out[name] = {"name": name, "description": fn.get("description") or "", "parameters": schema}
    return out


def choose_tools(tools: dict[str, dict], choice) -> tuple[str, dict[str, dict]]:
    """(mode, tools the answer may call) for tool_choice: "none" | "auto" | "required" | {"type": "function",
    "function": {"name": ...}} (mode "required" over that one tool). No tools: "none"."""
    if not tools:
        if choice not in (None, "none"):
            raise LLMLabError("tool_choice needs tools")
        return "none", {}
    if choice is None:
        return "auto", tools
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise LLMLabError(f"tool_choice must be none, auto, required or a named function, not {choice!r}")
        return choice, ({} if choice == "none" else tools)
    name = (choice.get("function") or {}).get("name")
    if name not in tools:
        raise LLMLabError(f"tool_choice names the function {name!r}, which is not among the tools")
    return "named", {name: tools[name]}


# ---- the prompt --------------------------------------------------------------------------------------------------


def tools_prompt(tools: dict[str, dict]) -> str:
    """The system-message text describing the tools and the call format."""
    listed = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools.values())
    return ("# Tools\n\nYou may call one or more functions to help with the user's request. The functions are "
            f"described inside <tools></tools>:\n<tools>\n{listed}\n</tools>\n\nTo call a function, answer with "
            "its name and arguments as JSON inside <tool_call></tool_call> tags:\n"
            f'{OPEN}\n{{"name": <function-name>, "arguments": <arguments-object>}}\n{CLOSE}')


def call_text(name: str, arguments: str | dict) -> str:
    """One call in the format the model writes (arguments: the JSON text or an object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise LLMLabError(f"the arguments of a call to {name!r} are not valid JSON: {arguments[:80]!r}") from None
    return f'{OPEN}\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n{CLOSE}'


def render_messages(messages: list[dict], tools: dict[str, dict]) -> list[dict]:
    """Messages with OpenAI tool fields as plain-text messages any chat template renders: the tools' description
    joins the system message, an assistant's tool_calls become <tool_call> blocks, a tool result a user turn."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [call_text(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if out and role == "user" and m["role"] == "tool" and out[-1].get("tool_turn"):
            out[-1]["content"] += "\n" + content  # the results of parallel calls share one user turn
            continue
        out.append({"role": role, "content": content, **({"tool_turn": True} if m["role"] == "tool" else {})})
    out = [{"role": x["role"], "content": x["content"]} for x in out]
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_prompt(tools)}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out


# ---- the grammar -------------------------------------------------------------------------------------------------


def decoding_schema(schema: dict) -> dict:
    """The schema arguments are decoded under: an object's undeclared properties are left out (a function takes only
    the parameters it declares, as OpenAI's strict mode), and the canonical argument style is set."""
    schema = dict(schema)
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    schema["x-guidance"] = ARGUMENT_STYLE
    return schema


def tool_grammar(mode: str, tools: dict[str, dict], parallel: bool = True) -> str | None:
    """The Lark grammar (llguidance dialect) for an answer under tool_choice `mode`; None for "none"."""
    if mode == "none" or not tools:
        return None
    calls = "call"
    if parallel and mode != "named":
        for _ in range(MAX_PARALLEL - 1):  # call ("\n" call ("\n" call)?)?: at most MAX_PARALLEL calls
            calls = f'call ("\\n" {calls})?' if calls != "call" else 'call ("\\n" call)?'
    lines = [f"start: {'TEXT | calls' if mode == 'auto' else 'calls'}", f"calls: {calls}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools.values()):
        head = json.dumps(f'{OPEN}\n{{"name": "{tool["name"]}", "arguments": ')
        tail = json.dumps(f"}}\n{CLOSE}")
        lines.append(f"call_{i}: {head} args_{i} {tail}")
        lines.append(f"args_{i}: %json {json.dumps(decoding_schema(tool['parameters']))}")
    # plain text that never contains the opening tag, so every call goes through the rules above
    lines.append(r"TEXT: /(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/")
    try:
        return compile_grammar("lark", "\n".join(lines))
    except LLMLabError as e:
        raise LLMLabError(f"the tools cannot be used for constrained decoding: {e}") from None


class ToolCallConstraint(GrammarConstraint):
    """GrammarConstraint whose budget closings may also use the format's own characters (<, >, /, _, newline),
    so a call cut short by max_tokens is still closed into a complete <tool_call> block."""
    EXTRA = "<>/_\n"

    def _greedy_closing(self, order: str, limit: int):
        return super()._greedy_closing(order + self.EXTRA, limit)


class ToolVocab:
    """A TokenVocab whose closing characters include the tool format's (one token each in the vocabulary)."""

    def __init__(self, vocab: TokenVocab):
        self.base, self.tokenizer, self.size = vocab, vocab.tokenizer, vocab.size
        self.char_ids = dict(vocab.char_ids)

    @property
    def ll(self):
        ll = self.base.ll  # fills base.char_ids on first use
        self.char_ids.update(self.base.char_ids)
        for ch in ToolCallConstraint.EXTRA:
            ids = self.tokenizer.encode(ch)
            if len(ids) == 1:
                self.char_ids.setdefault(ch, ids[0])
        return ll


def tool_constraint_factory(vocab, grammar: str, budget: int):
    """Fresh ToolCallConstraints for one request; refuses a budget too small for the shortest answer."""
    tool_vocab = vocab if isinstance(vocab, ToolVocab) else ToolVocab(vocab)
    needed = ToolCallConstraint(grammar, tool_vocab).min_tokens()
    if budget < needed:
        raise LLMLabError(f"max_tokens is {budget}, but the shortest tool call takes {needed} tokens")
    return lambda: ToolCallConstraint(grammar, tool_vocab)


# ---- reading calls back --------------------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: OpenAI's tool_calls with arguments as JSON text; content is None when
    the answer is only calls. A block that does not parse is left in the content (only unconstrained text has one)."""
    calls, content, pos = [], [], 0
    for m in re.finditer(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), text, re.S):
        try:
            obj = json.loads(m.group(1))
            name, arguments = obj["name"], obj.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        content.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    content.append(text[pos:])
    rest = "".join(content).strip()
    return (rest or None) if calls else text, calls


@dataclass
class ToolCallStream:
    """Turns an answer's text deltas into OpenAI stream deltas: content pieces, then for each call a first delta
    with its id and name and argument pieces as they are generated. Only for constrained answers, whose calls
    have exactly the form call_text writes."""
    buffer: str = ""
    in_call: bool = False
    head_sent: bool = False
    calls: int = 0
    call_ids: list[str] = field(default_factory=list)

    HEAD = re.compile(r'^\s*' + re.escape(OPEN) + r'\n\{"name": "([A-Za-z0-9_-]+)", "arguments": ')
    TAIL = "}\n" + CLOSE

    def feed(self, piece: str) -> list[dict]:
        self.buffer += piece
        out = []
        while True:
            if not self.in_call:
                at = self.buffer.find(OPEN)
                if at < 0:  # hold back what may be the start of an opening tag
                    keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self.buffer.endswith(OPEN[:k])), 0)
                    text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    if text and not self.calls:
                        out.append({"content": text})
                    return out
                if at and not self.calls:
                    out.append({"content": self.buffer[:at]})
                self.buffer, self.in_call, self.head_sent = self.buffer[at:], True, False
            if not self.head_sent:
                m = self.HEAD.match(self.buffer)
                if not m:
                    return out
                self.call_ids.append(new_call_id())
                out.append({"tool_calls": [{"index": self.calls, "id": self.call_ids[-1], "type": "function",
                                            "function": {"name": m.group(1), "arguments": ""}}]})
                self.buffer, self.head_sent = self.buffer[m.end():], True
            end = self.buffer.find(self.TAIL)
            if end < 0:  # arguments so far, holding back what may be the start of the tail
                keep = next((k for k in range(len(self.TAIL) - 1, 0, -1) if self.buffer.endswith(self.TAIL[:k])), 0)
                args = self.buffer[:len(self.buffer) - keep]
                if args:
                    out.append(self._args(args))
                self.buffer = self.buffer[len(args):]
                return out
            if end:
                out.append(self._args(self.buffer[:end]))
            self.buffer, self.in_call, self.calls = self.buffer[end + len(self.TAIL):], False, self.calls + 1

    def flush(self) -> list[dict]:
        """What is held back when the answer ends (text that only looked like the start of a tag)."""
        text, self.buffer = self.buffer, ""
        return [{"content": text}] if text and not self.in_call and not self.calls else []

    def _args(self, text: str) -> dict:
        return {"tool_calls": [{"index": self.calls, "function": {"arguments": text}}]}
