"""The corpus pipeline: normalize text, drop boilerplate lines, filter, deduplicate, write JSONL and a report."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.data.dedup import ExactDedup, NearDedup
from llmlab.data.filters import Blocklist, FilterConfig, check_document
from llmlab.data.ingest import Document, IngestStats, JsonlWriter, read_documents
from llmlab.data.report import CleanReport
from llmlab.errors import LLMLabError

# ----------------------------------------------------------------------------- text normalization

# Spaces other than ' ' (no-break, thin, ideographic, ...) become ' '; tabs are kept (they can be meaningful).
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\x0b\x0c\u2028\u2029\x85]")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")


def _keep_char(c: str) -> bool:
    if c in "\n\t":
        return True
    # Cc: control characters; Cf: invisible format characters (zero-width space/joiner, BOM, soft hyphen,
    # bidi overrides); Co/Cn: private-use and unassigned code points; U+FFFD marks an earlier decoding error.
    if c == "\ufffd":
        return False
    cat = unicodedata.category(c)
    return not (cat in ("Cc", "Co", "Cn", "Cs") or (cat == "Cf" and c not in "\u200d"))


def clean_text(text: str, form: str = "NFC") -> str:
    """Unicode-normalize, remove control/invisible symbols and tidy whitespace (indentation is kept)."""
    if form:
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ODD_SPACES.sub(lambda m: "\n" if m.group(0) in "\u2028\u2029\x85" else " ", text)
    if not text.isascii() or any(ord(c) < 32 and c not in "\n\t" for c in text):
        text = "".join(c for c in text if _keep_char(c))
    lines = [_INNER_SPACES.sub(" ", line.rstrip()) for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


# ----------------------------------------------------------------------------- boilerplate lines

def _line_key(line: str) -> bytes:
    return hashlib.blake2b(line.strip().lower().encode("utf-8"), digest_size=8).digest()


class LineCounter:
    """In how many documents each short line occurs, in bounded memory.

    Only lines up to `max_line_chars` count (headers, footers, navigation and cookie notices are short), each
    once per document, keyed by an 8-byte hash. When more than `max_entries` distinct lines are tracked, the
    ones seen in a single document are forgotten: a line that is boilerplate keeps coming back, so its count is
    only slightly underestimated, while memory stays bounded however large the corpus.
    """

    def __init__(self, max_line_chars: int = 200, max_entries: int = 2_000_000):
        self.max_line_chars, self.max_entries = max_line_chars, max_entries
        self.counts: Counter[bytes] = Counter()
        self.docs = 0

    def add(self, text: str) -> None:
        self.docs += 1
        keys = {_line_key(l) for l in text.split("\n") if l.strip() and len(l) <= self.max_line_chars}
        self.counts.update(keys)
        if len(self.counts) > self.max_entries:
            self.counts = Counter({k: c for k, c in self.counts.items() if c > 1})

    def boilerplate(self, min_docs: int, min_fraction: float) -> set[bytes]:
        need = max(min_docs, int(min_fraction * self.docs))
        return {k for k, c in self.counts.items() if c >= need}


def drop_lines(text: str, boilerplate: set[bytes], max_line_chars: int) -> tuple[str, int]:
    kept, dropped = [], 0
    for line in text.split("\n"):
        if line.strip() and len(line) <= max_line_chars and _line_key(line) in boilerplate:
            dropped += 1
        else:
            kept.append(line)
    if not dropped:
        return text, 0
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n"), dropped


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class CleanConfig:
    text_field: str = "text"
    skip_bad: bool = False
    normalization: str = "NFC"  # or "NFKC" (also folds compatibility forms: ligatures, full-width letters)
    boilerplate: bool = True
    boilerplate_min_docs: int = 3  # a line is boilerplate if it occurs in at least this many documents
    boilerplate_min_fraction: float = 0.01  # ... and in at least this fraction of all documents
    boilerplate_max_line_chars: int = 200
    filters: FilterConfig = field(default_factory=FilterConfig)
    exact_dedup: bool = True
    near_dedup: bool = True
    dedup_threshold: float = 0.8  # estimated Jaccard similarity of character 5-grams
    max_examples: int = 3


def clean_documents(inputs, config: CleanConfig | None = None, report: CleanReport | None = None) -> Iterator[Document]:
    """Stream cleaned, filtered, deduplicated documents; counts go into `report` as the stream is consumed."""
    cfg = config or CleanConfig()
    report = report if report is not None else CleanReport(max_examples=cfg.max_examples)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    blocklist = Blocklist.load(cfg.filters.blocklist)

    boilerplate: set[bytes] = set()
    if cfg.boilerplate:
        # Boilerplate needs counts across documents, so this is two passes over the input: a cheap first pass
        # counts (hashes of) short lines per document in bounded memory, the second pass drops the frequent ones.
        counter = LineCounter(cfg.boilerplate_max_line_chars)
        for doc in read_documents(inputs, cfg.text_field, skip_bad=cfg.skip_bad):
            counter.add(clean_text(doc.text, cfg.normalization))
        boilerplate = counter.boilerplate(cfg.boilerplate_min_docs, cfg.boilerplate_min_fraction)

    exact = ExactDedup() if cfg.exact_dedup else None
    near = NearDedup(cfg.dedup_threshold) if cfg.near_dedup else None
    stats = IngestStats()
    for doc in read_documents(inputs, cfg.text_field, skip_bad=cfg.skip_bad, stats=stats):
        report.add_in(doc.text)
        text = clean_text(doc.text, cfg.normalization)
        if boilerplate:
            text, n = drop_lines(text, boilerplate, cfg.boilerplate_max_line_chars)
            report.boilerplate_lines_dropped += n
        failed = check_document(text, cfg.filters, blocklist)
        if failed is None and exact is not None and exact.is_duplicate(text):
            failed = ("exact_duplicate", "same text as an earlier document")
        if failed is None and near is not None:
            match = near.check(text, doc.source)
            if match is not None:
                failed = ("near_duplicate", f"similar to {match}")
        if failed is not None:
            report.add_removed(failed[0], text, doc.source, failed[1])
            continue
        report.add_kept(text)
        yield Document(text, doc.source)
    report.bad_lines_skipped = stats.bad_lines
    report.unreadable_files_skipped = stats.unreadable_files
    report.bad_input_examples = stats.examples


def clean_corpus(inputs: Iterable[str | Path] | str | Path, out: str | Path, config: CleanConfig | None = None,
                 report_dir: str | Path | None = None) -> CleanReport:
    """Clean `inputs` (files and directories) into JSONL `{"text": ...}` at `out`, written atomically."""
    cfg = config or CleanConfig()
    report = CleanReport(max_examples=cfg.max_examples)
    with JsonlWriter(out) as w:
        for doc in clean_documents(inputs, cfg, report):
            w.write({"text": doc.text})
        if report_dir is not None:
            report.write(report_dir)
        if report.docs_in == 0:
            raise LLMLabError("empty corpus: no documents found in the input (nothing written)")
        if report.docs_kept == 0:
            top = ", ".join(f"{k} {v['docs']}" for k, v in report.to_dict()["removed"].items())
            raise LLMLabError(f"all {report.docs_in} documents were removed ({top}); nothing written")
    return report
