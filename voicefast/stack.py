"""The shared models every session uses (one LLM engine, one ASR, the TTS voices, the VAD model) behind the
small duck-typed surface the session needs. `tests/fakes.py` builds one from fakes; `voicefast.loader`
builds the real one."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from audio.speech_out import SpeechOutput
from audio.tts_pool import DeadlinePool


@dataclass
class Stack:
    engine: object  # AsyncLLMEngine: generate(params, messages=, request_id=), abort(id), stats(), tokenizer
    asr: object  # transcribe_async(x16k: float32, *, owner=, replace=, request=DecodeRequest) -> Transcript
    voices: dict[str, object]  # name -> TTS: .sample_rate_hz, .synthesize(text, speaking_rate=None) -> Iterator[f32]
    vad_factory: Callable[[object], object]  # TurnDetection -> stream with .process(x16k) -> list[VadEvent]
    chunker_factory: Callable[[], object]  # -> TextChunker (its first phrase is short: speech starts early)
    sampling_params: Callable[..., object]  # SamplingParams(temperature=, max_tokens=, grammar=None)
    # streaming partials: factory(submit_kw=...) -> .feed(x16k), async .partial(); submit_kw reaches asr.submit
    transcriber_factory: Callable[..., object] | None = None
    turn_model: object | None = None  # end-of-turn model (semantic_vad): submit(x16k) -> Future[float probability]
    max_model_len: int = 2048
    tts_workers: int = 1
    vad_threads: int = 0  # threads running the VAD model off the event loop (0: on the event loop)
    description: dict[str, str] = field(default_factory=dict)  # stage -> what is loaded (for logs/healthz)
    _tts_pool: DeadlinePool | None = None
    _vad_pool: ThreadPoolExecutor | None = None

    @property
    def voice_names(self) -> list[str]:
        return list(self.voices)

    @property
    def asr_languages(self) -> tuple[str, ...] | None:
        """Languages the ASR transcribes (None: not known, not checked)."""
        return getattr(self.asr, "languages", None)

    def count_tokens(self, text: str) -> int:
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None:
            return len(text) // 3 + 1
        return len(tok.encode(text))

    @property
    def tts_executor(self) -> DeadlinePool:
        """The TTS worker pool (`tts_workers` threads, shared by every session, earliest deadline first: a
        response's first phrase before other responses' later ones), started on first use."""
        if self._tts_pool is None:
            self._tts_pool = DeadlinePool(self.tts_workers, name="voicefast-tts")
        return self._tts_pool

    @property
    def vad_executor(self) -> ThreadPoolExecutor | None:
        """The VAD pool (`vad_threads` threads, shared by every session; onnxruntime releases the GIL while the
        model runs), started on first use; None when the VAD runs on the event loop."""
        if self._vad_pool is None and self.vad_threads > 0:
            self._vad_pool = ThreadPoolExecutor(self.vad_threads, thread_name_prefix="voicefast-vad")
        return self._vad_pool

    def speech_output(self, voice: str, out_rate_hz: int, frame_ms: int, speed: float = 1.0,
                      *, pad_last_frame: bool = False) -> SpeechOutput:
        """One response's speech: text deltas in, `frame_ms` frames at `out_rate_hz` out, synthesized with
        `voice` (the first voice if unknown) on the TTS pool; speed 1.0 keeps the voice's own rate."""
        tts = self.voices.get(voice) or next(iter(self.voices.values()))
        return SpeechOutput(tts, out_rate_hz, frame_ms, chunker=self.chunker_factory(),
                            speaking_rate=None if speed == 1.0 else speed, executor=self.tts_executor,
                            pad_last_frame=pad_last_frame)

    def shutdown(self) -> None:
        if self._tts_pool is not None:
            self._tts_pool.shutdown(wait=False, cancel_futures=True)
        if self._vad_pool is not None:
            self._vad_pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.turn_model, "close", None)
        if close is not None:
            close()
        sd = getattr(self.engine, "shutdown", None)
        if sd is not None:
            sd()
