"""Read documents from local files (.txt, .md, .jsonl, .html), one at a time, and write JSONL atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from llmlab.errors import LLMLabError

SUFFIXES = (".txt", ".md", ".jsonl", ".html", ".htm")


@dataclass
class Document:
    text: str
    source: str  # "path" or "path:line", so a report can point back at the input


@dataclass
class IngestStats:
    """What went wrong while reading, when the caller asked to skip bad input instead of stopping."""

    bad_lines: int = 0
    unreadable_files: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(message)


def iter_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Every input file; directories are walked (sorted, so the order is reproducible) for known suffixes."""
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.lower().endswith(SUFFIXES) and not name.startswith("."):
                        yield Path(root) / name
        elif p.is_file():
            if not p.name.lower().endswith(SUFFIXES):
                raise LLMLabError(f"{p}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            yield p
        else:
            raise LLMLabError(f"{p}: no such file or directory")


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: drop script/style, turn block elements into line breaks."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "header", "footer", "nav", "pre", "blockquote", "hr", "title", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).split("\n")]
    return "\n".join(line for line in lines if line)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LLMLabError(f"cannot read {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LLMLabError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: Path, text_field: str, skip_bad: bool, stats: IngestStats) -> Iterator[Document]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise LLMLabError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise LLMLabError(f"cannot read {path}: not UTF-8 text after line {lineno}") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                problem = "is not valid JSON"
            else:
                if not isinstance(record, dict) or text_field not in record:
                    problem = f"has no {text_field!r} field"
                elif not isinstance(record[text_field], str):
                    problem = f"field {text_field!r} is not a string"
            if problem:
                message = f"{path}:{lineno}: line {problem}"
                if not skip_bad:
                    raise LLMLabError(message + " (use --skip-bad / skip_bad=True to skip such lines)")
                stats.bad_lines += 1
                stats.note(message)
                continue
            yield Document(record[text_field], f"{path}:{lineno}")


def read_documents(inputs: Iterable[str | Path] | str | Path, text_field: str = "text", skip_bad: bool = False,
                   stats: IngestStats | None = None) -> Iterator[Document]:
    """Stream documents from files and directory trees: a .txt/.md/.html file is one document, a .jsonl line is one."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    stats = stats if stats is not None else IngestStats()
    for path in iter_files(inputs):
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from _read_jsonl(path, text_field, skip_bad, stats)
                continue
            text = _read_text(path)
        except LLMLabError as e:
            if not skip_bad:
                raise
            stats.unreadable_files += 1
            stats.note(str(e))
            continue
        if suffix in (".html", ".htm"):
            text = html_to_text(text)
        yield Document(text, str(path))


class JsonlWriter:
    """Write records as JSON lines to a temp file beside `path`; it replaces `path` only when closed without error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            Path(self.tmp).unlink(missing_ok=True)
        return False


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Stream records to `path` atomically; returns how many were written."""
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
    return w.count
