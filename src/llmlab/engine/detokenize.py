"""Token ids in, text out, one token at a time: whole UTF-8 characters only, cut before the first stop string."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder makes of bytes that do not (yet) form a whole character


class IncrementalText:
    """The text of a growing list of generated token ids, safe to hand out piece by piece.

    Two things make a token's text not final when it arrives:
    - a byte-level token can end in the middle of a multi-byte character (an emoji is often 4 tokens); its
      decode then ends in U+FFFD, so it is held back until a later token completes the character;
    - the end of the text may be the start of a stop string ("<|" of "<|user|>"), which must not be
      streamed before we know whether the stop string follows.

    Decoding only a short window (from the last character boundary) keeps each step O(1) instead of
    re-decoding everything, while still letting the tokenizer see whole tokens (as vLLM does).
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.window_start = 0  # ids[window_start:read_end] decode to text we have already taken in
        self.read_end = 0
        self.text = ""  # every whole character so far, cut before a stop string once one appears
        self.stopped = False  # a stop string appeared
        self.sent = 0  # how much of text take() has handed out

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._absorb(self._new_text(final=False))

    def close(self) -> None:
        """No more tokens: take in whatever is held back, even an incomplete character (as U+FFFD)."""
        self._absorb(self._new_text(final=True))

    def take(self, final: bool = False) -> str:
        """Text not handed out yet that no later token can change. final: everything left."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._stop_prefix_len()
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def _new_text(self, final: bool) -> str:
        seen = self.tokenizer.decode(self.ids[self.window_start:self.read_end])
        now = self.tokenizer.decode(self.ids[self.window_start:])
        if len(now) <= len(seen) or (now.endswith(REPLACEMENT) and not final):
            return ""  # nothing new, or a character still incomplete: wait for the next token
        self.window_start, self.read_end = self.read_end, len(self.ids)
        return now[len(seen):]

    def _absorb(self, delta: str) -> None:
        if not delta or self.stopped:
            return
        # a stop string that appears now must end inside delta, so only the tail needs searching
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += delta
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of text that is the start of a stop string."""
        for n in range(min(len(self.text), self.longest_stop - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
