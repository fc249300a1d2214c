"""Speech fixtures made at test time (never committed): sentences spoken by the embedded Piper voice
(or espeak-ng when installed), as 16 kHz mono PCM16 WAVs cached under .cache/speech/.

Piper's VITS model samples noise inside the ONNX graph (durations and waveform), so the same text sounds a little
different on every call, and a real-ASR assertion that passes on one synthesis can fail on the next. Fixtures are
therefore synthesized reproducibly: onnxruntime's random ops draw from a seed fixed per text (set before the voice's
session is created, a fresh session per fixture), so every clone on every run hears the same audio.
`bench/asr_variation.py` measures how much the ASR's word error rate moves over many seeds; the real-ASR tests take
their bounds from that measurement."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.voice.utterances import text_seed  # noqa: F401  (re-exported: the seed of a fixture)

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "speech"

# Customer-service sentences with the hard cases: times, order numbers, prices, addresses, an email.
CUSTOMER_SENTENCES = [
    "What time do you open on Saturday?",
    "Our store is open from nine in the morning until six in the evening.",
    "I would like to check the status of my order.",
    "My order number is four five seven two one.",
    "How much does the premium plan cost per month?",
    "The premium plan costs twenty nine dollars per month.",
    "Can I return a pair of shoes that I bought last week?",
    "You can return any item within thirty days of purchase.",
    "Where is your nearest shop located?",
    "We are located at one hundred Main Street in Springfield.",
    "Please send the receipt to my email address.",
    "My email is john at example dot com.",
    "Do you offer free shipping on large orders?",
    "Shipping is free for orders over fifty dollars.",
    "I need to change the delivery address for my package.",
    "Can I speak with a manager please?",
    "My credit card was charged twice for the same order.",
    "Is the blue jacket available in a medium size?",
    "How long does delivery usually take?",
    "Standard delivery takes three to five business days.",
    "Thank you very much for your help today.",
    "I would like to cancel my subscription.",
]


def resample_whole(x: np.ndarray, in_rate_hz: int, out_rate_hz: int) -> np.ndarray:
    """Band-limited whole-signal resampling via the FFT (fine for fixtures; streaming code uses audio.resample)."""
    if in_rate_hz == out_rate_hz:
        return x.astype(np.float32)
    n_out = int(round(len(x) * out_rate_hz / in_rate_hz))
    pad = 1 << int(np.ceil(np.log2(len(x) + 1)))  # zero-pad: avoids circular wrap at the edges
    spec = np.fft.rfft(x.astype(np.float64), pad)
    n_pad_out = int(round(pad * out_rate_hz / in_rate_hz))
    out_spec = np.zeros(n_pad_out // 2 + 1, dtype=np.complex128)
    k = min(len(spec), len(out_spec))
    out_spec[:k] = spec[:k]
    y = np.fft.irfft(out_spec, n_pad_out) * (n_pad_out / pad)
    return y[:n_out].astype(np.float32)


def synthesize_piper(text: str, seed: int | None = None, voice_path: str | None = None,
                     speaking_rate: float = 1.0) -> tuple[np.ndarray, int]:
    """`text` spoken by a Piper voice (the embedded one by default), reproducibly: the same (text, seed) gives the
    same samples. The seed defaults to `text_seed(text)`. One implementation with the benchmark's
    (bench.voice.utterances.piper_speech: seed, then load the voice's session)."""
    from bench.voice.utterances import piper_speech

    return piper_speech(text, seed=seed, voice_path=voice_path, speaking_rate=speaking_rate)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize_espeak(text: str, voice: str = "en", speed_wpm: int = 140) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "e.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    return audio, rate


def speech_wav(text: str, *, rate_hz: int = 16_000, engine: str = "piper", lead_silence_ms: int = 0,
               trail_silence_ms: int = 0) -> Path:
    """Path to a cached mono PCM16 WAV of `text` at `rate_hz`, with optional silence padding."""
    # "seeded": fixtures made before synthesis was seeded must not be reused from an old cache.
    spec = f"{engine}|seeded|{text}|{rate_hz}|{lead_silence_ms}|{trail_silence_ms}"
    key = hashlib.sha1(spec.encode()).hexdigest()[:16]
    path = CACHE_DIR / f"{engine}-{rate_hz}-{key}.wav"
    if path.exists():
        return path
    if engine == "piper":
        audio, src_rate = synthesize_piper(text)
    elif engine == "espeak":
        audio, src_rate = synthesize_espeak(text)
    else:
        raise ValueError(f"unknown speech engine {engine!r}")
    audio = resample_whole(audio, src_rate, rate_hz)
    lead = np.zeros(rate_hz * lead_silence_ms // 1000, np.float32)
    trail = np.zeros(rate_hz * trail_silence_ms // 1000, np.float32)
    audio = np.clip(np.concatenate([lead, audio, trail]), -1.0, 1.0)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.wav")
    sf.write(tmp, audio, rate_hz, subtype="PCM_16")
    tmp.replace(path)  # atomic: parallel test workers never read a half-written file
    return path


def load_wav(path: Path) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(path, dtype="float32", always_2d=False)
    return audio, rate
