"""The shared models every session uses (one LLM engine, one ASR, the TTS voices, the VAD model) behind the
small duck-typed surface the session needs. `tests/fakes.py` builds one from fakes; `voicefast.loader`
builds the real one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Stack:
    engine: object  # AsyncLLMEngine: generate(params, messages=, request_id=), abort(id), stats(), tokenizer
    asr: object  # transcribe_async(x16k: float32) -> str
    voices: dict[str, object]  # name -> TTS with .sample_rate_hz and .synthesize(text) -> Iterator[float32]
    vad_factory: Callable[[object], object]  # TurnDetection -> stream with .process(x16k) -> list[VadEvent]
    chunker_factory: Callable[[], object]  # -> .push(delta) -> list[str]; .flush() -> list[str]
    sampling_params: Callable[..., object]  # SamplingParams(temperature=, max_tokens=, ...)
    transcriber_factory: Callable[[], object] | None = None  # streaming partials: feed(x16k); async partial()
    max_model_len: int = 2048
    tts_workers: int = 1
    description: dict[str, str] = field(default_factory=dict)  # stage -> what is loaded (for logs/healthz)
    _tts_pool: ThreadPoolExecutor | None = None

    @property
    def voice_names(self) -> list[str]:
        return list(self.voices)

    def count_tokens(self, text: str) -> int:
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None:
            return len(text) // 3 + 1
        return len(tok.encode(text))

    async def synthesize(self, voice: str, text: str, speed: float = 1.0) -> AsyncIterator[np.ndarray]:
        """Run the blocking TTS iterator on the TTS pool; chunks arrive here as they are made. Closing this
        iterator early (barge-in) stops the worker at its next chunk."""
        if self._tts_pool is None:
            self._tts_pool = ThreadPoolExecutor(self.tts_workers, thread_name_prefix="voicefast-tts")
        tts = self.voices.get(voice) or next(iter(self.voices.values()))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                chunks = tts.synthesize(text) if speed == 1.0 else tts.synthesize(text, speaking_rate=speed)
                for chunk in chunks:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(q.put_nowait, ("chunk", chunk))
                loop.call_soon_threadsafe(q.put_nowait, ("end", None))
            except BaseException as e:  # forwarded to the awaiting coroutine
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(q.put_nowait, ("error", e))

        fut = loop.run_in_executor(self._tts_pool, work)
        try:
            while True:
                kind, val = await q.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise val
                yield np.asarray(val, dtype=np.float32)
        finally:
            stop.set()
            fut.cancel()

    def shutdown(self) -> None:
        if self._tts_pool is not None:
            self._tts_pool.shutdown(wait=False, cancel_futures=True)
        sd = getattr(self.engine, "shutdown", None)
        if sd is not None:
            sd()
