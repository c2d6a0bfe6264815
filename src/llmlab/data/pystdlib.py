"""A corpus that needs no download: the source files and docstrings of the running Python's standard library."""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from llmlab.data.ingest import Document, write_jsonl
from llmlab.errors import LLMLabError

# test suites are large, repetitive and full of deliberately odd code; site-packages is not the stdlib
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(tree: ast.AST, module: str) -> list[str]:
    out = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append(f"{module}\n\n{doc}")

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                d = ast.get_docstring(child, clean=True)
                if d:
                    out.append(f"{name}\n\n{d}")
                visit(child, name)

    visit(tree, module)
    return out


def iter_stdlib_documents(sources: bool = True, docstrings: bool = True, root: str | Path | None = None
                          ) -> Iterator[Document]:
    """For each stdlib .py file (sorted): its source as one document, then all its docstrings as another."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise LLMLabError(f"Python standard library not found at {root}")
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a few stdlib files are deliberately in other encodings; they are not worth the trouble
            if not text.strip():
                continue
            if sources:
                yield Document(text, f"stdlib:{rel}")
            if docstrings:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                        tree = ast.parse(text)
                except (SyntaxError, ValueError):
                    continue
                module = rel[:-3].replace("/", ".").removesuffix(".__init__")
                docs = _docstrings(tree, module)
                if docs:
                    yield Document("\n\n".join(docs), f"stdlib-doc:{rel}")


def write_pystdlib(out: str | Path, sources: bool = True, docstrings: bool = True, root: str | Path | None = None
                   ) -> int:
    """Write the stdlib corpus as JSONL {"text", "source"} atomically; returns the number of documents."""
    docs = iter_stdlib_documents(sources, docstrings, root)
    return write_jsonl(out, ({"text": d.text, "source": d.source} for d in docs))
