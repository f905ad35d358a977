"""Incremental detokenization with OpenAI `stop` sequences."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def _failure(s: str) -> list[int]:
    """KMP's failure function: fail[i] is the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class _Stop:
    def __init__(self, s: str):
        self.s = s
        self._fail = _failure(s)

    def partial_at_end(self, text: str) -> int:
        """The longest n < len(s) such that text ends with s[:n]: one pass over text's last len(s) - 1
        characters (the naive endswith for every n is quadratic in the stop's length, on every token)."""
        s, fail, k = self.s, self._fail, 0
        for c in text[max(0, len(text) - len(s) + 1):] if len(s) > 1 else "":
            while k and c != s[k]:
                k = fail[k - 1]
            if c == s[k]:
                k += 1
        return k


class TextStream:
    """Turns token ids into text deltas; stops at the first stop sequence, which is never emitted.

    The whole answer is decoded each time because a byte-level token may be half a character;
    a trailing replacement character, and any tail that could be the start of a stop sequence,
    are held back until the next token settles them. Emitted text is free of stop sequences, so
    each token searches only what follows it: the work per token is linear in the stops' length.
    """

    def __init__(self, tokenizer: Decoder, stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = [_Stop(s) for s in stop if s]
        self._longest = max((len(s.s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._sent = 0  # characters of the text already emitted
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The new text this token makes safe to emit; sets `stopped` when a stop sequence appears."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids).rstrip("\ufffd")
        # A re-decode may settle a character just before what was sent: search a stop's length back.
        start = max(0, self._sent - self._longest)
        cut = min((i for i in (text.find(s.s, start) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._emit(cut)
        self.text = text
        return self._emit(len(text) - max((s.partial_at_end(text) for s in self._stop), default=0))

    def finish(self) -> str:
        """What was held back, once the answer is complete."""
        if self.stopped:
            return ""
        self.text = self._tokenizer.decode(self._ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._sent)
        delta = self.text[self._sent:upto]
        self._sent = upto
        return delta

    @property
    def completion_tokens(self) -> int:
        return len(self._ids)
