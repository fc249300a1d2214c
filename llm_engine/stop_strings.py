"""Stop strings on streamed text: hold back any tail that could start a stop string, cut at the first match
(the stop string itself is never emitted), so matches spanning several deltas are found (pure Python)."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]):
        if not stops or any(not s for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        self.stops = stops
        self._buf = ""  # everything pushed so far
        self._emitted = 0  # chars of _buf already returned
        self.matched: str | None = None

    @property
    def text(self) -> str:
        """The visible text so far: up to the match once matched, else everything emitted."""
        return self._buf[:self._emitted]

    def push(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Feed new text; returns (text safe to emit now, matched). After a match nothing more is emitted."""
        if self.matched is not None:
            return "", True
        self._buf += delta
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self._emitted - longest + 1)
        cut = None
        for s in self.stops:
            i = self._buf.find(s, search_from)
            if i != -1 and (cut is None or i < cut):
                cut, self.matched = i, s
        if cut is not None:
            out = self._buf[self._emitted:cut]
            self._emitted = cut
            return out, True
        end = len(self._buf)
        if not final:  # hold back a tail that is a prefix of some stop string
            for k in range(min(longest - 1, end - self._emitted), 0, -1):
                tail = self._buf[end - k:]
                if any(s.startswith(tail) for s in self.stops):
                    end -= k
                    break
        out = self._buf[self._emitted:end]
        self._emitted = end
        return out, False
