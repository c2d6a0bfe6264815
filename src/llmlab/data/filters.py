"""Document quality filters (Gopher-style rules, a blocklist, a quality score); each returns a reason code or None."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from llmlab.errors import LLMLabError

# Rules and default thresholds follow Rae et al. 2021 ("Scaling Language Models: Methods, Analysis & Insights from
# Training Gopher", appendix A), which were tuned on web text in English. Code and tables fail several of them.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
TOP_NGRAM_MAX_CHAR_FRACTION = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX_CHAR_FRACTION = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "-", "*", "–", "—")


@dataclass
class FilterConfig:
    min_words: int = 50
    max_words: int = 100_000
    max_symbol_word_ratio: float = 0.1  # '#' and ellipses per word
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    max_dup_line_fraction: float = 0.30
    max_dup_line_char_fraction: float = 0.20
    max_dup_para_fraction: float = 0.30
    max_dup_para_char_fraction: float = 0.20
    top_ngram_max_char_fraction: dict[int, float] = field(default_factory=lambda: dict(TOP_NGRAM_MAX_CHAR_FRACTION))
    dup_ngram_max_char_fraction: dict[int, float] = field(default_factory=lambda: dict(DUP_NGRAM_MAX_CHAR_FRACTION))
    min_quality: float = 0.5
    blocklist: str | Path | None = None  # None = the small list shipped with llmlab; "" = no blocklist


# ----------------------------------------------------------------------------- helpers

def _words(text: str) -> list[str]:
    return text.split()


def _norm_words(words: list[str]) -> list[str]:
    # for repetition statistics: "The" and "the," are the same word
    out = [w.lower().strip(".,;:!?\"'()[]{}") for w in words]
    return [w for w in out if w]


# ----------------------------------------------------------------------------- rules

def check_length(words: list[str], cfg: FilterConfig):
    if len(words) < cfg.min_words:
        return "too_short", f"{len(words)} words < {cfg.min_words}"
    if len(words) > cfg.max_words:
        return "too_long", f"{len(words)} words > {cfg.max_words}"
    return None


def check_symbols(text: str, words: list[str], cfg: FilterConfig):
    n = max(1, len(words))
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_ratio", f"{symbols} '#'/ellipsis for {len(words)} words"
    lines = [l for l in text.split("\n") if l.strip()]
    if lines:
        bullets = sum(l.lstrip().startswith(BULLETS) for l in lines)
        if bullets / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines", f"{bullets}/{len(lines)} lines start with a bullet"
        ellipsis = sum(l.rstrip().endswith(("...", "…")) for l in lines)
        if ellipsis / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines", f"{ellipsis}/{len(lines)} lines end with an ellipsis"
    return None


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """Fraction of items that repeat an earlier one, and the fraction of characters in those repeats."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for it in items:
        if it in seen:
            dup_items += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup_items / len(items), dup_chars / max(1, sum(len(it) for it in items))


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters covered by the single most frequent n-gram, as a fraction of all word characters."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(1, sum(len(w) for w in words))


def dup_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of words inside n-grams that repeat an earlier n-gram, as a fraction of all word characters."""
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in seen:
            for j in range(i, i + n):
                covered[j] = True
        else:
            seen.add(g)
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, total)


def check_repetition(text: str, words: list[str], cfg: FilterConfig):
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    frac, chars = _dup_fractions(lines)
    if frac > cfg.max_dup_line_fraction:
        return "dup_lines", f"{frac:.0%} of lines are repeats"
    if chars > cfg.max_dup_line_char_fraction:
        return "dup_line_chars", f"{chars:.0%} of line characters are in repeated lines"
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, chars = _dup_fractions(paras)
    if frac > cfg.max_dup_para_fraction:
        return "dup_paragraphs", f"{frac:.0%} of paragraphs are repeats"
    if chars > cfg.max_dup_para_char_fraction:
        return "dup_paragraph_chars", f"{chars:.0%} of paragraph characters are in repeated paragraphs"
    nw = _norm_words(words)
    for n, limit in sorted(cfg.top_ngram_max_char_fraction.items()):
        f = top_ngram_char_fraction(nw, n)
        if f > limit:
            return "top_ngram", f"most common {n}-gram covers {f:.0%} of characters (> {limit:.0%})"
    for n, limit in sorted(cfg.dup_ngram_max_char_fraction.items()):
        f = dup_ngram_char_fraction(nw, n)
        if f > limit:
            return "dup_ngram", f"repeated {n}-grams cover {f:.0%} of characters (> {limit:.0%})"
    return None


def quality_score(words: list[str]) -> tuple[float, str]:
    """A score in [0, 1]: the product of three signals that each are 1 for ordinary prose.

    alphabetic: fraction of words with a letter, full marks at >= 80% (Gopher);
    word length: mean word length inside [3, 10] characters (Gopher), falling off linearly outside;
    stop words: at least two distinct English stop words (Gopher), half marks for one.
    """
    if not words:
        return 0.0, "no words"
    alpha = sum(any(c.isalpha() for c in w) for w in words) / len(words)
    alpha_score = min(1.0, alpha / 0.8)
    mean_len = sum(len(w) for w in words) / len(words)
    if mean_len < 3:
        len_score = max(0.0, mean_len / 3)
    elif mean_len > 10:
        len_score = max(0.0, 1 - (mean_len - 10) / 10)
    else:
        len_score = 1.0
    stops = len(STOP_WORDS & {w.lower().strip(".,;:!?\"'") for w in words})
    stop_score = min(1.0, stops / 2)
    score = alpha_score * len_score * stop_score
    return score, f"score {score:.2f} (alphabetic words {alpha:.0%}, mean word length {mean_len:.1f}, stop words {stops})"


def check_quality(words: list[str], cfg: FilterConfig):
    score, detail = quality_score(words)
    if score < cfg.min_quality:
        return "low_quality", detail
    return None


# ----------------------------------------------------------------------------- blocklist

class Blocklist:
    """Whole-word, case-insensitive match of any listed term (single words or phrases)."""

    def __init__(self, terms: list[str]):
        self.terms = [t.strip().lower() for t in terms if t.strip() and not t.strip().startswith("#")]
        if self.terms:
            alts = "|".join(re.escape(t) for t in sorted(self.terms, key=len, reverse=True))
            self.pattern = re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)
        else:
            self.pattern = None

    @classmethod
    def load(cls, path: str | Path | None) -> "Blocklist":
        if path is None:
            text = resources.files("llmlab.data").joinpath("blocklist.txt").read_text(encoding="utf-8")
        elif str(path) == "":
            return cls([])
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise LLMLabError(f"cannot read blocklist {path}: {getattr(e, 'strerror', None) or e}") from None
        return cls(text.splitlines())

    def find(self, text: str) -> str | None:
        if self.pattern is None:
            return None
        m = self.pattern.search(text)
        return m.group(0) if m else None


def check_blocklist(text: str, blocklist: Blocklist):
    hit = blocklist.find(text)
    if hit is not None:
        return "blocklist", f"contains blocked term {hit!r}"
    return None


def check_document(text: str, cfg: FilterConfig, blocklist: Blocklist) -> tuple[str, str] | None:
    """(reason, detail) for the first rule the document fails, cheapest rules first; None if it passes all."""
    words = _words(text)
    return (check_length(words, cfg)
            or check_blocklist(text, blocklist)
            or check_symbols(text, words, cfg)
            or check_repetition(text, words, cfg)
            or check_quality(words, cfg))
