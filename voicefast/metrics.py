"""Per-turn timings (anchors defined in docs/server.md) and the Prometheus registry of the server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from voicefast import procstats

log = logging.getLogger("voicefast.metrics")


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000.0, 1)


@dataclass(slots=True)
class TurnTimings:
    """Monotonic wall times (s) of one turn; None where a stage did not run."""

    speech_end_s: float | None = None  # when the audio sample at the end of the user's speech arrived
    speech_end_audio_ms: int | None = None  # that sample as an offset into the session's input audio
    endpoint_s: float | None = None  # when the turn was confirmed (speech_stopped sent / commit received)
    asr_start_s: float | None = None
    asr_end_s: float | None = None
    llm_request_s: float | None = None
    llm_first_token_s: float | None = None
    tts_request_s: float | None = None  # first phrase handed to TTS
    tts_first_audio_s: float | None = None  # its first audio ready
    first_output_s: float | None = None  # first response.output_audio.delta (or output_text.delta) sent
    llm_tokens: int = 0
    llm_tok_s: float | None = None
    speculative: bool = False
    check_s: float | None = None  # the (speculative) work for this turn started: check / early silence
    turn_model_s: float | None = None  # the end-of-turn model's inference (submitted -> answered)
    turn_model_end_s: float | None = None
    turn_reason: str | None = None  # complete | max_silence | silence | max_utterance | commit | idle_timeout
    turn_silence_ms: int | None = None  # silence (input audio) after the end of speech when the turn was decided
    turn_checks: int = 0  # end-of-turn checks in this turn (one per pause)
    turn_probability: float | None = None  # the deciding check's end-of-turn probability
    turn_why: str | None = None  # why the last check did not end the turn (when it did not)

    def to_dict(self) -> dict:
        return {
            "end_of_turn_delay_ms": _ms(self.speech_end_s, self.endpoint_s),
            "asr_final_ms": _ms(self.asr_start_s, self.asr_end_s),
            "llm_ttft_ms": _ms(self.llm_request_s, self.llm_first_token_s),
            "tts_first_audio_ms": _ms(self.tts_request_s, self.tts_first_audio_s),
            "e2e_server_ms": _ms(self.speech_end_s, self.first_output_s),
            "speech_end_audio_ms": self.speech_end_audio_ms,
            "llm_tokens": self.llm_tokens,
            "llm_tok_s": None if self.llm_tok_s is None else round(self.llm_tok_s, 1),
            "speculative": self.speculative,
            "end_of_turn_reason": self.turn_reason,
            "end_of_turn_silence_ms": self.turn_silence_ms,
            "end_of_turn_checks": self.turn_checks,
            "turn_model_ms": _ms(self.turn_model_s, self.turn_model_end_s),
            "turn_probability": None if self.turn_probability is None else round(self.turn_probability, 3),
            "turn_not_done_because": self.turn_why,
            # the reply chain after the check: check -> transcript -> first token -> first phrase -> first audio
            "chain_asr_ms": _ms(self.check_s, self.asr_end_s),
            "chain_first_phrase_ms": _ms(self.llm_first_token_s, self.tts_request_s),
            "chain_ms": _ms(self.check_s, self.tts_first_audio_s),
        }


_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.active_sessions = Gauge("voicefast_active_sessions", "open realtime sessions", registry=r)
        self.sessions_total = Counter("voicefast_sessions_total", "sessions accepted", registry=r)
        self.rejected_total = Counter("voicefast_sessions_rejected_total", "connections refused", ["reason"],
                                      registry=r)
        self.responses_total = Counter("voicefast_responses_total", "responses by final status", ["status"],
                                       registry=r)
        self.errors_total = Counter("voicefast_client_errors_total", "error events sent", ["code"], registry=r)
        self.stage = {name: Histogram(f"voicefast_{name}_seconds", f"per-turn {name} (see docs/server.md)",
                                      buckets=_BUCKETS_S, registry=r)
                      for name in ("end_of_turn_delay", "asr_final", "llm_ttft", "tts_first_audio", "e2e")}
        self.engine = {name: Gauge(f"voicefast_engine_{name}", f"LLM engine {name}", registry=r)
                       for name in ("running", "waiting", "free_blocks", "total_blocks", "prefix_hit_tokens",
                                    "decode_tok_s", "steps", "step_seconds", "step_seqs")}
        self.process = {name: Gauge(f"voicefast_process_{name}", f"this process: {name} (read at scrape time)",
                                    registry=r)
                        for name in ("rss_bytes", "open_fds", "threads", "event_loop_tasks", "malloc_in_use_bytes",
                                     "malloc_free_bytes", "malloc_mmapped_bytes", "malloc_arena_bytes")}
        self._engine = None

    def bind_engine(self, engine) -> None:
        self._engine = engine

    def observe_turn(self, t: TurnTimings) -> None:
        d = t.to_dict()
        for name, key in (("end_of_turn_delay", "end_of_turn_delay_ms"), ("asr_final", "asr_final_ms"),
                          ("llm_ttft", "llm_ttft_ms"), ("tts_first_audio", "tts_first_audio_ms"),
                          ("e2e", "e2e_server_ms")):
            if d[key] is not None:
                self.stage[name].observe(max(0.0, d[key]) / 1000.0)

    def render(self) -> bytes:
        for name, v in procstats.snapshot().items():
            if name in self.process:
                self.process[name].set(v)
        if self._engine is not None:
            try:
                st = self._engine.stats()
                for name, g in self.engine.items():
                    v = getattr(st, name, None)
                    if v is not None:
                        g.set(v)
            except Exception:  # metrics must never break the scrape
                log.warning("engine stats failed", exc_info=True)
        return generate_latest(self.registry)
