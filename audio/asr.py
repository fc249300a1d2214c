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

from audio.asr_pool import PRIORITY_FINAL, PRIORITY_PARTIAL, DecodePool, PoolBusy

log = logging.getLogger("voicefast.audio")

SAMPLE_RATE_HZ = 16_000
MAX_WINDOW_SAMPLES = 30 * SAMPLE_RATE_HZ  # Whisper's context; longer audio goes through faster-whisper's loop
FULL_WINDOW_FRAMES = 3000  # 30 s of 10 ms mel frames
MAX_PROMPT_TOKENS = 223  # Whisper's previous-text budget: half its 448-token context, less <|startofprev|>


class Transcript(str):
    """A decoded text (it is the str) that also tells how sure the decoder was of its last word (None: unknown)."""

    last_word_probability: float | None

    def __new__(cls, text: str, last_word_probability: float | None = None) -> Transcript:
        self = super().__new__(cls, text)
        self.last_word_probability = last_word_probability
        return self


@dataclass(slots=True)
class AsrOptions:
    beam_size: int = 1
    language: str | None = None  # None: "en" for .en models, else detected
    no_speech_threshold: float = 0.6  # with avg_logprob < logprob_threshold -> "" (silence, no hallucination)
    logprob_threshold: float = -1.0
    max_new_tokens: int = 200
    # Whisper pads every input to a 30 s window; CTranslate2 also encodes shorter windows, which is several
    # times faster. Too short a window makes Whisper loop, so the window is at least min_window_s and at least
    # window_pad_s past the audio, and a looping or runaway result is decoded again on the full 30 s window.
    # min_window_s=30 always uses the full window.
    min_window_s: float = 10.0
    window_pad_s: float = 5.0
    max_tokens_per_s: float = 8.0  # (+16) token budget on a short window: bounds the cost of a loop
    max_words_per_s: float = 6.0  # more words than this per second of audio is a runaway, not speech
    # Encoder windows are rounded up to a multiple of this (mel frames, 2.5 s): every distinct window length
    # costs CTranslate2's shape-keyed native caches memory for good (measured: ~0.85 MiB per new length, RSS
    # +250 MiB over 300 decodes of random lengths and still rising; with 2.5 s steps it plateaus after the 9
    # lengths 10, 12.5, ..., 30 s are seen). Utterances under 5 s keep the 10 s window they always had.
    window_step_frames: int = 250


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """Per-decode settings a session chose (input_audio_transcription): the language (None: the model's own, or
    detected on a multilingual model) and a prompt (context words that steer spelling; Whisper keeps the last
    223 tokens of it)."""

    language: str | None = None
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class _Job:
    audio: np.ndarray  # [n] float32 16 kHz
    request: DecodeRequest


CUBLAS12 = ("libcublasLt.so.12", "libcublas.so.12")  # what CTranslate2 4.x dlopens on CUDA (by soname)


def load_cublas12() -> str | None:
    """Make CUDA 12 cuBLAS loadable for CTranslate2: None when the system already has it or an installed
    nvidia-cublas-cu12 package provides it (preloaded with RTLD_GLOBAL, so CTranslate2's dlopen by soname finds
    it); otherwise why not. A GPU host with only CUDA 13 (the H200 machines here) needs that package carried."""
    import ctypes
    import sys
    from pathlib import Path

    try:
        ctypes.CDLL(CUBLAS12[1])
        return None
    except OSError:
        pass
    for base in sys.path:
        lib = Path(base or ".") / "nvidia" / "cublas" / "lib"
        if (lib / CUBLAS12[1]).is_file():
            try:
                for name in CUBLAS12:
                    ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
                return None
            except OSError as e:
                return f"{lib}: {e}"
    return "libcublas.so.12 (CUDA 12 cuBLAS) not found: install nvidia-cublas-cu12 (scripts/gpu_stage.sh --cublas12)"


def ctranslate2_cuda() -> tuple[bool, str]:
    """(usable, why not): CTranslate2 sees a CUDA device and its cuBLAS 12 can be loaded."""
    import ctranslate2

    if ctranslate2.get_cuda_device_count() < 1:
        return False, "CTranslate2 sees no CUDA device"
    why = load_cublas12()
    return why is None, why or ""


def pick_device(device: str = "auto") -> tuple[str, str]:
    """(device, compute_type): CUDA float16 where CTranslate2 can run on CUDA (auto), else CPU int8."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device != "cpu":
        ok, why = ctranslate2_cuda()
        if device == "cuda" and not ok:
            raise ValueError(f"ASR device 'cuda' is not usable here: {why}")
        device = "cuda" if ok else "cpu"
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
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        from model_assets import resolve_asr

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
        self._Tokenizer, self._multilingual = Tokenizer, multilingual
        self._tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe",
                                    language=self.language or "en")
        self._tokenizers = {self.language or "en": self._tokenizer}  # language -> Tokenizer (one per language)
        self._prompt = self.model.get_prompt(self._tokenizer, [], without_timestamps=True)
        self._suppress = get_suppressed_tokens(self._tokenizer, [-1])
        self._multilingual_auto = multilingual and self.options.language is None
        # Batching queued finals pays on a GPU. On a CPU the encoder is compute-bound: a batch of 8 finishes in
        # about the same wall time as 8 one-at-a-time decodes (bench/audio.py, 2 cores: 0.74-1.40 s vs
        # 0.70-1.22 s across runs) but every caller waits for the whole batch, so the median is worse.
        if max_batch is None:
            max_batch = 8 if self.device == "cuda" else 1
        self._prompt_cache: dict[tuple[str | None, str], list[int]] = {}  # (language, prompt) -> decoder prompt
        self._pool = DecodePool(self._decode_jobs, workers=workers, max_batch=max_batch)
        self._closed = threading.Event()
        # Languages a DecodeRequest may ask for: the model's own for an English-only model.
        self.languages: tuple[str, ...] = tuple(_LANGUAGE_CODES) if multilingual else ("en",)

    # ---- blocking API ----
    def transcribe(self, x16k: np.ndarray, *, prompt: str | None = None, language: str | None = None) -> Transcript:
        """Text of one utterance (16 kHz float32 mono). Blocking; safe to call from several threads.
        `prompt`: text that came before (Whisper's previous-text prompt): names and words to expect."""
        return self.decode_batch([x16k], [DecodeRequest(language=language, prompt=prompt)])[0]

    def decode_batch(self, audios: list[np.ndarray], requests: list[DecodeRequest] | None = None
                     ) -> list[Transcript]:
        """Decode several utterances in one encoder/decoder batch, each with its own DecodeRequest (language and
        previous-text prompt; None: the model's own language, no prompt)."""
        audios = [_check_audio(a) for a in audios]
        requests = list(requests) if requests is not None else [DecodeRequest()] * len(audios)
        if len(requests) != len(audios):
            raise ValueError(f"{len(audios)} audios but {len(requests)} requests")
        for r in requests:
            self.check_request(r)
        out: list[str | None] = [None] * len(audios)
        short = [i for i, a in enumerate(audios) if len(a) <= MAX_WINDOW_SAMPLES and not self._auto(requests[i])]
        for i in set(range(len(audios))) - set(short):
            out[i] = self._transcribe_long(audios[i], requests[i])
        if short:
            audios_short = [audios[i] for i in short]
            prompts = [self._prompt_for(requests[i]) for i in short]
            texts, suspect = self._decode_short(audios_short, self._window_frames(audios_short), prompts)
            redo = [k for k, bad in enumerate(suspect) if bad]
            if redo:  # a loop or runaway on the short window: decode those again on the full 30 s window
                log.debug("ASR: %d of %d decodes redone on the full window", len(redo), len(short))
                again, _ = self._decode_short([audios_short[k] for k in redo], FULL_WINDOW_FRAMES,
                                              [prompts[k] for k in redo])
                for k, text in zip(redo, again, strict=True):
                    texts[k] = text
            for i, text in zip(short, texts, strict=True):
                out[i] = text
        return [t if isinstance(t, Transcript) else Transcript(t or "") for t in out]

    def check_request(self, r: DecodeRequest) -> None:
        if r.language is not None and r.language not in self.languages:
            raise ValueError(f"language {r.language!r} is not one this ASR model transcribes "
                             f"({', '.join(self.languages[:8])}{', ...' if len(self.languages) > 8 else ''})")
        if r.prompt is not None and not isinstance(r.prompt, str):
            raise ValueError("prompt must be a string")

    def _auto(self, r: DecodeRequest) -> bool:
        """Language detection needed: faster-whisper's own loop does it."""
        return self._multilingual_auto and r.language is None

    def _tokenizer_for(self, language: str | None):
        language = language or self.language or "en"
        tok = self._tokenizers.get(language)
        if tok is None:  # bounded: one per language the model knows (check_request)
            tok = self._tokenizers[language] = self._Tokenizer(self.model.hf_tokenizer, self._multilingual,
                                                              task="transcribe", language=language)
        return tok

    def _prompt_for(self, r: DecodeRequest) -> list[int]:
        """Decoder prompt: [<|startofprev|> previous text]? <|startoftranscript|> <|lang|>? ... <|notimestamps|>."""
        prompt = r.prompt.strip() if r.prompt else ""
        if r.language in (None, self.language) and not prompt:
            return self._prompt
        key = (r.language, prompt)
        if key not in self._prompt_cache:
            if len(self._prompt_cache) >= 64:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            tok = self._tokenizer_for(r.language)
            prev = tok.encode(" " + prompt)[-MAX_PROMPT_TOKENS:] if prompt else []  # Whisper keeps the end
            self._prompt_cache[key] = self.model.get_prompt(tok, prev, without_timestamps=True)
        return self._prompt_cache[key]

    def _window_frames(self, audios: list[np.ndarray]) -> int:
        """Encoder window (mel frames, 100 per second) for a batch: one size fits the longest utterance."""
        o = self.options
        longest_s = max(len(a) for a in audios) / SAMPLE_RATE_HZ
        window_s = max(o.min_window_s, longest_s + o.window_pad_s)
        step = max(1, o.window_step_frames)
        return min(FULL_WINDOW_FRAMES, int(np.ceil(window_s * 100 / step)) * step)

    def _decode_short(self, audios: list[np.ndarray], window_frames: int,
                      prompts: list[list[int]]) -> tuple[list[str], list[bool]]:
        """(texts, suspect) for utterances of at most 30 s on a window_frames window: one batch per position of
        <|startoftranscript|> in the prompt (CTranslate2's Whisper generate needs it at the same position in every
        row, so sessions whose previous-text prompts differ in length are decoded in separate batches)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.index(self._tokenizer.sot) if self._tokenizer.sot in p else 0, []).append(i)
        texts: list = [None] * len(audios)
        suspect: list = [None] * len(audios)
        for idx in groups.values():
            t, s = self._decode_batch_same_sot([audios[i] for i in idx], window_frames, [prompts[i] for i in idx])
            for i, ti, si in zip(idx, t, s, strict=True):
                texts[i], suspect[i] = ti, si
        return texts, suspect

    def _decode_batch_same_sot(self, audios: list[np.ndarray], window_frames: int,
                               prompts: list[list[int]]) -> tuple[list[str], list[bool]]:
        """_decode_short for prompts with <|startoftranscript|> at one position: encoded and decoded as one batch."""
        from faster_whisper.audio import pad_or_trim

        fe = self.model.feature_extractor
        feats = np.stack([pad_or_trim(fe(a)[..., :-1], window_frames) for a in audios])  # [B, n_mels, window]
        enc = self.model.encode(feats)
        o = self.options
        longest_s = max(len(a) for a in audios) / SAMPLE_RATE_HZ
        budget = o.max_new_tokens
        if window_frames < FULL_WINDOW_FRAMES:
            budget = min(budget, int(longest_s * o.max_tokens_per_s) + 16)
        tokens = [list(p) for p in prompts]
        results = self.model.model.generate(
            enc, tokens, beam_size=o.beam_size, max_length=max(len(t) for t in tokens) + budget,
            suppress_blank=True, suppress_tokens=self._suppress, return_scores=True, return_no_speech_prob=True,
            return_logits_vocab=True)
        texts, suspect = [], []
        for a, r in zip(audios, results, strict=True):
            seq = r.sequences_ids[0]
            ids = [t for t in seq if t < self._tokenizer.eot]
            avg_logprob = r.scores[0] * len(seq) / (len(seq) + 1)
            silent = r.no_speech_prob > o.no_speech_threshold and avg_logprob < o.logprob_threshold
            text = "" if silent or len(a) == 0 else self._tokenizer.decode(ids).strip()
            texts.append(Transcript(text, self._last_word_probability(seq, r.logits[0]) if text else None))
            words = text.split()
            runaway = len(words) > o.max_words_per_s * max(len(a) / SAMPLE_RATE_HZ, 1.0)
            suspect.append(window_frames < FULL_WINDOW_FRAMES and (runaway or has_repetition(words)))
        return texts, suspect

    def _last_word_probability(self, seq: list[int], logits) -> float | None:
        """How sure the decoder was of the transcript's last word (its tokens' joint probability; punctuation after
        it skipped). Whisper completes a cut-off phrase with a word nobody said ("a table for it"), and says so
        with a low probability; voicefast.turn_text weighs it."""
        tok = self._tokenizer
        probs: list[float] = []
        for i in range(len(seq) - 1, -1, -1):
            t = seq[i]
            if t >= tok.eot or i >= len(logits):
                continue
            piece = tok.decode([t])
            if not probs and not piece.strip(" .,!?;:\"'-\u2026"):
                continue  # trailing punctuation
            step = logits[i]
            if getattr(step, "device", "cpu") != "cpu":  # a CUDA StorageView: numpy reads host memory only
                import ctranslate2
                step = step.to_device(ctranslate2.Device.cpu)
            lv = np.asarray(step, dtype=np.float64)  # [vocab] this step's logits
            m = lv.max()
            probs.append(float(np.exp(lv[t] - m - np.log(np.exp(lv - m).sum()))))
            if piece.startswith(" "):
                break
        return float(np.prod(probs)) if probs else None

    def _transcribe_long(self, x: np.ndarray, r: DecodeRequest = DecodeRequest()) -> str:
        segments, _ = self.model.transcribe(
            x, beam_size=self.options.beam_size, language=r.language or self.language, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, initial_prompt=r.prompt or None)
        return " ".join(s.text.strip() for s in segments).strip()

    # ---- pooled async API ----
    def submit(self, x16k: np.ndarray, *, final: bool = True, owner: object = None, replace: object = False,
               request: DecodeRequest | None = None) -> Future:
        """Queue a decode; returns a concurrent Future[Transcript] (cancel() drops it if it has not started).
        `owner` (a session) gets a fair share of the workers and at most a few queued jobs (PoolBusy beyond);
        `replace` (a key, or True) cancels the owner's older queued job of the same key (a newer partial, or a newer
        check's final of the same utterance);
        `request`: the decode's language and previous-text prompt."""
        request = request or DecodeRequest()
        self.check_request(request)
        return self._pool.submit(_Job(_check_audio(x16k), request), PRIORITY_FINAL if final else PRIORITY_PARTIAL,
                                 owner=owner, replace=replace)

    async def transcribe_async(self, x16k: np.ndarray, *, final: bool = True, owner: object = None,
                               replace: object = False, request: DecodeRequest | None = None) -> Transcript:
        return await asyncio.wrap_future(self.submit(x16k, final=final, owner=owner, replace=replace,
                                                     request=request))

    def _decode_jobs(self, jobs: list[_Job]) -> list[Transcript]:
        return self.decode_batch([j.audio for j in jobs], [j.request for j in jobs])

    def close(self) -> None:
        self._pool.shutdown()


def has_repetition(words: list[str], min_block: int = 3, min_ngram: int = 4) -> bool:
    """Whisper's looping failure mode: a block of >= min_block words repeated back to back, or any
    min_ngram-word sequence said twice (a loop cut off mid-repeat)."""
    w = [x.lower().strip(".,!?;:") for x in words]
    n = len(w)
    for p in range(min_block, n // 2 + 1):
        for i in range(n - 2 * p + 1):
            if w[i:i + p] == w[i + p:i + 2 * p]:
                return True
    grams = [tuple(w[i:i + min_ngram]) for i in range(n - min_ngram + 1)]
    return len(set(grams)) < len(grams)


def _check_audio(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"ASR expects mono 16 kHz float32 audio [n], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("ASR input contains NaN or Inf")
    return x


from audio.transcriber import StreamingTranscriber, stable_prefix_len  # noqa: E402  (re-export)

__all__ = ["AsrOptions", "DecodeRequest", "PoolBusy", "StreamingTranscriber", "Transcript", "WhisperASR",
           "has_repetition", "pick_device", "stable_prefix_len"]
