"""A session's 16 kHz input audio, addressed by absolute sample offsets since the session began (the clock
of audio_start_ms / audio_end_ms), with the wall time each chunk arrived (the anchor of the latency timings).
Pure bookkeeping: only the window the session still needs is kept."""

from __future__ import annotations

import time
from collections import deque

import numpy as np


class InputBuffer:
    def __init__(self, max_arrivals: int = 4096):
        self._chunks: list[np.ndarray] = []  # [n] float32 pieces; together samples [start, end)
        self.start = 0  # absolute sample of the first kept sample
        self.end = 0  # absolute samples received so far
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=max_arrivals)  # (chunk end sample, monotonic s)

    @property
    def samples(self) -> int:
        return self.end - self.start

    def append(self, x16: np.ndarray, now_s: float) -> None:
        self._chunks.append(x16)
        self.end += len(x16)
        self._arrivals.append((self.end, now_s))

    def arrival_time(self, sample: int) -> float:
        """When the chunk holding `sample` arrived (now, if that is no longer known)."""
        for end, t in self._arrivals:
            if end >= sample:
                return t
        return time.monotonic()

    def slice(self, start: int, end: int | None = None) -> np.ndarray:
        """Kept samples in [start, end) (clipped to what is kept)."""
        x = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        if len(self._chunks) > 1:
            self._chunks = [x]
        a = min(len(x), max(0, start - self.start))
        b = len(x) if end is None else min(len(x), max(a, end - self.start))
        return x[a:b]

    def trim(self, keep_from: int) -> None:
        """Forget samples before `keep_from`."""
        cut = min(self.samples, max(0, keep_from - self.start))
        if cut:
            x = self.slice(self.start)
            self._chunks = [x[cut:]] if cut < len(x) else []
            self.start += cut

    def clear(self) -> None:
        self.trim(self.end)
        self._arrivals.clear()
