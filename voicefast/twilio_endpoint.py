"""/twilio: the I/O adapter that puts a phone call (Twilio Media Streams) on the same Session class as
/v1/realtime. Per connection: a reader feeds Twilio frames to the sans-I/O TwilioCall, a sender drains a bounded
queue of Twilio frames, a timer task runs the call's deadlines (barge-in guard, keypad pause, re-prompt), and one
task per prompt plays synthesized phrases paced to real time. The session's emitted events go to the call, whose
Twilio frames are queued at once (audio never waits on a task switch); its actions run outside session code, so
the session is never re-entered from its own emit.

server.py routes the path here (check_handshake on the upgrade, handle on the connection); everything else about
phone calls lives in the twilio* modules."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from prometheus_client import Counter
from websockets.exceptions import ConnectionClosed

from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat
from voicefast.http import HttpReply
from voicefast.limits import receive_timeout
from voicefast.personas import DEFAULT_NAME, Persona, load_personas
from voicefast.playout import PlayoutClock
from voicefast.session import Session
from voicefast.session_config import Transcription
from voicefast.twilio_auth import check_upgrade
from voicefast.twilio_call import CallSettings, EndCall, FeedAudio, OpenSession, Say, SessionInput, StopSay, TwilioCall
from voicefast.twilio_setup import CallSetup, Catalog

log = logging.getLogger("voicefast.twilio")
PHONE_FORMAT = AudioFormat("audio/pcmu")  # what the session speaks on a phone call: G.711 mu-law, 8 kHz
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Proto")
MAX_LOGGED_NOTES = 5  # ignored-frame notes logged per call at WARNING; the rest at DEBUG
START_TIMEOUT_S = 10.0  # a connection that never sends `start` is not a call


def asr_language(asr) -> tuple[str | None, frozenset[str] | None]:
    """(the one language the ASR transcribes, or None for a multilingual model; the languages it knows)."""
    lang = getattr(asr, "language", "en")  # an ASR that does not say is taken to be English-only
    if lang is not None:
        return lang, None
    try:
        from faster_whisper.tokenizer import _LANGUAGE_CODES
    except ImportError:
        return None, None
    return None, frozenset(_LANGUAGE_CODES)


class PromptCache:
    """Fixed phrases (greeting, busy, re-prompt) as mu-law chunks, synthesized once per (voice, text) on the
    shared TTS pool and kept in a small LRU: an "all lines are busy" at capacity costs no synthesis."""

    def __init__(self, stack, chunk_ms: int, max_entries: int = 32):
        self.stack, self.chunk_ms, self.max_entries = stack, chunk_ms, max_entries
        self._cache: OrderedDict[tuple[str, str], list[tuple[bytes, int]]] = OrderedDict()

    async def frames(self, voice: str, text: str) -> AsyncIterator[tuple[bytes, int]]:
        """(mu-law chunk of chunk_ms, characters of `text` spoken by its end), as soon as each is synthesized."""
        from audio.codecs import ulaw_encode

        key = (voice, text)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            for item in hit:
                yield item
            return
        speech = self.stack.speech_output(voice, PHONE_FORMAT.rate_hz, self.chunk_ms)
        got = []
        try:
            speech.say(text)
            async for f in speech.frames():
                item = (ulaw_encode(f.pcm), f.text_end)
                got.append(item)
                yield item
        finally:
            await speech.aclose()
        self._cache[key] = got
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)


class TwilioEndpoint:
    def __init__(self, server):
        """`server`: the RealtimeServer (its stack, opts, defaults, sessions set and metrics are shared)."""
        self.server = server
        opts, stack = server.opts, server.stack
        voices = stack.voice_names
        default = Persona(DEFAULT_NAME, server.defaults.instructions,
                          voice=server.defaults.voice if server.defaults.voice in voices else None)
        lang, langs = asr_language(stack.asr)
        self.catalog = Catalog(personas=load_personas(opts.personas_dir, default, voices), voices=voices,
                               asr_language=lang, asr_languages=langs, default_greeting=opts.twilio_greeting,
                               secret=opts.twilio_secret or None)
        self.settings = CallSettings(barge_in_min_ms=opts.barge_in_min_ms, dtmf_pause_ms=opts.twilio_dtmf_pause_ms,
                                     reprompt_after_s=opts.twilio_reprompt_after_s,
                                     max_reprompts=opts.twilio_max_reprompts, reprompt_text=opts.twilio_reprompt_text,
                                     goodbye_text=opts.twilio_goodbye_text, busy_text=opts.twilio_busy_text)
        # The session's output frame is one mark's worth of audio: the precision of what-was-heard.
        self.session_opts = dataclasses.replace(opts, output_frame_ms=opts.twilio_chunk_ms)
        self.prompts = PromptCache(stack, opts.twilio_chunk_ms)
        self.calls: set[TwilioCall] = set()
        self.calls_total = Counter("voicefast_twilio_calls_total", "phone calls by outcome", ["outcome"],
                                   registry=server.metrics.registry)

    def exposed(self, headers) -> bool:
        """Reachable by others: API keys configured, a non-loopback host, or a request relayed by a proxy
        (a loopback server behind a public TLS proxy is exposed too)."""
        opts = self.server.opts
        return bool(opts.api_keys) or not opts.loopback_only or any(h in headers for h in PROXY_HEADERS)

    def _verdict(self, path: str, headers):
        opts = self.server.opts
        return check_upgrade(path, headers.get("Host"), headers.get("X-Twilio-Signature"),
                             secret=opts.twilio_secret or None, auth_token=opts.twilio_auth_token or None,
                             public_url=opts.twilio_public_url, exposed=self.exposed(headers))

    def check_handshake(self, request) -> HttpReply | None:
        """None: let the upgrade proceed; else the HTTP reply refusing it."""
        v = self._verdict(request.path, request.headers)
        if not v.ok:
            self.server.metrics.rejected_total.labels("twilio_" + v.code).inc()
            log.warning("refused a /twilio upgrade: %s", v.code)
            return HttpReply.json({"error": {"type": "invalid_request_error", "code": v.code, "message": v.message}},
                                  v.status)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return HttpReply.text("this endpoint speaks WebSocket (Twilio Media Streams)", 426)
        return None

    async def handle(self, ws) -> None:
        call = TwilioCall(self.settings, self.catalog,
                          secret_verified=self._verdict(ws.request.path, ws.request.headers).secret_verified)
        self.calls.add(call)
        try:
            await _Connection(self, ws, call).run()
        finally:
            self.calls.discard(call)


class _Connection:
    def __init__(self, ep: TwilioEndpoint, ws, call: TwilioCall):
        self.ep, self.ws, self.call = ep, ws, call
        self.opts = ep.server.opts
        self.session: Session | None = None
        self.outq: asyncio.Queue[str] = asyncio.Queue(maxsize=self.opts.max_send_queue)
        self.wake = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self.prompt_tasks: dict[str, asyncio.Task] = {}
        self.closing: asyncio.Task | None = None
        self.notes = 0
        self.name = "call"

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop(), name="twilio-sender")
        timers = asyncio.create_task(self._timer_loop(), name="twilio-timers")
        started = time.monotonic()
        try:
            while self.call.state != "ended":
                # Twilio sends `start` right after connecting, then media every 20 ms until `stop`.
                waiting = self.call.state == "new"
                limit_s, why = receive_timeout(time.monotonic(), started, idle_timeout_s=self.opts.idle_timeout_s,
                                               max_session_s=self.opts.max_session_s)
                if waiting and (why != "session_expired" or limit_s > START_TIMEOUT_S):
                    limit_s, why = min(START_TIMEOUT_S, limit_s), "no_start"
                try:
                    if limit_s <= 0:
                        raise TimeoutError
                    frame = await asyncio.wait_for(self.ws.recv(), limit_s)
                except TimeoutError:
                    self._timed_out(why, limit_s)
                    break
                note = self.call.receive(frame, time.monotonic())
                if note is not None:
                    self._note(note)
                await self._drain()
        except ConnectionClosed:
            pass
        except Exception:
            log.error("%s failed", self.name, exc_info=True)
            self._close(1011, "internal error")
        finally:
            await self._finish(sender, timers)

    def _timed_out(self, why: str, limit_s: float) -> None:
        if why == "session_expired":  # the same abuse limit as a Realtime session's (ServerConfig.max_session_s)
            log.info("%s reached max_session_s %.0f s: closing", self.name, self.opts.max_session_s)
            self._close(1008, "maximum session length reached")
        elif why == "no_start":
            log.info("%s: no start for %.0f s: closing", self.name, limit_s)
            self._close(1008, "no start message")
        else:
            log.info("%s: no message for %.0f s: closing", self.name, limit_s)
            self._close(1000, "idle timeout")

    async def _finish(self, *tasks: asyncio.Task) -> None:
        """Everything this call started ends here: prompts, the session (engine request aborted), the tasks."""
        for t in self.prompt_tasks.values():
            t.cancel()
        await asyncio.gather(*self.prompt_tasks.values(), return_exceptions=True)
        if self.session is not None:
            await self.session.close()
            self.ep.server.sessions.discard(self.session)
            self.ep.server.unlink(self.session)
            self.ep.server.metrics.active_sessions.dec()
        if self.closing is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.closing, 5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.ws.close(1000, "call ended")
        st = self.call.stats | {"clears": self.call.playback.clears, "truncations": len(self.call.truncations),
                                "echoes_ignored": self.call.playback.echoes_ignored}
        log.info("%s ended (%s)", self.name, ", ".join(f"{k} {v}" for k, v in sorted(st.items()) if v) or "quiet")

    def _note(self, note: str) -> None:
        self.notes += 1
        log.log(logging.WARNING if self.notes <= MAX_LOGGED_NOTES else logging.DEBUG, "%s: %s", self.name, note)

    # -- outputs of the call ---------------------------------------------------------------------------
    def _flush_messages(self) -> None:
        for m in self.call.messages_to_send():
            try:
                self.outq.put_nowait(m)
            except asyncio.QueueFull:  # the peer stopped reading: never buffer without bound
                log.warning("%s: Twilio is not reading its frames: closing", self.name)
                self._close(1008, "peer too slow reading")
                return

    async def _drain(self, *, wake: bool = True) -> None:
        """Carry out the call's actions in order. The reader, the timers and the prompts all drain; the lock keeps
        one drain at a time, so a session input never overtakes audio whose VAD is still running on the pool."""
        async with self._drain_lock:
            while True:
                self._flush_messages()
                acts = self.call.actions()
                if not acts:
                    break
                for a in acts:
                    if isinstance(a, FeedAudio) and self.session is not None:
                        await self._feed(a)
                    else:
                        self._act(a)
        if wake:
            self.wake.set()  # deadlines may have moved

    async def _feed(self, a: FeedAudio) -> None:
        try:
            await self.session.feed_audio_async(a.x)
        except ProtocolError as e:
            log.debug("%s: audio refused by the session: %s", self.name, e.message)
        except Exception:  # a bug must cost one input, not the call (as on /v1/realtime)
            log.error("%s: the session failed on %s", self.name, type(a).__name__, exc_info=True)

    def _act(self, a) -> None:
        s = self.session
        if isinstance(a, FeedAudio | SessionInput):  # (audio for a live session goes through _feed)
            if s is None or isinstance(a, FeedAudio):
                return
            try:
                s.handle(a.event)
            except ProtocolError as e:  # e.g. a cancel that lost the race with the response's end
                log.debug("%s: %s refused by the session: %s", self.name, a.event.type, e.message)
            except Exception:  # a bug must cost one input, not the call (as on /v1/realtime)
                log.error("%s: the session failed on %s", self.name, type(a).__name__, exc_info=True)
        elif isinstance(a, Say):
            self.prompt_tasks[a.prompt_id] = asyncio.create_task(self._play(a), name=f"twilio-{a.prompt_id}")
        elif isinstance(a, StopSay):
            t = self.prompt_tasks.pop(a.prompt_id, None)
            if t is not None:
                t.cancel()
        elif isinstance(a, OpenSession):
            self._open(a.setup)
        elif isinstance(a, EndCall):
            if self.call.refused is not None:  # (logged with the call's notes)
                self.ep.calls_total.labels("refused").inc()
                self.ep.server.metrics.rejected_total.labels("twilio_" + self.call.refused.code).inc()
            self._close(a.code, a.reason)

    def _open(self, setup: CallSetup) -> None:
        srv = self.ep.server
        self.name = f"call {setup.call_sid or setup.stream_sid or '?'}"
        now = time.monotonic()
        if len(srv.sessions) >= srv.opts.max_sessions:
            srv.metrics.rejected_total.labels("session_limit").inc()
            self.ep.calls_total.labels("busy").inc()
            log.info("%s: all %d sessions busy: saying so and ending the call", self.name, srv.opts.max_sessions)
            self.call.busy(now)
            return
        cfg = srv.defaults.copy()
        cfg.instructions, cfg.voice = setup.persona.instructions, setup.voice
        # The call's language reaches every decode (its prompt too: the server's default transcription settings).
        cfg.transcription = dataclasses.replace(cfg.transcription or Transcription(), language=setup.language)
        cfg.input_format = cfg.output_format = PHONE_FORMAT
        if cfg.turn_detection is not None:
            cfg.turn_detection.threshold = srv.opts.twilio_vad_threshold
            cfg.turn_detection.prefix_padding_ms = srv.opts.twilio_prefix_padding_ms
        self.session = Session(srv.stack, self.ep.session_opts, emit=self._emit, defaults=cfg, metrics=srv.metrics)
        srv.sessions.add(self.session)
        srv.link(self.session, self.ws, self.outq)  # a drain closes it (1001) once no reply is in flight
        srv.metrics.active_sessions.inc()
        srv.metrics.sessions_total.inc()
        self.ep.calls_total.labels("answered").inc()
        log.info("%s answered: session %s, persona %s, voice %s, language %s", self.name, self.session.cfg.id,
                 setup.persona.name, setup.voice, setup.language)
        self.session.start()
        self.call.session_opened(now)

    def _emit(self, ev: dict) -> None:
        """The session's events: to the call now (its Twilio frames queued at once), its actions to the timer
        task (never back into the session from inside its own emit)."""
        if ev["type"] == "error":
            self.ep.server.metrics.errors_total.labels(ev["error"].get("code") or "?").inc()
            log.warning("%s: session error: %s", self.name, ev["error"].get("message"))
        self.call.on_session_event(ev, time.monotonic())
        self._flush_messages()
        self.wake.set()

    # -- tasks -----------------------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self.outq.get()
                try:
                    await self.ws.send(frame)
                finally:
                    self.outq.task_done()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.call.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
            self.wake.clear()
            try:
                self.call.tick(time.monotonic())
                await self._drain(wake=False)
            except Exception:  # the call's timers and session inputs must not die silently
                log.error("%s: timer step failed", self.name, exc_info=True)
                self._close(1011, "internal error")
                return

    async def _play(self, say: Say) -> None:
        """A prompt, paced like a response (real time plus the output lead) so a barge-in can cut it."""
        clock = PlayoutClock(lead_ms=self.opts.output_lead_ms)
        voice = say.voice or self.ep.catalog.voices[0]
        try:
            async with contextlib.aclosing(self.ep.prompts.frames(voice, say.text)) as frames:
                async for ulaw, text_end in frames:
                    wait = clock.wait_s(time.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self.call.prompt_audio(say.prompt_id, ulaw, text_end)
                    clock.sent(len(ulaw) / 8.0, time.monotonic())
                    self._flush_messages()
        except asyncio.CancelledError:
            raise
        except Exception:  # the prompt is lost, not the call
            log.error("%s: prompt %r failed", self.name, say.text[:40], exc_info=True)
        self.prompt_tasks.pop(say.prompt_id, None)
        self.call.prompt_done(say.prompt_id, time.monotonic())
        await self._drain()

    def _close(self, code: int, reason: str) -> None:
        """End the call: queued frames go out first (briefly), then the socket closes; the reader then stops."""
        if self.closing is None:
            self.closing = asyncio.create_task(self._close_soon(code, reason), name="twilio-close")

    async def _close_soon(self, code: int, reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outq.join(), 2.0)
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)
