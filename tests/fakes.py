"""Deterministic CPU fakes with scripted delays, used to test the server/session layers in isolation.
Each mirrors the duck type of the real part (docs/interfaces.md). Real parts have their own tests."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from audio.text_chunker import TextChunker
from llm_engine.tool_format import ToolDialect
from voicefast.stack import Stack


# -- LLM engine ---------------------------------------------------------------------------------------
@dataclass
class FakeSamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    grammar: object = None  # recorded, not enforced: the fake replies with its script


@dataclass
class FakeResult:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    decode_tok_s: float
    finish_reason: str
    text: str


@dataclass
class FakeOutput:
    text: str
    token_ids: list[int]
    finished: bool
    result: FakeResult | None = None


@dataclass
class FakeStats:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    prefix_hit_tokens: int
    decode_tok_s: float
    num_preemptions: int = 0


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]


class FakeEngine:
    """Replies with `reply(messages)` one word per token: `ttft_s` before the first, `token_s` between."""

    BLOCK = 16

    def __init__(self, reply=None, *, ttft_s: float = 0.01, token_s: float = 0.005, total_blocks: int = 256):
        self.reply = reply or (lambda msgs: "Sure. We are open from nine to six, Monday to Saturday. "
                                            "Anything else I can help with today?")
        self.ttft_s, self.token_s = ttft_s, token_s
        self.total_blocks = total_blocks
        self.tokenizer = FakeTokenizer()
        self.requests: list[tuple[str, list[dict]]] = []  # (request_id, messages) in arrival order
        self.params: dict[str, tuple] = {}  # request_id -> (sampling params, tools)
        self.tool_dialect = ToolDialect()  # the generic (system-prompt) tool-call syntax
        self.aborted: set[str] = set()
        self._blocks: dict[str, int] = {}
        self._ids = itertools.count()
        self.max_model_len = 2048

    def generate(self, params, *, messages=None, prompt=None, prompt_token_ids=None, request_id=None, tools=None):
        if messages is not None and not messages:  # like the real engine's chat template
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        rid = request_id or f"req-{next(self._ids)}"
        self.requests.append((rid, list(messages or [])))
        self.params[rid] = (params, tools)
        return self._stream(rid, params, messages or [])

    async def _stream(self, rid, params, messages):
        prompt_tokens = sum(len(self.tokenizer.encode(m["content"])) + 4 for m in messages)
        self._blocks[rid] = math.ceil(prompt_tokens / self.BLOCK)
        words = self.reply(messages).split(" ")
        t0 = time.monotonic()
        n, reason, text = 0, "stop", ""
        try:
            await asyncio.sleep(self.ttft_s)
            for i, w in enumerate(words):
                if rid in self.aborted:
                    reason = "abort"
                    break
                if n >= params.max_tokens:
                    reason = "length"
                    break
                delta = w if i == 0 else " " + w
                text += delta
                n += 1
                self._blocks[rid] = math.ceil((prompt_tokens + n) / self.BLOCK)
                yield FakeOutput(delta, [n], False)
                await asyncio.sleep(self.token_s)
            if rid in self.aborted:
                reason = "abort"
            yield FakeOutput("", [], True, FakeResult(rid, prompt_tokens, n, 0, 0.0,
                                                     n / max(time.monotonic() - t0, 1e-6), reason, text))
        finally:
            self._blocks.pop(rid, None)  # blocks return to the pool when the request ends, however it ends

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        self._blocks.pop(request_id, None)

    def stats(self) -> FakeStats:
        used = sum(self._blocks.values())
        return FakeStats(len(self._blocks), 0, self.total_blocks - used, self.total_blocks, 0, 100.0)

    def shutdown(self) -> None:
        pass


# -- ASR ----------------------------------------------------------------------------------------------
class FakeASR:
    """Returns scripted transcripts in order (then 'turn N'), after `delay_s`."""

    def __init__(self, transcripts=(), *, delay_s: float = 0.01, languages: tuple[str, ...] | None = ("en", "de")):
        self.transcripts = list(transcripts)
        self.delay_s = delay_s
        self.languages = languages
        self.calls: list[int] = []  # samples per call
        self.kw: list[dict] = []  # owner / replace / request of each call (as the real WhisperASR takes them)
        self._n = itertools.count(1)

    @property
    def prompts(self) -> list[str | None]:
        """The previous-text prompt of each call (request.prompt)."""
        return [getattr(kw.get("request"), "prompt", None) for kw in self.kw]

    async def transcribe_async(self, x16k: np.ndarray, **kw) -> str:
        unknown = set(kw) - {"final", "owner", "replace", "request"}
        if unknown:
            raise TypeError(f"transcribe_async got unexpected arguments {sorted(unknown)}")
        self.calls.append(len(x16k))
        self.kw.append(kw)
        await asyncio.sleep(self.delay_s)
        return self.transcripts.pop(0) if self.transcripts else f"turn {next(self._n)}"


class FakeTranscriber:
    """Streaming partials: one word per call ('w1', 'w2', ...)."""

    def __init__(self, submit_kw: dict | None = None):
        self.samples = 0
        self.submit_kw = submit_kw
        self._n = itertools.count(1)
        self.words: list[str] = []  # every partial's word so far (the real one's published words)

    def feed(self, x16k: np.ndarray) -> None:
        self.samples += len(x16k)

    async def partial(self) -> str:
        await asyncio.sleep(0)
        self.words.append(f"w{next(self._n)}")
        return self.words[-1] + " "

    @property
    def text(self) -> str:
        return " ".join(self.words)


# -- end-of-turn model -----------------------------------------------------------------------------------
class FakeTurnModel:
    """End-of-turn probabilities: `p(x16k)` (a number or a function of the audio), answered at once (a completed
    Future, so the session hears it on a later loop iteration, as from the real model's thread; no thread of its
    own, so a test's stacks leave none behind). Records the length of every input."""

    def __init__(self, p=0.9):
        self.p = p
        self.calls: list[int] = []

    def submit(self, x16k: np.ndarray) -> Future:
        self.calls.append(len(x16k))
        fut: Future = Future()
        fut.set_result(float(self.p(x16k) if callable(self.p) else self.p))
        return fut

    def close(self) -> None:
        pass


# -- TTS ----------------------------------------------------------------------------------------------
class FakeTTS:
    """A fake synthesizer (the model only: the real SpeechOutput, chunker and resampler run on it). `word_s` of a
    220 Hz tone per word at 22.05 kHz (divided by the speaking rate), one chunk per word; in the worker thread,
    `first_delay_s` before a call's first chunk and `delay_s` before each chunk. Records every call."""

    sample_rate_hz = 22_050

    def __init__(self, *, delay_s: float = 0.0, first_delay_s: float = 0.0, word_s: float = 0.05,
                 speaking_rate: float = 1.0):
        self.delay_s, self.first_delay_s, self.word_s = delay_s, first_delay_s, word_s
        self.speaking_rate = speaking_rate
        self.texts: list[str] = []
        self.rates: list[float] = []  # the speaking rate of each call

    def synthesize(self, text: str, speaking_rate: float | None = None):
        rate = self.speaking_rate if speaking_rate is None else speaking_rate
        if rate <= 0:
            raise ValueError(f"speaking_rate must be > 0, got {rate}")
        self.texts.append(text)
        self.rates.append(rate)
        n = int(self.sample_rate_hz * self.word_s / rate)
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / self.sample_rate_hz)).astype(np.float32)
        for i, _ in enumerate(text.split()):
            if i == 0 and self.first_delay_s:
                time.sleep(self.first_delay_s)
            if self.delay_s:
                time.sleep(self.delay_s)
            yield tone


# -- VAD ----------------------------------------------------------------------------------------------
@dataclass
class VadEvent:
    kind: str
    sample: int
    ms: int


@dataclass
class FakeVad:
    """Energy VAD on 20 ms frames (RMS > 0.05 is speech) with the real state machine's events:
    speech_started (at the first speech frame), early_silence (after early_ms of silence),
    speech_resumed, speech_stopped (after silence_ms of silence). Like audio.vad: early_silence.sample and
    speech_stopped.sample are where the silence began (the end of speech)."""

    silence_ms: int = 500
    early_ms: int = 200
    frame: int = 320
    _pos: int = 0
    _rest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _speaking: bool = False
    _silent_ms: int = 0
    _silence_start: int = 0
    _early: bool = False
    judged_on: set = field(default_factory=set)  # names of the threads that ran a judging process()

    def judges(self, n_samples: int) -> bool:
        return len(self._rest) + n_samples >= self.frame

    def process(self, x: np.ndarray) -> list[VadEvent]:
        if len(self._rest) + len(x) >= self.frame:
            self.judged_on.add(threading.current_thread().name)
        x = np.concatenate([self._rest, x])
        out = []
        n = len(x) // self.frame * self.frame
        for i in range(0, n, self.frame):
            f = x[i:i + self.frame]
            speech = float(np.sqrt(np.mean(f * f))) > 0.05
            start = self._pos
            self._pos += self.frame
            if speech:
                if not self._speaking:
                    self._speaking = True
                    out.append(VadEvent("speech_started", start, start // 16))
                elif self._early:
                    out.append(VadEvent("speech_resumed", start, start // 16))
                self._silent_ms, self._early = 0, False
            elif self._speaking:
                if self._silent_ms == 0:
                    self._silence_start = start
                self._silent_ms += 20
                if not self._early and self._silent_ms >= self.early_ms:
                    self._early = True
                    out.append(VadEvent("early_silence", self._silence_start, self._silence_start // 16))
                if self._silent_ms >= self.silence_ms:
                    self._speaking, self._early, self._silent_ms = False, False, 0
                    out.append(VadEvent("speech_stopped", self._silence_start, self._silence_start // 16))
        self._rest = x[n:]
        return out


def _fake_vad(td) -> FakeVad:
    """server_vad: early silence at min(200, window/2), as before semantic_vad existed; semantic_vad: at the
    eagerness' transcript time (rounded up to the fake's 20 ms frames), stop at its maximum silence."""
    if td.semantic:
        p = td.policy()
        return FakeVad(silence_ms=p.end_silence_ms, early_ms=p.early_ms)
    return FakeVad(silence_ms=td.silence_duration_ms, early_ms=min(200, td.silence_duration_ms // 2))


def make_stack(*, engine=None, asr=None, tts=None, partials: bool = True, turn_model=None, vad_factory=None,
               **kw) -> Stack:
    return Stack(engine=engine or FakeEngine(), asr=asr or FakeASR(), voices={"fake": tts or FakeTTS()},
                 vad_factory=vad_factory or _fake_vad, turn_model=turn_model or FakeTurnModel(),
                 chunker_factory=TextChunker, sampling_params=FakeSamplingParams,
                 transcriber_factory=FakeTranscriber if partials else None, **kw)


# -- signals ------------------------------------------------------------------------------------------
def speech_like(ms: int, rate_hz: int = 24_000) -> np.ndarray:
    """A loud 300 Hz tone: 'speech' to the energy VAD."""
    n = rate_hz * ms // 1000
    return (0.4 * np.sin(2 * np.pi * 300 * np.arange(n) / rate_hz)).astype(np.float32)


def silence(ms: int, rate_hz: int = 24_000) -> np.ndarray:
    return np.zeros(rate_hz * ms // 1000, np.float32)
