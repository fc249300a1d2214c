"""The turn-taking half of a Session: audio in -> VAD -> voicefast.turns' decisions carried out (checks with the ASR
and the end-of-turn model, speculative replies, speech_started/stopped, commits, barge-in, idle timeout).

A mixin of voicefast.session.Session, split off along the concern: it uses the session's input buffer (`inbuf`),
`emit`, `_spawn`, `_commit`, `_transcribe`, `_start_response`, `active`, `cfg`, `opts`, `stack` and `conv`, and owns
`turns` (the sans-I/O TurnTaker), `work` (voicefast.turn_work) and the VAD stream."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from voicefast.asr_context import asr_prompt
from voicefast.conversation import new_id
from voicefast.errors import ProtocolError
from voicefast.metrics import TurnTimings
from voicefast.turns import (
    Announce,
    AskModel,
    Begin,
    CancelCheck,
    DropUtterance,
    EndTurn,
    IdleTimeout,
    RestartVad,
    StartCheck,
    TurnTaker,
)

log = logging.getLogger("voicefast.session")
RATE_HZ = 16_000


class SessionTurns:
    def _new_turn_detection(self) -> None:
        td = self.cfg.turn_detection
        if td is not None and td.semantic and getattr(self.stack, "turn_model", None) is None:
            raise ProtocolError("semantic_vad needs the end-of-turn model, which this server has not loaded; use "
                                "server_vad", param="session.audio.input.turn_detection.type")
        self._vad = self.stack.vad_factory(td) if td is not None else None
        self.turns = TurnTaker(td.policy(speculative=self.opts.speculative_start,
                                         barge_in_min_ms=self.opts.barge_in_min_ms,
                                         backchannel_max_ms=self.opts.backchannel_max_ms,
                                         witness=self.opts.turn_witness,
                                         **self.opts.turn_policy_kw(),
                                         max_utterance_ms=self.max_utterance_samples * 1000 // RATE_HZ),
                               new_id=lambda: new_id("item")) if td is not None else None
        self._vad_base = self.in_samples

    # -- audio in, turn detection ----------------------------------------------------------------------
    def feed_audio(self, x: np.ndarray, *, event_start: bool = True) -> None:
        """float32 samples at the input format's rate. A big append arrives in slices (voicefast/intake.py):
        event_start=False for all but its first, so one append is told `input_audio_buffer_full` at most once."""
        x16 = self._take_audio(x, event_start)
        if x16 is not None:
            self._judge_audio(self._vad.process(x16))

    async def feed_audio_async(self, x: np.ndarray, *, event_start: bool = True) -> None:
        """feed_audio with the VAD model run on the stack's VAD threads while the event loop serves other
        sessions (the model is most of a session's per-chunk work: ~60-140 us per 32 ms window). Same result as
        feed_audio: the caller (the connection's reader) awaits this before it takes the session's next message,
        so the VAD stream sees the audio in order, and nothing else touches the stream meanwhile. A chunk that
        completes no VAD window is judged inline."""
        x16 = self._take_audio(x, event_start)
        if x16 is None:
            return
        vad, pool = self._vad, self.stack.vad_executor
        if pool is None or not vad.judges(len(x16)):
            self._judge_audio(vad.process(x16))
            return
        events = await asyncio.wrap_future(pool.submit(vad.process, x16))
        if self.closed or vad is not self._vad:  # closed, or the turn detection was replaced meanwhile
            return
        self._judge_audio(events)

    def _take_audio(self, x: np.ndarray, event_start: bool) -> np.ndarray | None:
        """Resample into the input buffer, trim it, feed the streaming partials. Returns the 16 kHz samples the VAD
        must judge (None: nothing new, or no turn detection)."""
        if event_start:
            self._full_said = False
        x16 = self._resampler.process(x)
        if not len(x16):
            return None
        cap = int(self.opts.max_input_buffer_s * RATE_HZ)
        self.inbuf.append(x16, time.monotonic())
        td = self.cfg.turn_detection
        if td is None:
            if self.in_samples - self.inbuf.start > cap:  # manual mode: keep the newest audio, say so
                self.inbuf.trim(self.in_samples - cap)
                if not self._full_said:
                    self._full_said = True
                    self.emit(ProtocolError("input audio buffer is full; the oldest audio was dropped",
                                            code="input_audio_buffer_full").to_event())
            return None
        if not self.turns.in_turn:
            self.inbuf.trim(self.in_samples - self._pad_samples() - RATE_HZ // 2)
        elif self.in_samples - self.inbuf.start > cap:
            self.inbuf.trim(self.in_samples - cap)
        if self.work.utt is not None:
            self.work.feed_partials(x16, speaking=self.turns.speaking)
        return x16

    def _judge_audio(self, events: list) -> None:
        """The VAD's events for the audio just taken, then the turn module's audio clock."""
        for ev in events:
            self.turns.responding = self._responding()  # an event may have just started or ended a reply
            self._apply(self.turns.on_vad(ev.kind, self._vad_base + ev.sample, self.in_samples))
        self.turns.responding = self._responding()
        self._apply(self.turns.on_audio(self.in_samples))

    def _pad_samples(self) -> int:
        td = self.cfg.turn_detection
        return int(td.prefix_padding_ms * RATE_HZ / 1000) if td is not None else 0

    def _responding(self) -> bool:
        return self.active is not None and self.active.status == "in_progress" and not self.active.done.is_set()

    def _apply(self, actions: list) -> None:
        """Carry out the turn module's decisions (voicefast.turns), in order."""
        for a in actions:
            if isinstance(a, Begin):
                self.work.begin(a.item_id, self.inbuf.slice(a.start_sample - self._pad_samples()))
                if a.announced:
                    self._speech_started(a.item_id, a.start_sample)
            elif isinstance(a, Announce):
                self._speech_started(a.item_id, a.start_sample)
                r = self.active
                if a.interrupt and r is not None and r.status == "in_progress":
                    log.info("barge-in: cancelling %s after %d ms of speech", r.id,
                             self.ms(self.in_samples - a.start_sample))
                    r.cancel("turn_detected")
            elif isinstance(a, StartCheck):
                self._start_check(a)
            elif isinstance(a, AskModel):
                self._ask_model(a)
            elif isinstance(a, CancelCheck):
                self.work.cancel_check(a.check_id)
            elif isinstance(a, EndTurn):
                self._end_turn(a)
            elif isinstance(a, DropUtterance):
                self.work.drop_utterance(a.item_id)
            elif isinstance(a, IdleTimeout):
                self._idle_timeout(a)
            elif isinstance(a, RestartVad):
                log.info("an utterance reached max_utterance_s (%g s): turn ended there", self.opts.max_utterance_s)
                self._vad = self.stack.vad_factory(self.cfg.turn_detection)
                self._vad_base = self.in_samples

    def _partial_transcript(self, item_id: str, delta: str) -> None:
        self.emit({"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
                   "content_index": 0, "delta": delta})
        self._warm_reply_prefix()

    def _speech_started(self, item_id: str, start_sample: int) -> None:
        self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": self.ms(start_sample),
                   "item_id": item_id})
        self._warm_reply_prefix()

    def _start_check(self, a: StartCheck) -> None:
        """A pause (or a candidate barge-in) to judge: transcribe the turn so far and, for an end-of-turn check, ask
        the end-of-turn model on the same audio; a speculative reply starts on that transcript, held."""
        audio = self.inbuf.slice(a.start_sample - self._pad_samples(), a.end_sample)
        t = TurnTimings(speculative=a.speculate, check_s=time.monotonic())
        # replace: a newer check of this utterance supersedes this one's final while it is still queued
        asr = self._spawn(self._transcribe(audio, t, replace=a.item_id), f"asr-{a.purpose}")
        c = self.work.add_check(a, asr, t)
        asr.add_done_callback(lambda task, cid=a.check_id: self._check_transcribed(cid, task))
        if a.use_model:
            self._judge_turn(c, audio)
        if a.speculate:
            c.spec = self._start_response({}, t, asr, held=True, user_item_id=a.item_id)

    def _ask_model(self, a: AskModel) -> None:
        """The check's end-of-turn model, later than its transcript (TurnPolicy.transcript_ms): on the audio with
        the longer silence it needs, while the ASR final and the held reply are already under way."""
        c = self.work.checks.get(a.check_id)
        if c is not None:
            self._judge_turn(c, self.inbuf.slice(a.start_sample - self._pad_samples(), a.end_sample))

    def _judge_turn(self, c, audio: np.ndarray) -> None:
        c.t.turn_model_s = time.monotonic()
        fut = asyncio.wrap_future(self.stack.turn_model.submit(audio))
        c.model = fut
        fut.add_done_callback(lambda f, cid=c.action.check_id: self._check_judged(cid, f))

    def _check_transcribed(self, check_id: int, task: asyncio.Task) -> None:
        if task.cancelled() or self.closed or self.work.checks.get(check_id) is None:
            return
        if task.exception() is not None:
            self._apply(self.turns.on_transcript(check_id, None))
            return
        text = task.result()
        self._apply(self.turns.on_transcript(check_id, text, getattr(text, "last_word_probability", None)))

    def _check_judged(self, check_id: int, fut: asyncio.Future) -> None:
        c = self.work.checks.get(check_id)
        if fut.cancelled() or self.closed or c is None:
            return
        c.t.turn_model_end_s = time.monotonic()
        if fut.exception() is not None:
            log.warning("end-of-turn model failed", exc_info=fut.exception())
        self._apply(self.turns.on_verdict(check_id, None if fut.exception() is not None else fut.result()))

    def _end_turn(self, a: EndTurn) -> None:
        c = self.work.take_check(a.check_id) if a.check_id is not None else None
        self.work.drop_utterance(a.item_id)  # the partials and any other check of this turn
        t = c.t if c is not None else TurnTimings()
        t.speech_end_s = self.inbuf.arrival_time(a.end_sample)
        t.speech_end_audio_ms = self.ms(a.end_sample)
        t.endpoint_s = time.monotonic()
        t.turn_reason, t.turn_silence_ms, t.turn_checks = a.reason, a.silence_ms, a.checks
        if a.verdict is not None:
            t.turn_probability = a.verdict.probability if a.verdict.probability == a.verdict.probability else None
            t.turn_why = a.verdict.why or None
        self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self.ms(a.end_sample),
                   "item_id": a.item_id})
        audio = self.inbuf.slice(a.start_sample - self._pad_samples())
        asr = c.asr if c is not None else self._spawn(self._transcribe(audio, t), "asr-final")
        spec = c.spec if c is not None else None
        pending = self._commit(a.item_id, audio, t, asr)
        self.inbuf.trim(self.in_samples)
        if not a.create_response:
            if spec is not None:
                spec.discard()
            return
        if spec is None:
            self._start_response({}, t, None, held=False)
            return
        self._supersede(spec)
        self.active = spec
        # The user transcript goes out before the response that answers it.
        if pending is None:
            spec.release()
        else:
            pending.add_done_callback(lambda _: spec.release())

    def _idle_timeout(self, a: IdleTimeout) -> None:
        """OpenAI's idle timeout: the silence since the last reply finished playing becomes a user item, and the
        model answers it (typically prompting the user to go on)."""
        self.emit({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": self.ms(a.start_sample),
                   "audio_end_ms": self.ms(a.end_sample), "item_id": a.item_id})
        audio = self.inbuf.slice(a.start_sample, a.end_sample)
        t = TurnTimings(speech_end_s=time.monotonic(), speech_end_audio_ms=self.ms(a.end_sample),
                        endpoint_s=time.monotonic(), turn_reason="idle_timeout")
        self._commit(a.item_id, audio, t, self._spawn(self._transcribe(audio, t), "asr-idle"))
        self.inbuf.trim(self.in_samples)
        if self.cfg.turn_detection.create_response and not self._responding():
            self._start_response({}, t, None, held=False, answer_silence=True)

    def _drop_utterance(self) -> None:
        for a in self.turns.reset() if self.turns is not None else []:
            self.work.cancel_check(a.check_id)
        self.work.drop_utterance(None)

    def _asr_prompt(self) -> str | None:
        """Whisper's prompt for this session's next decode: the client's input_audio_transcription.prompt, with
        the conversation's context added (names from the instructions, the last reply) unless the server turned
        that off (asr_context_prompt)."""
        client = self.cfg.transcription.prompt if self.cfg.transcription is not None else ""
        if not self.opts.asr_context_prompt:
            return client or None
        last = next((it.text for it in reversed(self.conv.items) if it.role == "assistant" and it.text), "")
        return asr_prompt(instructions=self.cfg.instructions, last_assistant=last, client_prompt=client) or None
