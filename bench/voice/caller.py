"""One simulated caller: a microphone that never stops (utterance frames, then silence frames, at real-time
pace in 20 ms frames) and a listener that timestamps what comes back.

Anchor: the wall-clock time (time.perf_counter) at which the frame holding the utterance's last voiced sample
was sent, on the caller's real-time 20 ms clock (the frame's slot; the actual send lag is kept as
anchor_lag_ms). e2e_ms = first reply audio byte received - anchor. The server's speech_stopped event is
recorded (as speech_stopped_ms, relative to the anchor) but never used as the anchor.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field

from bench.voice.utterances import FRAME_MS, FRAME_SAMPLES, RATE_HZ, Utterance

STAGES = ("end_of_turn_delay_ms", "asr_final_ms", "llm_ttft_ms", "tts_first_audio_ms")
# The server's turn-taking and reply-chain figures (voicefast_timings), passed through when reported.
TURN_FIELDS = ("end_of_turn_silence_ms", "turn_model_ms", "chain_asr_ms", "chain_first_phrase_ms", "chain_ms")
SILENCE_FRAME = bytes(FRAME_SAMPLES * 2)
AUDIO_DELTA = ("response.output_audio.delta", "response.audio.delta")
TEXT_DELTA = ("response.output_audio_transcript.delta", "response.audio_transcript.delta",
              "response.output_text.delta", "response.text.delta")


@dataclass
class CallerConfig:
    url: str
    api_key: str | None = None
    turn_timeout_s: float = 60.0
    think_ms: int = 300  # pause after the reply has finished playing, before the caller speaks again
    open_timeout_s: float = 30.0
    turn_detection: dict | None = None  # sent in session.update (None: the server's default)
    mode: str = "default"  # label of turn_detection in the records


@dataclass
class TurnRecord:
    """What one turn measured. Times are milliseconds after the anchor (the true end of speech)."""

    session: int
    turn: int
    concurrency: int
    text: str
    utterance_ms: float = 0.0
    e2e_ms: float | None = None
    end_of_turn_delay_ms: float | None = None
    asr_final_ms: float | None = None
    llm_ttft_ms: float | None = None
    tts_first_audio_ms: float | None = None
    e2e_server_ms: float | None = None
    server_other_ms: float | None = None  # e2e_server_ms minus the four stages: time between/around them
    network_client_ms: float | None = None  # e2e_ms minus e2e_server_ms: transport, client and clock offsets
    tokens_per_s: float | None = None
    speculative: bool | None = None  # the server started ASR/LLM before the end of turn (stages overlap the window)
    llm_tokens: int | None = None
    wer: float | None = None
    transcript: str | None = None
    reply_text: str = ""
    reply_audio_ms: float = 0.0
    speech_stopped_ms: float | None = None  # client-side marks, for servers that report no timings
    transcript_ms: float | None = None
    first_text_ms: float | None = None
    response_done_ms: float | None = None
    anchor_lag_ms: float | None = None  # how late the speech-end frame actually went out vs its 20 ms slot
    early_audio: bool = False  # reply audio arrived before the caller finished speaking (premature endpoint)
    response_status: str | None = None  # response.done status: completed | incomplete (max tokens) | ...
    mode: str = "default"  # the session's turn detection ("server_vad 500", "semantic_vad auto", ...)
    kind: str = "complete"  # "complete" question or "paused" utterance (a thinking pause inside it)
    voice: str = "piper"
    pause_ms: int = 0
    cut: bool = False  # response.created before the true end of speech: the server cut the caller off
    end_of_turn_reason: str | None = None  # the server's: complete | max_silence | silence | max_utterance
    end_of_turn_silence_ms: float | None = None  # silence heard after the end of speech when the turn was decided
    turn_model_ms: float | None = None  # the end-of-turn model's time for the deciding check
    chain_asr_ms: float | None = None  # check -> transcript
    chain_first_phrase_ms: float | None = None  # first LLM token -> first phrase handed to TTS
    chain_ms: float | None = None  # check -> first TTS audio
    status: str = "ok"  # ok | timeout | error: ... | response cancelled/failed
    wall_time: float = field(default_factory=time.time)


class _Turn:
    def __init__(self, rec: TurnRecord):
        self.rec = rec
        self.t_anchor: float | None = None
        self.anchor_set = asyncio.Event()
        self.t_first_audio: float | None = None
        self.audio_bytes = 0
        self.transcripts: list[str] = []
        self.done = asyncio.Event()
        self.response_started = False

    def rel_ms(self, t: float) -> float | None:
        return None if self.t_anchor is None else (t - self.t_anchor) * 1000.0


class Caller:
    """`await Caller(cfg, session_id).run(utterances, turns, concurrency_fn, on_turn, wer_fn)`."""

    def __init__(self, cfg: CallerConfig, session_id: int, first_utterance: int | None = None):
        self.cfg, self.session_id = cfg, session_id
        # Which utterance its first turn speaks (then the next ones): callers of different turn modes in one run
        # speak the same utterances.
        self.first_utterance = session_id if first_utterance is None else first_utterance
        self._mic: asyncio.Queue[bytes] = asyncio.Queue()  # utterances queued for the mic
        self._mic_turn: _Turn | None = None
        self._turn: _Turn | None = None
        self.errors: list[str] = []

    async def _connect(self):
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else None
        return await connect(self.cfg.url, subprotocols=["realtime"], additional_headers=headers,
                             max_size=None, open_timeout=self.cfg.open_timeout_s, compression=None)

    async def run(self, utterances: list[Utterance], turns: int, concurrency_fn, on_turn, wer_fn) -> list[TurnRecord]:
        ws = await self._connect()
        records: list[TurnRecord] = []
        try:
            audio_in: dict = {"format": {"type": "audio/pcm", "rate": RATE_HZ}}
            if self.cfg.turn_detection is not None:
                audio_in["turn_detection"] = self.cfg.turn_detection
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "output_modalities": ["audio"],
                "audio": {"input": audio_in, "output": {"format": {"type": "audio/pcm", "rate": RATE_HZ}}}}}))
            mic = asyncio.create_task(self._mic_loop(ws))
            listener = asyncio.create_task(self._listen(ws))
            try:
                for k in range(turns):
                    utt = utterances[(self.first_utterance + k) % len(utterances)]
                    rec = TurnRecord(self.session_id, k, concurrency_fn(), utt.text, utterance_ms=utt.duration_ms,
                                     mode=self.cfg.mode, kind="paused" if utt.pause_ms else "complete",
                                     voice=utt.source, pause_ms=utt.pause_ms)
                    await self._one_turn(utt, rec, listener)
                    if rec.transcript is not None:
                        rec.wer = round(float(wer_fn(utt.text, rec.transcript)), 4)
                    records.append(rec)
                    on_turn(rec)
                    if rec.status != "ok":
                        break
            finally:
                mic.cancel()
                listener.cancel()
                await asyncio.gather(mic, listener, return_exceptions=True)
        finally:
            await ws.close()
        return records

    async def _one_turn(self, utt: Utterance, rec: TurnRecord, listener: asyncio.Task) -> None:
        turn = _Turn(rec)
        self._turn = turn
        await self._mic.put((utt, turn))
        status = await wait_turn(turn.done, listener, self.cfg.turn_timeout_s + utt.duration_ms / 1000)
        if status is not None:
            rec.status = status
        # the caller hears the reply out (playback starts at the first byte), then pauses before speaking again
        if turn.t_first_audio is not None:
            t_end = turn.t_first_audio + turn.audio_bytes / 2 / RATE_HZ
            rec.reply_audio_ms = round(turn.audio_bytes / 2 / RATE_HZ * 1000, 1)
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()) + self.cfg.think_ms / 1000)
        self._turn = None

    async def _mic_loop(self, ws) -> None:
        """Sends one 20 ms frame per 20 ms of wall clock, forever: queued utterances, else silence."""
        t_next = time.perf_counter()
        frames: list[bytes] = []
        last_speech_frame = -1
        turn: _Turn | None = None
        i = 0
        while True:
            if not frames and not self._mic.empty():
                utt, turn = self._mic.get_nowait()
                frames = [utt.pcm[j:j + FRAME_SAMPLES * 2] for j in range(0, len(utt.pcm), FRAME_SAMPLES * 2)]
                last_speech_frame = (utt.speech_end_sample - 1) // FRAME_SAMPLES
                i = 0
            frame = frames[i] if frames else SILENCE_FRAME
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(frame).decode()}))
            if frames:
                if i == last_speech_frame and turn is not None:
                    # The anchor is this frame's real-time send time (its slot on the 20 ms clock). If the loop ran
                    # late, the frames after it catch up, so the server still hears the silence on schedule;
                    # the actual lag is kept for diagnostics.
                    turn.t_anchor = t_next
                    turn.rec.anchor_lag_ms = round((time.perf_counter() - t_next) * 1000, 2)
                    turn.anchor_set.set()
                i += 1
                if i == len(frames):
                    frames, turn = [], None
            t_next += FRAME_MS / 1000
            if t_next < time.perf_counter() - 0.2:  # fell far behind (overloaded client): don't burst
                t_next = time.perf_counter()

    async def _listen(self, ws) -> None:
        async for raw in ws:
            now = time.perf_counter()
            ev = json.loads(raw)
            t = ev.get("type", "")
            turn = self._turn
            if t == "error":
                self.errors.append(json.dumps(ev.get("error", ev))[:300])
            if turn is None:
                continue
            rec = turn.rec
            if t in AUDIO_DELTA:
                if turn.t_anchor is None:
                    rec.early_audio = True
                    continue
                if turn.t_first_audio is None:
                    turn.t_first_audio = now
                    rec.e2e_ms = round(turn.rel_ms(now), 2)
                turn.audio_bytes += len(base64.b64decode(ev.get("delta", "")))
            elif t in TEXT_DELTA and turn.t_anchor is not None:
                if rec.first_text_ms is None:
                    rec.first_text_ms = round(turn.rel_ms(now), 2)
                rec.reply_text += ev.get("delta", "")
            elif t == "response.created" and turn.t_anchor is None:
                rec.cut = True  # the reply started before the caller had finished speaking
            elif t == "input_audio_buffer.speech_stopped" and turn.t_anchor is not None:
                rec.speech_stopped_ms = round(turn.rel_ms(now), 2)
            elif t == "conversation.item.input_audio_transcription.completed":
                turn.transcripts.append(ev.get("transcript", "").strip())
                rec.transcript = " ".join(s for s in turn.transcripts if s)
                if turn.t_anchor is not None:
                    rec.transcript_ms = round(turn.rel_ms(now), 2)
            elif t == "response.done" and turn.t_first_audio is not None:
                resp = ev.get("response", {})
                timings = (resp.get("metadata") or {}).get("voicefast_timings") or {}
                for k in STAGES:
                    rec.__dict__[k] = _num(timings.get(k))
                rec.e2e_server_ms = _num(timings.get("e2e_server_ms"))
                rec.tokens_per_s = _num(timings.get("llm_tok_s"))
                rec.llm_tokens = timings.get("llm_tokens")
                rec.speculative = timings.get("speculative")
                rec.end_of_turn_reason = timings.get("end_of_turn_reason")
                for k in TURN_FIELDS:
                    rec.__dict__[k] = _num(timings.get(k))
                rec.response_done_ms = round(turn.rel_ms(now), 2)
                stages = [rec.__dict__[k] for k in STAGES]
                if rec.e2e_server_ms is not None:
                    rec.network_client_ms = round(rec.e2e_ms - rec.e2e_server_ms, 2)
                    if None not in stages:
                        rec.server_other_ms = round(rec.e2e_server_ms - sum(stages), 2)
                rec.response_status = resp.get("status")
                if rec.response_status not in (None, "completed", "incomplete"):  # incomplete: hit max tokens
                    rec.status = f"response {rec.response_status}"
                turn.done.set()
            elif t == "response.done" and turn.t_anchor is not None:
                resp = ev.get("response", {})
                if resp.get("status") != "cancelled":  # a cancelled (e.g. speculative) response: wait for the next
                    rec.status = f"error: response {resp.get('status')} without reply audio " \
                                 f"{json.dumps(resp.get('status_details'))[:200]}"
                    turn.done.set()


async def wait_turn(done: asyncio.Event, listener: asyncio.Task, timeout_s: float) -> str | None:
    """Wait for a turn's end: None when it ended, else "timeout" or why the listener stopped."""
    waiter = asyncio.create_task(done.wait())
    finished, _ = await asyncio.wait({waiter, listener}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if listener in finished:
        return _closed_status(listener.exception() if not listener.cancelled() else None)
    return "timeout" if not finished else None


def _closed_status(exc: BaseException | None) -> str:
    from websockets.exceptions import ConnectionClosed

    if exc is None:
        return "error: connection closed by the server"
    if isinstance(exc, ConnectionClosed):
        rc = exc.rcvd
        return "error: connection closed by the server" + (f" ({rc.code} {rc.reason})".rstrip() if rc else "")
    return f"error: listener stopped ({type(exc).__name__}: {exc})"


def _num(v) -> float | None:
    return None if v is None else round(float(v), 2)
