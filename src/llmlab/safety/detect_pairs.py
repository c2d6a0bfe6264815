"""Human vs machine text pairs that need no download: stdlib docstring paragraphs and the model's continuations
of the same openings, cut to the same length in tokens."""

from __future__ import annotations

from llmlab.client import GenParams, LocalClient
from llmlab.data.pystdlib import iter_stdlib_documents
from llmlab.errors import LLMLabError


def _prose(paragraph: str) -> bool:
    """Running English, not code, doctests or tables: most lines start with a letter and few are indented."""
    lines = paragraph.splitlines()
    wordy = sum(1 for l in lines if l[:1].isalpha())
    return len(lines) >= 2 and wordy >= 0.8 * len(lines) and ">>>" not in paragraph and "::" not in paragraph


def stdlib_paragraphs(tokenizer, n: int, min_tokens: int) -> list[str]:
    """Prose paragraphs of at least min_tokens tokens from the stdlib's docstrings (sorted by file, so the same
    n every run), at most two per module so that no single module dominates."""
    out = []
    for doc in iter_stdlib_documents(sources=False, docstrings=True):
        taken = 0
        for para in doc.text.split("\n\n"):
            if taken < 2 and _prose(para) and len(tokenizer.encode(para)) >= min_tokens:
                out.append(" ".join(para.split()))  # docstrings wrap at ~72 columns; the model would not
                taken += 1
            if len(out) == n:
                return out
    raise LLMLabError(f"only {len(out)} stdlib paragraphs of {min_tokens}+ tokens were found, {n} were asked for")


def make_pairs(llm, n: int, opening_tokens: int = 32, max_tokens: int = 64, temperature: float | None = None,
               seed: int = 0) -> list[dict]:
    """n pairs {opening, human, machine}: human is the paragraph's own next tokens, machine the model's raw-text
    continuation of the opening (sampled with the model's defaults unless temperature is given); both are cut
    to the shorter of the two in tokens, so length never tells them apart."""
    tok = llm.tokenizer
    paras = stdlib_paragraphs(tok, n, opening_tokens + max_tokens)
    openings = [tok.decode(tok.encode(p)[:opening_tokens]) for p in paras]
    client = LocalClient(llm)
    gens = client.generate(openings, GenParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
                           chat=False)
    pairs = []
    for para, opening, gen in zip(paras, openings, gens):
        machine_ids = tok.encode(gen.text)
        human_ids = tok.encode(para)[opening_tokens:]
        m = min(len(machine_ids), len(human_ids))
        if m < 8:
            continue  # the model stopped at once: nothing to compare
        pairs.append({"opening": opening, "human": opening + tok.decode(human_ids[:m]),
                      "machine": opening + tok.decode(machine_ids[:m]), "continuation_tokens": m})
    return pairs
