"""Caller utterances as 24 kHz PCM16 with a known end-of-speech sample: Piper-synthesized prompts or a
user's folder of WAVs with transcripts (foo.wav + foo.txt)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE_HZ = 24_000  # the Realtime API's PCM rate
FRAME_MS = 20
FRAME_SAMPLES = RATE_HZ * FRAME_MS // 1000  # 480


@dataclass(frozen=True)
class Utterance:
    text: str
    pcm: bytes  # int16 LE mono at RATE_HZ, padded with zeros to a whole number of frames
    speech_end_sample: int  # exclusive end of the last voiced 10 ms window: the TRUE end of speech
    source: str  # "piper" or the WAV path

    @property
    def duration_ms(self) -> float:
        return len(self.pcm) / 2 / RATE_HZ * 1000


def resample(x: np.ndarray, in_rate_hz: int, out_rate_hz: int) -> np.ndarray:
    """Band-limited whole-signal resampling through the FFT (offline, so no streaming state needed)."""
    if in_rate_hz == out_rate_hz:
        return x.astype(np.float32)
    n_out = int(round(len(x) * out_rate_hz / in_rate_hz))
    pad = 1 << int(np.ceil(np.log2(len(x) + 1)))  # zero-padding avoids wrap-around at the edges
    spec = np.fft.rfft(x.astype(np.float64), pad)
    n_pad_out = int(round(pad * out_rate_hz / in_rate_hz))
    out = np.zeros(n_pad_out // 2 + 1, np.complex128)
    k = min(len(spec), len(out))
    out[:k] = spec[:k]
    return (np.fft.irfft(out, n_pad_out) * (n_pad_out / pad))[:n_out].astype(np.float32)


def speech_end_sample(x: np.ndarray, rate_hz: int = RATE_HZ, rel_threshold_db: float = -35.0) -> int:
    """Exclusive end of the last 10 ms window whose RMS is within `rel_threshold_db` of the loudest window."""
    win = rate_hz // 100
    n = len(x) // win
    if n == 0:
        raise ValueError("utterance shorter than 10 ms")
    rms = np.sqrt((x[: n * win].astype(np.float64).reshape(n, win) ** 2).mean(axis=1))  # [n]
    if rms.max() <= 0:
        raise ValueError("utterance is silent")
    voiced = np.nonzero(rms >= rms.max() * 10 ** (rel_threshold_db / 20))[0]
    return int(voiced[-1] + 1) * win


def make_utterance(text: str, x: np.ndarray, rate_hz: int, source: str) -> Utterance:
    """Resample to 24 kHz, cut trailing silence after the true end, pad to whole frames."""
    if x.ndim > 1:
        x = x.mean(axis=1)
    y = np.clip(resample(x, rate_hz, RATE_HZ), -1.0, 1.0)
    end = speech_end_sample(y)
    y = y[:end]
    y = np.concatenate([y, np.zeros(-len(y) % FRAME_SAMPLES, np.float32)])
    return Utterance(text, (y * 32767).astype("<i2").tobytes(), end, source)


def synthesize(prompts: list[str], tts_spec: str | None = None) -> list[Utterance]:
    """Speak each prompt with the embedded Piper voice (or a user's Piper .onnx)."""
    from piper import PiperVoice

    from voicefast.assets import resolve_tts

    voice = PiperVoice.load(str(resolve_tts(tts_spec).path))
    out = []
    for text in prompts:
        chunks = list(voice.synthesize(text))
        x = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        out.append(make_utterance(text, x, chunks[0].sample_rate, "piper"))
    return out


def load_wav_dir(folder: str | Path) -> list[Utterance]:
    """Every foo.wav in `folder` that has a foo.txt beside it (the transcript, used for WER)."""
    import soundfile as sf

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--wav-dir {folder} is not a directory")
    out, missing = [], []
    for wav in sorted(folder.glob("*.wav")):
        txt = wav.with_suffix(".txt")
        if not txt.exists():
            missing.append(wav.name)
            continue
        x, rate = sf.read(wav, dtype="float32", always_2d=False)
        out.append(make_utterance(txt.read_text().strip(), x, rate, str(wav)))
    if not out:
        extra = f" ({len(missing)} WAVs lack a .txt transcript: {missing[:3]})" if missing else ""
        raise ValueError(f"--wav-dir {folder}: no foo.wav + foo.txt pairs found{extra}")
    return out
