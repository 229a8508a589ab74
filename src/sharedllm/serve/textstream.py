"""Generated tokens -> text, piece by piece, with stop strings applied on the decoded text.

`TextTail.push(token)` returns the text that is now final: it holds back a trailing incomplete multi-byte
character (the decoder shows it as U+FFFD until its last byte arrives) and any tail that could still become a
stop string. A stop string ends the text just before its first occurrence, on a character boundary, never
inside a character. The pieces joined are the final text.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextTail:
    def __init__(self, decode, stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.text: str | None = None  # the final text once a stop string matched

    def push(self, token: int) -> tuple[str, bool]:
        """(newly final text, whether a stop string matched)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith(REPLACEMENT):  # maybe a character still missing bytes: neither match nor hand it out
            text = text.rstrip(REPLACEMENT)
        hit = self._first_stop(text)
        if hit is not None:
            self.text = text[:hit]
            return self._emit(self.text, len(self.text)), True
        return self._emit(text, len(text) - self._partial_stop(text)), False

    def finish(self) -> str:
        """The rest of the text once the row ends (an incomplete character at the very end is shown as U+FFFD)."""
        text = self.text if self.text is not None else self.decode(self.ids)
        self.text = text
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = text[self.sent: upto], upto
        return piece

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
