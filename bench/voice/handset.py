"""A phone's playback as Twilio's bidirectional Media Streams present it (pure; time passed in): `media` plays in
order at real time from when it arrives (after whatever is queued), a `mark` is echoed once the audio queued
before it has played, and `clear` drops the queued audio and echoes every pending mark at once."""

from __future__ import annotations

import base64
from collections import deque

ULAW_RATE_HZ = 8000


class Handset:
    def __init__(self) -> None:
        self._play_end_s: float | None = None  # when the queued audio will have played
        self._pending: deque[tuple[float, str]] = deque()  # (due time, mark name), in order
        self.received_ms = 0.0  # audio received since the call began
        self.cleared_ms = 0.0  # audio dropped by clears

    def media(self, payload_b64: str, now_s: float) -> int:
        """Queue one media payload; returns its byte count (= samples)."""
        n = len(base64.b64decode(payload_b64))
        start = now_s if self._play_end_s is None else max(self._play_end_s, now_s)
        self._play_end_s = start + n / ULAW_RATE_HZ
        self.received_ms += n * 1000 / ULAW_RATE_HZ
        return n

    def mark(self, name: str, now_s: float) -> None:
        due = now_s if self._play_end_s is None else max(self._play_end_s, now_s)
        self._pending.append((due, name))

    def clear(self, now_s: float) -> list[str]:
        """Drop what is queued; the pending marks are echoed now (returned in order)."""
        if self._play_end_s is not None and self._play_end_s > now_s:
            self.cleared_ms += (self._play_end_s - now_s) * 1000
        self._play_end_s = now_s
        names = [n for _, n in self._pending]
        self._pending.clear()
        return names

    def due(self, now_s: float) -> list[str]:
        """Marks whose audio has played by `now_s` (to echo, in order)."""
        out = []
        while self._pending and self._pending[0][0] <= now_s:
            out.append(self._pending.popleft()[1])
        return out

    def next_due_s(self) -> float | None:
        return self._pending[0][0] if self._pending else None

    def playing_until_s(self) -> float | None:
        return self._play_end_s

    def on_frame(self, msg: dict, now_s: float) -> list[str]:
        """Apply one server frame (media / mark / clear); returns marks to echo right away (a clear's)."""
        ev = msg.get("event")
        if ev == "media":
            self.media(msg["media"]["payload"], now_s)
        elif ev == "mark":
            self.mark(msg["mark"]["name"], now_s)
        elif ev == "clear":
            return self.clear(now_s)
        return []
