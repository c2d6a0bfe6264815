"""Documents into chunks for retrieval: token windows with overlap, or Markdown headings and paragraphs.

Every chunk keeps its document id, source path and the character offsets of its text in the document, so an
answer can cite exactly where a passage came from. A chunk's id is `DOC_ID:START-END`: the same content gives
the same ids on every run, and an id says where to look.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from llmlab.errors import LLMLabError

CHUNK_MODES = ("structure", "tokens")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass
class Document:
    doc_id: str
    source: str  # the file it came from
    text: str


@dataclass
class Chunk:
    doc_id: str
    source: str
    start: int  # character offsets of `text` in the document: document.text[start:end] == text
    end: int
    text: str
    heading: str = ""  # the Markdown heading path above the chunk ("Install > Linux"), if any

    @property
    def chunk_id(self) -> str:
        return f"{self.doc_id}:{self.start}-{self.end}"

    @property
    def indexed_text(self) -> str:
        """What is embedded and searched: the heading path gives a paragraph the context it lacks."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


# Token offsets: a function from text to the (start, end) character span of every token.
TokenSpans = Callable[[str], list[tuple[int, int]]]


def whitespace_spans(text: str) -> list[tuple[int, int]]:
    """Word spans: a tokenizer-free stand-in (tests, BM25-only indexes)."""
    return [m.span() for m in re.finditer(r"\S+", text)]


def token_windows(text: str, offset: int, spans: TokenSpans, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character ranges of windows of `size` tokens, each starting `size - overlap` tokens after the last."""
    if size < 1 or not 0 <= overlap < size:
        raise LLMLabError(f"chunk size must be >= 1 and overlap in [0, size), got size={size} overlap={overlap}")
    tokens = spans(text)
    if not tokens:
        return []
    out = []
    for first in range(0, len(tokens), size - overlap):
        last = min(first + size, len(tokens)) - 1
        out.append((offset + tokens[first][0], offset + tokens[last][1]))
        if last == len(tokens) - 1:
            break
    return out


def sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each Markdown section; text before the first heading has no heading."""
    bounds, path = [], []
    starts = [(m.start(), len(m.group(1)), m.group(2).strip()) for m in HEADING.finditer(text)]
    previous_end, previous_heading = 0, ""
    for start, level, title in starts:
        bounds.append((previous_end, start, previous_heading))
        path = path[:level - 1] + [""] * max(0, level - 1 - len(path)) + [title]
        previous_heading = " > ".join(p for p in path if p)
        previous_end = text.index("\n", start) + 1 if "\n" in text[start:] else len(text)
    bounds.append((previous_end, len(text), previous_heading))
    return [b for b in bounds if text[b[0]:b[1]].strip()]


def paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Blank-line separated paragraphs of text[start:end], trimmed of surrounding whitespace."""
    out, pos = [], start
    for m in list(PARAGRAPH_BREAK.finditer(text, start, end)) + [None]:
        stop = m.start() if m else end
        piece = text[pos:stop]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            out.append((pos + lead, pos + len(piece.rstrip())))
        pos = m.end() if m else end
    return out


def chunk_document(doc: Document, spans: TokenSpans, mode: str = "structure", size: int = 192,
                   overlap: int = 32) -> list[Chunk]:
    """Chunks of at most `size` tokens. "tokens": sliding windows over the whole text. "structure": Markdown
    sections, and inside them paragraphs merged while they fit; a paragraph too long is cut into windows."""
    if mode not in CHUNK_MODES:
        raise LLMLabError(f"unknown chunking mode {mode!r} (choose from {', '.join(CHUNK_MODES)})")
    if mode == "tokens":
        ranges = [(s, e, "") for s, e in token_windows(doc.text, 0, spans, size, overlap)]
    else:
        ranges = []
        for sec_start, sec_end, heading in sections(doc.text):
            ranges += [(s, e, heading) for s, e in _pack_paragraphs(doc.text, sec_start, sec_end, spans, size, overlap)]
    return [Chunk(doc.doc_id, doc.source, s, e, doc.text[s:e], h) for s, e, h in ranges]


def _pack_paragraphs(text, start, end, spans, size, overlap) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    current, current_tokens = None, 0
    for p_start, p_end in paragraphs(text, start, end):
        n = len(spans(text[p_start:p_end]))
        if n > size:  # a long paragraph: flush what we have, then windows over it
            if current:
                out.append(current)
            out += token_windows(text[p_start:p_end], p_start, spans, size, overlap)
            current, current_tokens = None, 0
        elif current and current_tokens + n <= size:
            current, current_tokens = (current[0], p_end), current_tokens + n
        else:
            if current:
                out.append(current)
            current, current_tokens = (p_start, p_end), n
    if current:
        out.append(current)
    return out
