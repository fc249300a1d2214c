"""Playout bookkeeping for one response (pure): how far ahead of the listener the server is, how much
audio the listener has heard, and which part of the text that audio spoke."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(slots=True)
class PlayoutClock:
    """Assumes the client plays audio as it arrives, at real time, without gaps except underruns.
    `lead_ms`: how far ahead of the playout the server may send (the jitter margin)."""

    lead_ms: float = 300.0
    sent_ms: float = 0.0
    _play_end_s: float | None = None  # wall time at which the client will have played all sent audio

    def wait_s(self, now_s: float) -> float:
        """Seconds to wait before the next frame may be sent so the lead stays <= lead_ms."""
        if self._play_end_s is None:
            return 0.0
        return max(0.0, (self._play_end_s - now_s) - self.lead_ms / 1000.0)

    def sent(self, dur_ms: float, now_s: float) -> None:
        start = now_s if self._play_end_s is None else max(self._play_end_s, now_s)
        self._play_end_s = start + dur_ms / 1000.0
        self.sent_ms += dur_ms

    def played_ms(self, now_s: float) -> float:
        """Audio the client has played by now (sent minus what is still buffered there)."""
        if self._play_end_s is None:
            return 0.0
        return max(0.0, self.sent_ms - max(0.0, self._play_end_s - now_s) * 1000.0)


@dataclass(slots=True)
class SpokenTextMap:
    """audio ms -> text offset: phrase k spans audio [a_k, b_k) ms and text [s_k, e_k); within a phrase the
    offset grows in proportion to the audio, then snaps back to a word boundary (never cuts mid-word)."""

    _audio_end_ms: list[float] = field(default_factory=list)
    _spans: list[tuple[float, float, int, int]] = field(default_factory=list)

    def add(self, audio_start_ms: float, audio_end_ms: float, text_start: int, text_end: int) -> None:
        self._audio_end_ms.append(audio_end_ms)
        self._spans.append((audio_start_ms, audio_end_ms, text_start, text_end))

    def text_offset_at(self, ms: float, text: str) -> int:
        if not self._spans:
            return 0
        k = bisect.bisect_right(self._audio_end_ms, ms)
        if k >= len(self._spans):
            return self._spans[-1][3]
        a, b, s, e = self._spans[k]
        if ms <= a:
            return s if k == 0 else self._spans[k - 1][3]
        cut = s + int((e - s) * (ms - a) / max(b - a, 1e-6))
        while cut > s and cut < len(text) and not text[cut].isspace() and not text[cut - 1].isspace():
            cut -= 1
        return cut
