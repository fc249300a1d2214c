"""Whisper-style log-mel features in numpy (no torch, no transformers): the input of Whisper-encoder models such
as the Smart Turn end-of-turn classifier.

  power spectrum  25 ms periodic-Hann frames every 10 ms, centred (reflect-padded by half a window), |rFFT|^2
  mel             80 triangular filters on the Slaney mel scale over 0-8 kHz, each normalised to unit area
  log             log10(max(mel, 1e-10)); the last frame dropped (Whisper's convention: n_samples / 160 frames);
                  floored at (max - 8); scaled as (x + 4) / 4

Checked against transformers' WhisperFeatureExtractor in tests/test_turn_model.py (same values to ~1e-4)."""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SAMPLE_RATE_HZ = 16_000
N_FFT = 400  # 25 ms analysis window
HOP_SAMPLES = 160  # 10 ms between frames
N_MELS = 80
_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE_LOG10 = 8.0  # values more than 80 dB below the loudest are floored


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above (27 mels per factor 6.4)."""
    f = np.asarray(f, np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


@functools.cache
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] float64: triangles between n_mels + 2 points evenly spaced in mel from 0 Hz to
    rate_hz / 2, each scaled by 2 / (its width in Hz) so that every filter has the same area."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate_hz / 2), n_mels + 2))  # [n_mels + 2] Hz
    bins = np.linspace(0.0, rate_hz / 2, n_fft // 2 + 1)  # [F] centre frequency of each rFFT bin
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # [n_mels] each
    rising = (bins[:, None] - lo) / (mid - lo)  # [F, n_mels]
    falling = (hi - bins[:, None]) / (hi - mid)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (hi - lo)
    weights.setflags(write=False)
    return weights


@functools.cache
def _hann(n: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic: the window of an n-point DFT
    w.setflags(write=False)
    return w


def log_mel_spectrogram(x16k: np.ndarray) -> np.ndarray:
    """[n] float 16 kHz mono -> [N_MELS, n // HOP_SAMPLES] float32 Whisper log-mel (see the module docstring)."""
    x = np.asarray(x16k, dtype=np.float64).reshape(-1)
    if len(x) < N_FFT // 2 + 1:
        raise ValueError(f"log-mel needs at least {N_FFT // 2 + 1} samples, got {len(x)}")
    padded = np.pad(x, N_FFT // 2, mode="reflect")  # centred frames
    frames = sliding_window_view(padded, N_FFT)[::HOP_SAMPLES]  # [T + 1, N_FFT] (a view, no copy)
    power = np.abs(np.fft.rfft(frames * _hann(N_FFT), axis=-1)) ** 2  # [T + 1, F]
    mel = power @ mel_filterbank()  # [T + 1, N_MELS]
    log_spec = np.log10(np.maximum(mel, _LOG_FLOOR))[:-1].T  # [N_MELS, T]
    log_spec = np.maximum(log_spec, log_spec.max() - _DYNAMIC_RANGE_LOG10)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def normalize_waveform(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (Whisper feature extractors' do_normalize), computed in float32."""
    x = np.asarray(x, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)
