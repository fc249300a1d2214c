"""Stateful streaming resampler: polyphase windowed-sinc (Kaiser), numpy only.

Output sample n sits at input time n * in_rate / out_rate and is a zero-phase (centred) filter over the
input around that time, so nothing is shifted in time. `process()` emits every output sample whose input
neighbourhood has arrived (a fixed lag of `half_taps` input samples); `flush()` zero-pads the end and emits
the rest, so after flush the total output is exactly ceil(total_in * out_rate / in_rate), and chunked output
equals whole-signal output (same arithmetic, whatever the chunking)."""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import numpy as np

ZERO_CROSSINGS = 16  # sinc lobes each side (at the narrower of the two rates)
KAISER_BETA = 8.6
ROLLOFF = 0.92  # cutoff as a fraction of the lower Nyquist frequency
EMIT_BLOCK = 4096  # output samples computed per vectorised step (gathered path)
STRIDED_MAX_UP = 8  # ratios with up <= this use one strided view per polyphase class


@lru_cache(maxsize=32)
def _filter_bank(up: int, down: int) -> tuple[np.ndarray, int]:
    """Polyphase table [up, 2*half] (float64) and half, for output phase p = (n*down) % up."""
    scale = min(1.0, up / down)  # < 1 when downsampling: widen the kernel, lower the cutoff
    half = int(np.ceil(ZERO_CROSSINGS / scale))
    k = np.arange(-half + 1, half + 1)  # [2*half] input offsets relative to floor(t)
    frac = np.arange(up)[:, None] / up  # [up, 1] fractional part of t
    t = k[None, :] - frac  # [up, 2*half] distance (input samples) from tap to output time
    fc = ROLLOFF * scale
    h = fc * np.sinc(fc * t)
    w = np.clip(1.0 - (t / half) ** 2, 0.0, None)
    h *= np.i0(KAISER_BETA * np.sqrt(w)) / np.i0(KAISER_BETA)
    h /= h.sum(axis=1, keepdims=True)  # unit DC gain for every phase
    return h, half


class StreamResampler:
    """Resample one stream of float32 mono audio from in_rate_hz to out_rate_hz, chunk by chunk."""

    def __init__(self, in_rate_hz: int, out_rate_hz: int):
        if in_rate_hz <= 0 or out_rate_hz <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate_hz} -> {out_rate_hz}")
        self.in_rate_hz = int(in_rate_hz)
        self.out_rate_hz = int(out_rate_hz)
        g = gcd(self.in_rate_hz, self.out_rate_hz)
        self.up, self.down = self.out_rate_hz // g, self.in_rate_hz // g
        self._passthrough = self.up == self.down
        if not self._passthrough:
            self._bank, self.half_taps = _filter_bank(self.up, self.down)
        else:
            self._bank, self.half_taps = None, 0
        self._offsets = np.arange(-self.half_taps + 1, self.half_taps + 1)  # [2*half]
        # Input history: _buf[j] is input sample (_buf_start + j); starts with `half` zeros before sample 0.
        self._buf = np.zeros(self.half_taps, np.float64)
        self._buf_start = -self.half_taps
        self._n_in = 0  # input samples received
        self._n_out = 0  # output samples emitted
        self._flushed = False

    @property
    def samples_in(self) -> int:
        return self._n_in

    @property
    def samples_out(self) -> int:
        return self._n_out

    def _emit_until(self, n_end: int) -> np.ndarray:
        if n_end <= self._n_out:
            return np.zeros(0, np.float32)
        y = np.empty(n_end - self._n_out, np.float32)  # [m]
        if self.up <= STRIDED_MAX_UP:
            self._emit_strided(y, n_end)
        else:
            self._emit_gathered(y, n_end)
        self._n_out = n_end
        # Drop history no future output needs (future base >= current base).
        keep_from = (n_end - 1) * self.down // self.up - self.half_taps + 1 - self._buf_start
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._buf_start += keep_from
        return y

    def _emit_strided(self, y: np.ndarray, n_end: int) -> None:
        """Outputs n = n0 + k*up share one polyphase row and step `down` input samples apart, so each of the `up`
        residue classes is one strided window view times one filter row: no index arrays, one BLAS call per
        class (up is 2 or 3 for the 8/16/24 kHz conversions of the audio path)."""
        n_out, up, down, half = self._n_out, self.up, self.down, self.half_taps
        buf = self._buf
        step = buf.strides[0]
        for r in range(up):
            n0 = n_out + (r - n_out) % up  # first output of this class
            if n0 >= n_end:
                continue
            count = (n_end - 1 - n0) // up + 1
            t0 = n0 * down
            start = t0 // up - self._buf_start - half + 1  # buf index of the class's first tap
            if start < 0 or start + (count - 1) * down + 2 * half > len(buf):  # a strided view is not bounds-checked
                raise AssertionError("resampler history does not cover the outputs asked for")
            view = np.ndarray((count, 2 * half), buf.dtype, buf, start * step, (down * step, step))  # [count, 2*half]
            y[n0 - n_out::up] = view @ self._bank[t0 % up]

    def _emit_gathered(self, y: np.ndarray, n_end: int) -> None:
        """Any ratio (e.g. 22050 -> 24000, up = 160): gather taps per output, in blocks of EMIT_BLOCK."""
        for a in range(self._n_out, n_end, EMIT_BLOCK):
            n = np.arange(a, min(a + EMIT_BLOCK, n_end), dtype=np.int64)  # [b]
            t = n * self.down
            base, phase = t // self.up, t % self.up  # [b] floor(input time), polyphase index
            idx = (base - self._buf_start)[:, None] + self._offsets[None, :]  # [b, 2*half]
            y[a - self._n_out:a - self._n_out + len(n)] = np.einsum("ij,ij->i", self._buf[idx], self._bank[phase])

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed input samples; returns the output samples that are now complete (may be empty)."""
        if self._flushed:
            raise RuntimeError("StreamResampler.process() after flush(); make a new resampler per stream")
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        self._n_in += len(x)
        if self._passthrough:
            self._n_out += len(x)
            return x.copy()
        self._buf = np.concatenate([self._buf, x.astype(np.float64)])
        # Output n needs inputs up to floor(n*down/up) + half <= n_in - 1.
        avail = self._n_in - self.half_taps
        n_end = -(-avail * self.up // self.down) if avail > 0 else 0  # ceil(avail*up/down)
        return self._emit_until(max(n_end, self._n_out))

    def flush(self) -> np.ndarray:
        """Emit the tail (input zero-padded). The total output is then ceil(n_in * out / in)."""
        if self._flushed or self._passthrough:
            self._flushed = True
            return np.zeros(0, np.float32)
        self._flushed = True
        self._buf = np.concatenate([self._buf, np.zeros(self.half_taps + 1, np.float64)])
        total = -(-self._n_in * self.up // self.down)
        return self._emit_until(max(total, self._n_out))


def resample(x: np.ndarray, in_rate_hz: int, out_rate_hz: int) -> np.ndarray:
    """Whole-signal convenience: same result as streaming the signal through one StreamResampler."""
    r = StreamResampler(in_rate_hz, out_rate_hz)
    y = r.process(x)
    return np.concatenate([y, r.flush()])
