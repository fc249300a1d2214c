"""Sample-accurate speech boundaries for the VAD: Silero judges whole 32 ms windows and reacts a window or
two late at a soft onset ("I need...", "How...") and after the last syllable. BoundaryRefiner keeps the
energy of the last few windows in 8 ms blocks and a running noise floor, and moves a boundary to where the
energy actually rises above (or falls to) the floor. Pure bookkeeping: no model, no I/O."""

from __future__ import annotations

from collections import deque

import numpy as np

BLOCK_SAMPLES = 128  # 8 ms at 16 kHz


def block_rms(window: np.ndarray) -> np.ndarray:
    """[n] samples -> [n // BLOCK_SAMPLES] RMS per 8 ms block."""
    n = len(window) // BLOCK_SAMPLES * BLOCK_SAMPLES
    return np.sqrt(np.mean(window[:n].reshape(-1, BLOCK_SAMPLES).astype(np.float64) ** 2, axis=1))


class BoundaryRefiner:
    def __init__(self, window_samples: int, *, lookback_windows: int = 6, end_lookback_windows: int = 4,
                 floor_factor: float = 2.0, end_floor_factor: float = 4.0, min_rms: float = 3e-3,
                 min_prob: float = 0.02):
        self.window_samples = window_samples
        self.lookback_windows = lookback_windows  # how far an onset may move back
        # How far an end may move back, and how loud speech must be there: Silero's last speech windows often
        # run past the speech, but a low bar in noise mistakes a soft final syllable for silence (measured on
        # Piper + espeak sentences at 10-20 dB SNR), so the end uses a stricter threshold.
        self.end_lookback_windows = end_lookback_windows
        self.end_floor_factor = end_floor_factor
        self.floor_factor = floor_factor  # speech is louder than floor_factor x the noise floor ...
        self.min_rms = min_rms  # ... and louder than this (-50 dBFS), whatever the floor
        self.min_prob = min_prob  # a look-back window needs at least this much model evidence
        self._hist: deque[tuple[int, float, np.ndarray]] = deque(maxlen=lookback_windows + 8)
        self.noise_floor: float | None = None  # running RMS of the quietest block of quiet windows

    def observe(self, start: int, prob: float, rms: np.ndarray, quiet: bool) -> None:
        self._hist.append((start, prob, rms))
        if quiet and len(rms):
            m = float(np.min(rms))
            self.noise_floor = m if self.noise_floor is None else 0.9 * self.noise_floor + 0.1 * m

    @property
    def threshold(self) -> float:
        return max(self.min_rms, self.floor_factor * (self.noise_floor or 0.0))

    @property
    def end_threshold(self) -> float:
        return max(self.min_rms, self.end_floor_factor * (self.noise_floor or 0.0))

    def _blocks(self, lo: int, hi: int) -> list[tuple[int, float, float]]:
        """(block start, rms, window prob) of the remembered blocks in [lo, hi)."""
        out = []
        for start, prob, rms in self._hist:
            for k, r in enumerate(rms):
                b = start + k * BLOCK_SAMPLES
                if lo <= b < hi:
                    out.append((b, float(r), prob))
        return out

    def refine_onset(self, onset: int) -> int:
        """Onset = start of the run of loud blocks that leads into the first speech window."""
        thr = self.threshold
        blocks = self._blocks(onset - self.lookback_windows * self.window_samples, onset + self.window_samples)
        first = next((i for i, (b, r, _) in enumerate(blocks) if b >= onset and r >= thr), None)
        if first is None:
            return onset
        i = first
        while (i > 0 and blocks[i - 1][1] >= thr and blocks[i - 1][0] + BLOCK_SAMPLES == blocks[i][0]
               and (blocks[i - 1][0] >= onset or blocks[i - 1][2] >= self.min_prob)):
            i -= 1
        return blocks[i][0]

    def refine_end(self, end: int) -> int:
        """End of speech = end of the last loud block before `end` (at most end_lookback_windows back)."""
        thr = self.end_threshold
        blocks = self._blocks(end - self.end_lookback_windows * self.window_samples, end)
        j = len(blocks)
        while j > 0 and blocks[j - 1][1] < thr:
            j -= 1
        if j == 0 or j == len(blocks):  # all quiet (too low to tell from noise) or loud to the end: keep
            return end
        return blocks[j - 1][0] + BLOCK_SAMPLES
