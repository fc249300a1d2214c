"""Streaming ASR with faster-whisper (CTranslate2): one WhisperASR per process, shared by all sessions,
and one StreamingTranscriber per utterance.

Whisper encodes a padded 30 s window whatever the utterance length (tiny.en int8 on 2 CPU cores: ~0.4-0.6 s
a decode), so partials are paced by new audio, publish only words two consecutive hypotheses agree on
(append-only), and the final can start speculatively at the VAD's early_silence and be reused at
speech_stopped when nothing changed."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from audio.asr_pool import PRIORITY_FINAL, PRIORITY_PARTIAL, DecodePool

log = logging.getLogger("voicefast.audio")

SAMPLE_RATE_HZ = 16_000
MAX_WINDOW_SAMPLES = 30 * SAMPLE_RATE_HZ  # Whisper's context; longer audio goes through faster-whisper's loop


@dataclass(slots=True)
class AsrOptions:
    beam_size: int = 1
    language: str | None = None  # None: "en" for .en models, else detected
    no_speech_threshold: float = 0.6  # with avg_logprob < logprob_threshold -> "" (silence, no hallucination)
    logprob_threshold: float = -1.0
    max_new_tokens: int = 200


def pick_device(device: str = "auto") -> tuple[str, str]:
    """(device, compute_type): CUDA float16 when a GPU is visible, else CPU int8."""
    import ctranslate2

    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return device, ("float16" if device == "cuda" else "int8")


class WhisperASR:
    """A faster-whisper model shared between sessions.

    transcribe() is blocking and thread-safe; transcribe_async() queues the decode on a small worker pool
    (finals before partials, queued finals decoded as one batch) and never blocks the event loop."""

    def __init__(self, model: str | None = None, device: str = "auto", cpu_threads: int = 2, workers: int = 1,
                 *, compute_type: str | None = None, max_batch: int | None = None,
                 options: AsrOptions | None = None):
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.tokenizer import Tokenizer
            from faster_whisper.transcribe import get_suppressed_tokens
        except ImportError as e:
            raise RuntimeError("streaming ASR needs faster-whisper: pip install faster-whisper") from e
        from voicefast.assets import resolve_asr

        asset = resolve_asr(model)
        self.device, default_ct = pick_device(device)
        self.compute_type = compute_type or default_ct
        # "Whisper tiny.en, CTranslate2" for the embedded model; the directory or model name for the user's.
        self.name = asset.description if asset.source != "user" else getattr(asset.path, "name", str(asset.path))
        self.path = str(asset.path)
        self.model = WhisperModel(self.path, device=self.device, compute_type=self.compute_type,
                                  cpu_threads=cpu_threads, num_workers=workers)
        self.options = options or AsrOptions()
        multilingual = self.model.model.is_multilingual
        self.language = self.options.language or (None if multilingual else "en")
        self._tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe",
                                    language=self.language or "en")
        self._prompt = self.model.get_prompt(self._tokenizer, [], without_timestamps=True)
        self._suppress = get_suppressed_tokens(self._tokenizer, [-1])
        self._multilingual_auto = multilingual and self.options.language is None
        # Batching queued finals pays on a GPU; on a CPU the encoder is compute-bound, so a batch of 8 only
        # delays every result to the end of the batch (bench/audio.py: 3.9 s vs 2.8 s wall for 8 finals).
        if max_batch is None:
            max_batch = 8 if self.device == "cuda" else 1
        self._pool = DecodePool(self.decode_batch, workers=workers, max_batch=max_batch)
        self._closed = threading.Event()

    # ---- blocking API ----
    def transcribe(self, x16k: np.ndarray) -> str:
        """Text of one utterance (16 kHz float32 mono). Blocking; safe to call from several threads."""
        return self.decode_batch([x16k])[0]

    def decode_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Decode several utterances in one encoder/decoder batch (each padded to Whisper's 30 s window)."""
        audios = [_check_audio(a) for a in audios]
        out: list[str | None] = [None] * len(audios)
        short = [i for i, a in enumerate(audios) if len(a) <= MAX_WINDOW_SAMPLES and not self._multilingual_auto]
        for i in set(range(len(audios))) - set(short):
            out[i] = self._transcribe_long(audios[i])
        if short:
            for i, text in zip(short, self._decode_short([audios[i] for i in short]), strict=True):
                out[i] = text
        return [t or "" for t in out]

    def _decode_short(self, audios: list[np.ndarray]) -> list[str]:
        from faster_whisper.audio import pad_or_trim

        fe = self.model.feature_extractor
        feats = np.stack([pad_or_trim(fe(a)[..., :-1]) for a in audios])  # [B, n_mels, 3000]
        enc = self.model.encode(feats)
        o = self.options
        results = self.model.model.generate(
            enc, [list(self._prompt) for _ in audios], beam_size=o.beam_size,
            max_length=len(self._prompt) + o.max_new_tokens, suppress_blank=True, suppress_tokens=self._suppress,
            return_scores=True, return_no_speech_prob=True)
        texts = []
        for a, r in zip(audios, results, strict=True):
            ids = [t for t in r.sequences_ids[0] if t < self._tokenizer.eot]
            avg_logprob = r.scores[0] * len(r.sequences_ids[0]) / (len(r.sequences_ids[0]) + 1)
            silent = r.no_speech_prob > o.no_speech_threshold and avg_logprob < o.logprob_threshold
            texts.append("" if silent or len(a) == 0 else self._tokenizer.decode(ids).strip())
        return texts

    def _transcribe_long(self, x: np.ndarray) -> str:
        segments, _ = self.model.transcribe(
            x, beam_size=self.options.beam_size, language=self.language, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()

    # ---- pooled async API ----
    def submit(self, x16k: np.ndarray, *, final: bool = True) -> Future:
        """Queue a decode; returns a concurrent Future[str] (cancel() drops it if it has not started)."""
        return self._pool.submit(_check_audio(x16k), PRIORITY_FINAL if final else PRIORITY_PARTIAL)

    async def transcribe_async(self, x16k: np.ndarray, *, final: bool = True) -> str:
        return await asyncio.wrap_future(self.submit(x16k, final=final))

    def close(self) -> None:
        self._pool.shutdown()


def _check_audio(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"ASR expects mono 16 kHz float32 audio [n], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("ASR input contains NaN or Inf")
    return x


from audio.transcriber import StreamingTranscriber, stable_prefix_len  # noqa: E402  (re-export)

__all__ = ["AsrOptions", "StreamingTranscriber", "WhisperASR", "pick_device", "stable_prefix_len"]
