"""Wire audio formats: audio/pcm (24 kHz PCM16 LE mono), audio/pcmu and audio/pcma (8 kHz G.711).
GA sends formats as objects ({"type": "audio/pcm", "rate": 24000}); beta as strings ("pcm16", "g711_ulaw")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voicefast.errors import ProtocolError

_BETA_TO_GA = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_GA_TO_BETA = {v: k for k, v in _BETA_TO_GA.items()}
_RATES_HZ = {"audio/pcm": 24_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}


@dataclass(frozen=True, slots=True)
class AudioFormat:
    type: str = "audio/pcm"  # "audio/pcm" | "audio/pcmu" | "audio/pcma"

    @property
    def rate_hz(self) -> int:
        return _RATES_HZ[self.type]

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.type == "audio/pcm" else 1

    def to_ga(self) -> dict:
        return {"type": self.type, "rate": self.rate_hz} if self.type == "audio/pcm" else {"type": self.type}

    def to_beta(self) -> str:
        return _GA_TO_BETA[self.type]

    @staticmethod
    def parse(value: object, param: str) -> AudioFormat:
        """Accept the GA object or the beta string; raise ProtocolError naming `param` otherwise."""
        if isinstance(value, str):
            if value in _BETA_TO_GA:
                return AudioFormat(_BETA_TO_GA[value])
            if value in _RATES_HZ:
                return AudioFormat(value)
        elif isinstance(value, dict):
            t = value.get("type")
            if t in _RATES_HZ:
                rate = value.get("rate", _RATES_HZ[t])
                if rate != _RATES_HZ[t]:
                    raise ProtocolError(f"{t} supports only rate {_RATES_HZ[t]}, got {rate!r}",
                                        code="invalid_value", param=f"{param}.rate")
                return AudioFormat(t)
        raise ProtocolError(f"unsupported audio format {value!r}; use audio/pcm (24 kHz), audio/pcmu or audio/pcma",
                            code="invalid_value", param=param)

    def decode(self, data: bytes) -> np.ndarray:
        """Wire bytes -> float32 samples in [-1, 1] at self.rate_hz."""
        if self.type == "audio/pcm":
            if len(data) % 2:
                raise ProtocolError(f"audio/pcm needs an even number of bytes (16-bit samples), got {len(data)}",
                                    code="invalid_audio", param="audio")
            return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        from audio import codecs

        return codecs.ulaw_decode(data) if self.type == "audio/pcmu" else codecs.alaw_decode(data)

    def encode(self, x: np.ndarray) -> bytes:
        """float32 samples at self.rate_hz -> wire bytes."""
        if self.type == "audio/pcm":
            return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        from audio import codecs

        return codecs.ulaw_encode(x) if self.type == "audio/pcmu" else codecs.alaw_encode(x)
