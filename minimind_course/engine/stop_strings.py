"""Stop strings on streamed text: cut the output at the first match, and never stream the start of one.

While the text ends with something that could still grow into a stop string ("\\nUs" for "\\nUser:"),
that tail is held back; it is released once it can no longer match, or at the end.
"""

from __future__ import annotations

from collections.abc import Iterable


def held_suffix_len(text: str, needles: Iterable[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``needles``."""
    best = 0
    for needle in needles:
        for size in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:size]):
                best = size
                break
    return best


class StopStringMatcher:
    """Feed text pieces; get back what is safe to emit, and whether a stop string ended the output."""

    def __init__(self, stop: Iterable[str]):
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # all text so far, cut at the stop string once one matched
        self.emitted = 0  # how much of self.text has been handed out
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the output (Anthropic's ``stop_sequence``)

    def push(self, piece: str) -> str:
        """Add newly decoded text; return the part that can be emitted now."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        # the stop string that is complete first wins (as when checking token by token), whatever the pieces
        hits = [(i + len(s), i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            _, cut, self.matched = min(hits)
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - held_suffix_len(self.text, self.stop))

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
