"""Caller utterances as 24 kHz PCM16 with a known end-of-speech sample: Piper-synthesized prompts (reproducibly:
onnxruntime's random ops seeded per text, at a chosen speaking rate), paused utterances (two phrases with a thinking
pause between them), or a user's folder of WAVs with transcripts (foo.wav + foo.txt)."""

from __future__ import annotations

import hashlib
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
    source: str  # "piper", "piper x0.8", ... or the WAV path
    pause_ms: int = 0  # a paused utterance: the silence inside it (a reply before speech_end_sample is a cut)

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


def text_seed(text: str) -> int:
    """A stable per-text seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")


def piper_speech(text: str, *, seed: int | None = None, voice_path: str | None = None,
                 speaking_rate: float = 1.0) -> tuple[np.ndarray, int]:
    """`text` spoken by a Piper voice (the embedded one by default) at `speaking_rate` (1.2 = 20 % faster),
    reproducibly: Piper's VITS samples noise inside the ONNX graph, so onnxruntime's generator is seeded (default:
    text_seed(text)) before the voice's session is made. Returns (float32 samples, rate)."""
    import onnxruntime
    from piper import PiperVoice, SynthesisConfig

    from voicefast.assets import resolve_tts

    if speaking_rate <= 0:
        raise ValueError(f"speaking_rate must be > 0, got {speaking_rate}")
    onnxruntime.set_seed(text_seed(text) if seed is None else seed)
    voice = PiperVoice.load(voice_path or str(resolve_tts().path))
    cfg = SynthesisConfig(length_scale=(voice.config.length_scale or 1.0) / speaking_rate)
    chunks = list(voice.synthesize(text, syn_config=cfg))
    return np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32), chunks[0].sample_rate


def _source(speaking_rate: float) -> str:
    return "piper" if speaking_rate == 1.0 else f"piper x{speaking_rate:g}"


def synthesize(prompts: list[str], tts_spec: str | None = None, speaking_rate: float = 1.0) -> list[Utterance]:
    """Speak each prompt with the embedded Piper voice (or a user's Piper .onnx), reproducibly."""
    out = []
    for text in prompts:
        x, rate = piper_speech(text, voice_path=tts_spec, speaking_rate=speaking_rate)
        out.append(make_utterance(text, x, rate, _source(speaking_rate)))
    return out


def trim_to_speech(x: np.ndarray, rate_hz: int) -> np.ndarray:
    """x up to its last voiced 10 ms window (Piper ends a phrase with some silence)."""
    return x[:speech_end_sample(x, rate_hz)]


def paused(first: str, second: str, pause_ms: int, *, speaking_rate: float = 1.0,
           tts_spec: str | None = None) -> Utterance:
    """`first`, a thinking pause of `pause_ms` of silence, then `second`: one utterance whose true end of speech is
    the end of `second`. Each phrase is synthesized on its own (as a person restarting after a pause would)."""
    a, rate = piper_speech(first, voice_path=tts_spec, speaking_rate=speaking_rate)
    b, rate_b = piper_speech(second, voice_path=tts_spec, speaking_rate=speaking_rate)
    if rate_b != rate:
        raise ValueError("both phrases must come from one voice")
    x = np.concatenate([trim_to_speech(a, rate), np.zeros(rate * pause_ms // 1000, np.float32), b])
    u = make_utterance(f"{first} {second}", x, rate, _source(speaking_rate))
    return Utterance(u.text, u.pcm, u.speech_end_sample, u.source, pause_ms)


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
