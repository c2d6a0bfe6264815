"""Reading a corpus for indexing: text and Markdown files (one document each) and JSONL (one per line)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.rag.chunk import Document

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
JSONL_SUFFIXES = {".jsonl"}


def corpus_files(paths: list[str]) -> list[Path]:
    """The files to index: given files as they are, directories walked for text, Markdown and JSONL files."""
    if not paths:
        raise LLMLabError("no documents given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)
                            and not _inside_an_index(f))
        elif p.is_file():
            if p.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES:
                raise LLMLabError(f"{p}: cannot index {p.suffix or 'files without a suffix'} "
                                  "(text: .txt .md .markdown .rst; records: .jsonl)")
            files.append(p)
        else:
            raise LLMLabError(f"no such file or directory: {p}")
    unique = list(dict.fromkeys(Path(os.path.normpath(f)) for f in files))
    return unique


def _inside_an_index(f: Path) -> bool:
    """An llmlab index under a corpus directory is not part of the corpus."""
    return any((d / "manifest.json").is_file() and (d / "chunks.jsonl").is_file() for d in f.parents)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_documents(path: Path) -> list[Document]:
    """A text file is one document whose id is its path; a JSONL line {"text": ..., "id": ...} is one document
    (id defaults to PATH:LINE)."""
    source = str(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LLMLabError(f"{path} is not UTF-8 text") from None
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [Document(source, source, raw)] if raw.strip() else []
    docs = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LLMLabError(f"{path}:{lineno}: each line must be an object with a \"text\" string")
        doc_id = str(record.get("id", f"{source}:{lineno}"))
        if record["text"].strip():
            docs.append(Document(doc_id, source, record["text"]))
    return docs
