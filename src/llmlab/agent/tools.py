"""Tools as plain typed Python functions: the JSON schema comes from the type hints and the docstring; built-ins."""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmlab.errors import LLMLabError

TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    fn: Callable

    def spec(self) -> dict:
        """The OpenAI tool definition."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: dict) -> str:
        """Run with JSON arguments; any error becomes the observation (an agent reads it and may try again)."""
        import jsonschema
        try:
            jsonschema.validate(arguments, self.parameters)
        except jsonschema.ValidationError as e:
            return f"Error: bad arguments for {self.name}: {e.message}"
        try:
            out = self.fn(**arguments)
        except Exception as e:  # noqa: BLE001 - the tool's failure is the agent's observation
            return f"Error: {type(e).__name__}: {e}"
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)


@dataclass
class ToolCall:
    """One call the model asked for: arguments parsed from JSON, or the raw text when they did not parse."""
    name: str
    arguments: dict | str
    call_id: str = ""


def execute(by_name: dict[str, Tool], call: ToolCall) -> str:
    """Run one call; a call the tools cannot take (an unknown name, arguments that are not a JSON object) becomes
    an error observation the model reads, as a tool's own failure does."""
    if call.name not in by_name:
        return f"Error: there is no tool {call.name!r} (tools: {', '.join(by_name)})"
    args = call.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            return f"Error: the arguments of {call.name} are not valid JSON: {args[:200]!r}"
    if not isinstance(args, dict):
        return f"Error: the arguments of {call.name} must be a JSON object, not {json.dumps(args)[:200]}"
    return by_name[call.name](args)


def type_schema(hint) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in TYPES:
        return {"type": TYPES[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin is list:
        return {"type": "array", **({"items": type_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return {"anyOf": [type_schema(a) for a in args]}
    if hint is type(None):
        return {"type": "null"}
    raise LLMLabError(f"a tool parameter of type {hint!r} has no JSON schema (use int, float, str, bool, list, "
                      "dict, Literal or unions of them)")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google-style docstring ("Args:" then "name: text")."""
    doc = inspect.cleandoc(doc or "")
    head, _, args = doc.partition("\nArgs:")
    params, current = {}, None
    for line in args.splitlines():
        m = re.match(r"^\s+(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m:
            current = m.group(1)
            params[current] = m.group(2)
        elif current and line.strip() and line.startswith("        "):
            params[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break  # Returns:, Raises: ...
    return " ".join(head.split()), params


def function_tool(fn: Callable, name: str | None = None) -> Tool:
    """A Tool from a typed function: every parameter needs a type hint; those without defaults are required."""
    description, docs = parse_docstring(fn.__doc__ or "")
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.name not in hints:
            raise LLMLabError(f"tool {fn.__name__}: parameter {p.name!r} needs a type hint")
        properties[p.name] = {**type_schema(hints[p.name]), **({"description": docs[p.name]} if p.name in docs else {})}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return Tool(name or fn.__name__, description or fn.__name__, schema, fn)


# ---- built-in tools ----------------------------------------------------------------------------------------------

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
             ast.UAdd: operator.pos}
FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "sin": math.sin, "cos": math.cos, "abs": abs,
             "round": round, "min": min, "max": max, "pi": math.pi, "e": math.e}


EXPRESSION_TERM = r"(?:[a-z]+\()*\(*(?:-?[0-9]+(?:\.[0-9]+)?|pi|e)\)*"  # 2, (2, sqrt(2, 2.5)), pi
EXPRESSION_OP = r" ?(?:\*\*|//|[-+*/%,]) ?"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. "(12 + 30) * 2" or "sqrt(2)".

    Args:
        expression: numbers, + - * / // % **, parentheses, and sqrt log exp sin cos abs round min max pi e
    """
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ValueError("exponent too large")
            return OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in FUNCTIONS and not callable(FUNCTIONS[node.id]):
            return FUNCTIONS[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and callable(FUNCTIONS.get(node.func.id)):
            return FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not allowed in an expression: {ast.unparse(node)}")
    value = ev(ast.parse(expression, mode="eval"))
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


def python_tool(limits=None) -> Tool:
    def run_python(code: str) -> str:
        """Run Python code in a sandbox (standard library only, no network, no files outside its own directory)
        and return what it prints.

        Args:
            code: the program; print() what you want to see
        """
        from llmlab.agent.sandbox import run_python as sandboxed
        return sandboxed(code, limits).observation()
    return function_tool(run_python)


def workspace_tools(workspace: str | Path) -> list[Tool]:
    """read_file and write_file, confined to `workspace` (a path that leaves it is refused)."""
    root = Path(workspace).resolve()
    root.mkdir(parents=True, exist_ok=True)

    def inside(path: str) -> Path:
        p = (root / path).resolve()
        if p != root and root not in p.parents:
            raise PermissionError(f"{path!r} is outside the workspace")
        return p

    def read_file(path: str) -> str:
        """Read a text file from the workspace.

        Args:
            path: the file's path inside the workspace
        """
        return inside(path).read_text()[:20_000]

    def write_file(path: str, content: str) -> str:
        """Write a text file in the workspace (replacing it).

        Args:
            path: the file's path inside the workspace
            content: the text to write
        """
        from llmlab.io import atomic_write_text
        target = inside(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, content)
        return f"wrote {len(content)} characters to {path}"

    return [function_tool(read_file), function_tool(write_file)]


def search_tool(index: str | Path, k: int = 3, method: str = "bm25", max_chars: int = 600) -> Tool:
    """`search` over a RAG index built by `llmlab rag index` (loaded now: a missing index is refused at once).
    BM25 by default: an agent's queries are names and keywords, and BM25 needs no embedding model."""
    from llmlab.rag.index import METHODS, RagIndex
    if method not in METHODS:
        raise LLMLabError(f"unknown search method {method!r} (choose from {', '.join(METHODS)})")
    rag = RagIndex.load(index)

    def search(query: str) -> str:
        """Search the documents and return the best matching passages, each with its id.

        Args:
            query: names or keywords to look for
        """
        hits = rag.search(query, k=k, method=method)
        if not hits:
            return "no passage matches the query"
        return "\n".join(f"[{h.chunk.chunk_id}] {h.chunk.text[:max_chars]}" for h in hits)
    return function_tool(search)


def builtin_tools(workspace: str | Path | None = None, names: list[str] | None = None,
                  index: str | Path | None = None) -> list[Tool]:
    """calculate and run_python; read_file and write_file with a workspace; search with a RAG index."""
    calc = function_tool(calculate)
    # the expression is constrained to numbers (or functions of them) joined by operators: a small model then writes
    # arithmetic, not prose, and cannot run on with "37 * 43 43 43 ..." (what 4-bit SmolLM2 did under a looser pattern)
    arithmetic = rf"^{EXPRESSION_TERM}(?:{EXPRESSION_OP}{EXPRESSION_TERM})*$"
    calc.parameters["properties"]["expression"].update(pattern=arithmetic, maxLength=80)
    tools = [calc, python_tool()] + (workspace_tools(workspace) if workspace else [])
    tools += [search_tool(index)] if index else []
    if names:
        known = {t.name: t for t in tools}
        unknown = [n for n in names if n not in known]
        needs = {"read_file": "a workspace", "write_file": "a workspace", "search": "an index"}
        if unknown and unknown[0] in needs:
            raise LLMLabError(f"the tool {unknown[0]!r} needs {needs[unknown[0]]} (--workspace DIR / --index IDX)")
        if unknown:
            raise LLMLabError(f"unknown tool {unknown[0]!r} (known: {', '.join(known)})")
        tools = [known[n] for n in names]
    return tools


def as_tools(items: list[Any]) -> list[Tool]:
    return [t if isinstance(t, Tool) else function_tool(t) for t in items]
