"""PCM helpers: int16 bytes <-> float32 samples, ms <-> samples, and a re-buffer for fixed-size frames.

float32 samples are in [-1, 1); int16 value v maps to v / 32768 and back exactly."""

from __future__ import annotations

import numpy as np


def pcm16_to_float32(b: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes -> float32 array in [-1, 1)."""
    if len(b) % 2:
        raise ValueError(f"PCM16 data must have an even number of bytes, got {len(b)}")
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / 32768.0  # [n]


def float32_to_int16(x: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 (rounded, clipped; 1.0 saturates to 32767)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def float32_to_pcm16(x: np.ndarray) -> bytes:
    """float32 samples -> little-endian PCM16 bytes."""
    return float32_to_int16(x).astype("<i2").tobytes()


def ms_to_samples(ms: float, rate_hz: int) -> int:
    return int(round(ms * rate_hz / 1000.0))


def samples_to_ms(n: int, rate_hz: int) -> int:
    return int(n * 1000 // rate_hz)


class FrameBuffer:
    """Collects float32 chunks of any size and hands out whole frames of `frame_samples`."""

    def __init__(self, frame_samples: int):
        if frame_samples <= 0:
            raise ValueError(f"frame_samples must be positive, got {frame_samples}")
        self.frame_samples = frame_samples
        self._buf = np.zeros(0, np.float32)  # [pending < frame_samples after each push]

    def push(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        n = len(buf) // self.frame_samples
        frames = [buf[i * self.frame_samples:(i + 1) * self.frame_samples] for i in range(n)]
        self._buf = buf[n * self.frame_samples:].copy()
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)

    def flush(self) -> np.ndarray:
        """The partial frame left over (possibly empty); the buffer is empty afterwards."""
        rest, self._buf = self._buf, np.zeros(0, np.float32)
        return rest
