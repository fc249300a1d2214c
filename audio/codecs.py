"""ITU-T G.711 mu-law and A-law, vectorized with numpy (the classic segment-table algorithm, bit-exact).

Encoders take float32 samples (converted to int16 as in audio.pcm) and return one byte per sample;
decoders return float32. The *_int16 variants work on int16 arrays directly."""

from __future__ import annotations

import numpy as np

from audio.pcm import float32_to_int16

_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)
_SEG_AEND = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], np.int32)
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # in 14-bit magnitude


def ulaw_encode_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 [n] -> mu-law codes uint8 [n]."""
    v = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2  # 14-bit
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_SEG_UEND, v)  # first segment whose end >= v
    code = (np.minimum(seg, 7) << 4) | ((v >> (np.minimum(seg, 7) + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)  # [256]


def alaw_encode_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 [n] -> A-law codes uint8 [n]."""
    v = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 3  # 13-bit
    neg = v < 0
    mask = np.where(neg, 0x55, 0xD5)
    v = np.where(neg, -v - 1, v)
    seg = np.searchsorted(_SEG_AEND, v)
    s = np.minimum(seg, 7)
    quant = np.where(s < 2, v >> 1, v >> np.maximum(s, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (s << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)  # [256]


ULAW_DECODE_TABLE = _ulaw_table()
ALAW_DECODE_TABLE = _alaw_table()


def ulaw_decode_int16(codes: np.ndarray) -> np.ndarray:
    return ULAW_DECODE_TABLE[np.asarray(codes, dtype=np.uint8)]


def alaw_decode_int16(codes: np.ndarray) -> np.ndarray:
    return ALAW_DECODE_TABLE[np.asarray(codes, dtype=np.uint8)]


def ulaw_encode(x: np.ndarray) -> bytes:
    """float32 samples -> mu-law bytes (one per sample)."""
    return ulaw_encode_int16(float32_to_int16(x)).tobytes()


def ulaw_decode(b: bytes) -> np.ndarray:
    """mu-law bytes -> float32 samples."""
    return ulaw_decode_int16(np.frombuffer(b, np.uint8)).astype(np.float32) / 32768.0


def alaw_encode(x: np.ndarray) -> bytes:
    """float32 samples -> A-law bytes (one per sample)."""
    return alaw_encode_int16(float32_to_int16(x)).tobytes()


def alaw_decode(b: bytes) -> np.ndarray:
    """A-law bytes -> float32 samples."""
    return alaw_decode_int16(np.frombuffer(b, np.uint8)).astype(np.float32) / 32768.0
