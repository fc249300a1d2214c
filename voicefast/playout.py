"""Playout bookkeeping for one response (pure): how far ahead of the listener the server is and how much
audio the listener has heard (which text that audio spoke is audio.speech_out.SpeechOutput's map)."""

from __future__ import annotations

from dataclasses import dataclass


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
