"""Exact deduplication by content hash and near-duplicate removal by MinHash LSH (datasketch)."""

from __future__ import annotations

import hashlib

from llmlab.errors import LLMLabError


def normalize_for_dedup(text: str) -> str:
    # case and spacing differences do not make a document new
    return " ".join(text.lower().split())


class ExactDedup:
    """Remembers a 16-byte hash per document seen: a few tens of bytes of memory per document."""

    def __init__(self):
        self.seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True if an identical (after normalization) text was seen; otherwise remember this one."""
        h = hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=16).digest()
        if h in self.seen:
            return True
        self.seen.add(h)
        return False


class NearDedup:
    """Drops a document whose estimated Jaccard similarity to an earlier kept one exceeds `threshold`.

    Documents are sets of character 5-grams (of the normalized text): changing a few words in a page leaves
    most 5-grams intact, while two different pages share few. The LSH index keeps only band hashes per
    document, not the signatures, so a candidate is not re-verified (a small false-positive rate, by design).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        from datasketch import MinHashLSH  # imported here: it pulls in scipy, ~1 s that other commands need not pay

        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        try:
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError as e:  # e.g. a threshold so close to 1 that LSH needs fewer than 2 bands
            raise LLMLabError(f"near-dedup threshold {threshold}: {e} (use a value in (0, 0.98])") from None
        self.n = 0

    def minhash(self, text: str):
        from datasketch import MinHash

        t = normalize_for_dedup(text)
        data = t.encode("utf-8")
        k = self.ngram
        shingles = {data[i:i + k] for i in range(max(1, len(data) - k + 1))}
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(sorted(shingles))
        return m

    def check(self, text: str, key: str) -> str | None:
        """The key of an earlier near-duplicate, or None (and this document is added to the index)."""
        m = self.minhash(text)
        hits = self.lsh.query(m)
        if hits:
            return min(hits)
        self.lsh.insert(key, m)
        self.n += 1
        return None
