"""Incremental detokenization with OpenAI `stop` sequences."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    """Turns token ids into text deltas; stops at the first stop sequence, which is never emitted.

    The whole answer is decoded each time because a byte-level token may be half a character;
    a trailing replacement character, and any tail that could be the start of a stop sequence,
    are held back until the next token settles them.
    """

    def __init__(self, tokenizer: Decoder, stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
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
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._emit(cut)
        self.text = text
        return self._emit(len(text) - self._held_back(text))

    def finish(self) -> str:
        """What was held back, once the answer is complete."""
        if self.stopped:
            return ""
        self.text = self._tokenizer.decode(self._ids)
        return self._emit(len(self.text))

    def _held_back(self, text: str) -> int:
        return max((n for s in self._stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._sent)
        delta = self.text[self._sent:upto]
        self._sent = upto
        return delta

    @property
    def completion_tokens(self) -> int:
        return len(self._ids)
