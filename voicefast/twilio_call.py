"""One phone call between Twilio Media Streams and a realtime Session, sans-I/O: Twilio frames and the session's
emitted Realtime events in; Twilio frames and actions for the I/O adapter out (open the session, feed it audio,
hand it client events, say a prompt, end the call). Time is passed in (`now_s`), so every rule is testable
without sockets or clocks.

What the caller has heard comes from marks (voicefast/twilio_playback.py). On a barge-in the call sends `clear`
and truncates the assistant item to the last mark echoed before the clear; a response still running is truncated
once the session has ended it (response.done), so the session's own end-of-response bookkeeping cannot undo the
cut. Caller speech over audio no response is producing any more (a reply's tail still playing, a prompt) must
last barge_in_min_ms before it clears, the same guard the session applies to a running response.

Prompts (greeting, re-prompt, goodbye, "all lines are busy") are fixed phrases the adapter synthesizes; once
heard (or cut) they join the conversation as assistant text, so the model knows what the caller was told. Keypad
digits are grouped (a pause or '#' ends a group), interrupt the assistant, and join the conversation as
"[caller pressed 4 5 7 2]" followed by a response."""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from voicefast.protocol import ClientEvent, RealtimeProtocol
from voicefast.twilio import Connected, Dtmf, Mark, Media, Start, Stop, TwilioMessageError, Unknown, parse_message
from voicefast.twilio_playback import Playback, Source
from voicefast.twilio_setup import CallRefused, CallSetup, Catalog, resolve_call


@dataclass(slots=True)
class CallSettings:
    media_frame_ms: int = 20  # outbound media message size
    barge_in_min_ms: int = 300  # caller speech over audio that no response is producing must last this long
    dtmf_pause_ms: int = 1500  # a keypad group ends after this pause (or at '#')
    max_dtmf_digits: int = 32
    reprompt_after_s: float = 10.0  # caller silence before a re-prompt (0: never)
    max_reprompts: int = 2  # unanswered re-prompts before the goodbye and hang-up
    reprompt_text: str = "Are you still there?"
    goodbye_text: str = "I can't hear anyone on the line, so I will end the call now. Goodbye."
    busy_text: str = "All of our lines are busy right now. Please call again in a few minutes."
    hangup_grace_s: float = 2.0  # end a call this long after its last prompt should have played, echo or not
    max_pending_marks: int = 4096
    max_cleared_marks: int = 1024


# -- actions for the I/O adapter --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OpenSession:
    setup: CallSetup  # answer with session_opened() or busy()


@dataclass(frozen=True, slots=True)
class FeedAudio:
    x: np.ndarray  # [n] float32 at 8 kHz


@dataclass(frozen=True, slots=True)
class SessionInput:
    event: ClientEvent


@dataclass(frozen=True, slots=True)
class Say:
    prompt_id: str  # play it with prompt_audio(...) chunks, then prompt_done()
    text: str
    voice: str | None


@dataclass(frozen=True, slots=True)
class StopSay:
    prompt_id: str


@dataclass(frozen=True, slots=True)
class EndCall:
    code: int  # WebSocket close code
    reason: str


Action = OpenSession | FeedAudio | SessionInput | Say | StopSay | EndCall


_REALTIME = RealtimeProtocol()


def client_event(obj: dict) -> ClientEvent:
    """A Realtime client event built and validated exactly as one from a WebSocket client."""
    return _REALTIME.receive_message(json.dumps(obj))


class TwilioCall:
    def __init__(self, settings: CallSettings, catalog: Catalog, *, secret_verified: bool = False):
        self.s, self.catalog, self.secret_verified = settings, catalog, secret_verified
        self.state = "new"  # new -> opening -> active | busy -> ended
        self.setup: CallSetup | None = None
        self.refused: CallRefused | None = None
        self.playback = Playback(media_frame_ms=settings.media_frame_ms, max_pending_marks=settings.max_pending_marks,
                                 max_cleared_marks=settings.max_cleared_marks)
        self._actions: list[Action] = []
        self.response_id: str | None = None  # the session's response in progress
        self._cancelling: set[str] = set()
        self._want_response = False
        self.user_speaking = False
        self._barge_at: float | None = None
        self._digits: list[str] = []
        self._dtmf_at: float | None = None
        self._idle_since: float | None = None
        self._hangup_at: float | None = None
        self.reprompts = 0
        self.stats: Counter[str] = Counter()
        self.truncations: list[tuple[str, int]] = []  # (item id, audio_end_ms) sent to the session
        self.prompts_heard: list[tuple[str, str]] = []  # (prompt text, what the caller heard of it)

    # -- outputs ---------------------------------------------------------------------------------------
    def messages_to_send(self) -> list[str]:
        out, self.playback.out = self.playback.out, []
        return out

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def _input(self, obj: dict) -> None:
        self._actions.append(SessionInput(client_event(obj)))

    # -- Twilio in -------------------------------------------------------------------------------------
    def receive(self, frame: str | bytes, now_s: float) -> str | None:
        """Apply one Twilio frame. Returns a note when the frame was ignored (for the adapter's log)."""
        try:
            ev = parse_message(frame)
        except TwilioMessageError as e:
            self.stats["malformed"] += 1
            return f"malformed message ignored: {e}"
        if isinstance(ev, Media):
            if self.state != "active" or ev.track not in ("inbound", "inbound_track"):
                self.stats["media_ignored"] += 1
                return "media before start ignored" if self.state == "new" else None
            from audio.codecs import ulaw_decode

            self._actions.append(FeedAudio(ulaw_decode(ev.payload)))
        elif isinstance(ev, Mark):
            for src in self.playback.on_mark(ev.name):  # fully heard (a prompt whose synthesis failed: nothing)
                self._heard(src, src.text if src.sent_ms > 0 else "")
            self._idle_since = now_s
        elif isinstance(ev, Start):
            return self._on_start(ev)
        elif isinstance(ev, Dtmf):
            if self.state == "active":
                self._on_dtmf(ev.digit, now_s)
        elif isinstance(ev, Stop):
            self._end(1000, "stream stopped")
        elif isinstance(ev, Unknown):
            self.stats["unknown_events"] += 1
            return f"unknown event {ev.event!r} ignored"
        elif isinstance(ev, Connected):
            self.stats["connected"] += 1
        return None

    def _on_start(self, ev: Start) -> str | None:
        if self.state != "new":
            self.stats["duplicate_start"] += 1
            return "a second start message ignored"
        self.playback.stream_sid = ev.stream_sid
        try:
            self.setup = resolve_call(ev, self.catalog, secret_verified=self.secret_verified)
        except CallRefused as e:
            self.refused = e
            self._end(1008, e.code)
            return f"call refused ({e.code}): {e.message}"
        self.state = "opening"
        self._actions.append(OpenSession(self.setup))
        return None

    # -- the adapter's answers -------------------------------------------------------------------------
    def session_opened(self, now_s: float) -> None:
        self.state = "active"
        self._idle_since = now_s
        if self.setup.greeting:
            self.say(self.setup.greeting)

    def busy(self, now_s: float) -> None:
        """The server is at capacity: say so, then end the call (no session, no conversation)."""
        self.state = "busy"
        if self.s.busy_text:
            self.say(self.s.busy_text, hangup=True, add_item=False)
        else:
            self._end(1000, "all lines busy")

    def say(self, text: str, *, hangup: bool = False, add_item: bool = True) -> str:
        pid = self.playback.next_id("prompt")
        self.playback.source(pid, "prompt", text=text, hangup=hangup, add_item=add_item)
        self._actions.append(Say(pid, text, self.setup.voice if self.setup else None))
        return pid

    def prompt_audio(self, prompt_id: str, ulaw: bytes, text_end: int) -> None:
        src = self.playback.sources.get(prompt_id)
        if src is not None and self.state in ("active", "busy"):
            self.playback.send_audio(src, ulaw, text_end)

    def prompt_done(self, prompt_id: str, now_s: float) -> None:
        src = self.playback.sources.get(prompt_id)
        if src is None or src.finished:
            return
        self.playback.finish(src, "prompt")
        if src.hangup:  # end even if the echo never comes (a dead handset)
            self._hangup_at = now_s + (src.sent_ms - src.heard_ms) / 1000.0 + self.s.hangup_grace_s

    # -- the session's events --------------------------------------------------------------------------
    def on_session_event(self, ev: dict, now_s: float) -> None:
        if self.state != "active":
            return
        t = ev.get("type")
        if t == "response.output_audio.delta":
            src = self.playback.source(ev["response_id"], "response")
            src.item_id = ev["item_id"]
            self.playback.send_audio(src, base64.b64decode(ev["delta"]))
        elif t == "response.created":
            self.response_id = ev["response"]["id"]
            self.playback.source(self.response_id, "response")
        elif t == "response.done":
            self._response_done(ev["response"], now_s)
        elif t == "input_audio_buffer.speech_started":
            self.user_speaking = True
            self.reprompts = 0
            self._cancel_hangup()
            if self.playback.playing:
                if self.response_id is not None and self.response_id not in self._cancelling:
                    self._clear_playback()  # the session's barge-in guard has passed: it cancels the response
                else:  # audio no response is producing any more (its tail, a prompt): apply the guard here
                    self._barge_at = now_s + self.s.barge_in_min_ms / 1000.0
        elif t == "input_audio_buffer.speech_stopped":
            self.user_speaking = False
            self._barge_at = None
            self._idle_since = now_s

    def _response_done(self, resp: dict, now_s: float) -> None:
        rid = resp["id"]
        if self.response_id == rid:
            self.response_id = None
        self._cancelling.discard(rid)
        src = self.playback.sources.get(rid)
        if src is not None:
            if src.cut:  # the session has ended the item its own way: now cut it to what was heard
                self._truncate(src)
            self.playback.finish(src, str(resp.get("status")))
        if self._want_response and self.response_id is None:
            self._want_response = False
            self._input({"type": "response.create"})
        self._idle_since = now_s

    # -- barge-in --------------------------------------------------------------------------------------
    def _clear_playback(self) -> None:
        """Flush Twilio's buffer; sources are cut to what the caller had heard before now."""
        self._barge_at = None
        for src in self.playback.clear():
            if src.kind == "prompt":
                self._actions.append(StopSay(src.id))
                self._heard(src, _whole_words(src.text, src.heard_text_end))
            elif src.finished:
                self._truncate(src)
            # else: truncated at its response.done

    def _truncate(self, src: Source) -> None:
        ms = int(src.heard_ms)
        if src.item_id is None or ms >= int(src.sent_ms):
            return
        self.truncations.append((src.item_id, ms))
        self._input({"type": "conversation.item.truncate", "item_id": src.item_id, "content_index": 0,
                     "audio_end_ms": ms})

    def _heard(self, src: Source, heard: str) -> None:
        """A prompt is over (heard in full, or cut): the conversation learns what the caller heard."""
        if src.kind != "prompt":
            return
        self.prompts_heard.append((src.text, heard))
        if heard and src.add_item and self.state == "active":
            self._input({"type": "conversation.item.create", "item": {
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": heard}]}})
        if src.hangup:
            self._end(1000, "all lines busy" if self.state == "busy" else "goodbye")

    # -- keypad ----------------------------------------------------------------------------------------
    def _on_dtmf(self, digit: str, now_s: float) -> None:
        self.reprompts = 0
        self._cancel_hangup()
        self._idle_since = now_s
        if not self._digits:  # the first key of a group interrupts the assistant
            self._clear_playback()
            rid = self.response_id
            if rid is not None and rid not in self._cancelling:
                self._cancelling.add(rid)
                self._input({"type": "response.cancel", "response_id": rid})
        if digit == "#":
            self._flush_dtmf(terminator=True)
            return
        self._digits.append(digit)
        if len(self._digits) >= self.s.max_dtmf_digits:
            self._flush_dtmf()
        else:
            self._dtmf_at = now_s + self.s.dtmf_pause_ms / 1000.0

    def _flush_dtmf(self, *, terminator: bool = False) -> None:
        digits = self._digits or (["#"] if terminator else [])
        self._digits, self._dtmf_at = [], None
        if not digits:
            return
        self.stats["dtmf_groups"] += 1
        self._input({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": f"[caller pressed {' '.join(digits)}]"}]}})
        if self.response_id is not None and self.response_id in self._cancelling:
            self._want_response = True  # answer once the interrupted response has ended
        elif self.response_id is None and not self.user_speaking:
            self._input({"type": "response.create"})

    # -- timers ----------------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return (self.state == "active" and not self.user_speaking and self.response_id is None
                and not self.playback.playing and not self._digits and not self._want_response
                and self._hangup_at is None and not any(s.kind == "prompt" for s in self.playback.sources.values()))

    def _reprompt_at(self) -> float | None:
        if self.s.reprompt_after_s <= 0 or self._idle_since is None or not self._idle():
            return None
        return self._idle_since + self.s.reprompt_after_s

    def next_deadline(self) -> float | None:
        times = [t for t in (self._barge_at, self._dtmf_at, self._hangup_at, self._reprompt_at()) if t is not None]
        return min(times) if times else None

    def tick(self, now_s: float) -> None:
        if self._barge_at is not None and now_s >= self._barge_at:
            self._barge_at = None
            if self.user_speaking:
                self._clear_playback()
        if self._dtmf_at is not None and now_s >= self._dtmf_at:
            self._flush_dtmf()
        if self._hangup_at is not None and now_s >= self._hangup_at:
            self._end(1000, "all lines busy" if self.state == "busy" else "goodbye")
        at = self._reprompt_at()
        if at is not None and now_s >= at:
            self._idle_since = now_s
            if self.reprompts < self.s.max_reprompts and self.s.reprompt_text:
                self.reprompts += 1
                self.say(self.s.reprompt_text)
            elif self.s.goodbye_text:
                self.say(self.s.goodbye_text, hangup=True)
            else:
                self._end(1000, "caller silent")

    def _cancel_hangup(self) -> None:
        """The caller spoke or pressed a key during the goodbye: they are still there."""
        if self.state != "active":
            return
        self._hangup_at = None
        for src in self.playback.sources.values():
            src.hangup = False

    def _end(self, code: int, reason: str) -> None:
        self._barge_at = self._dtmf_at = self._hangup_at = None
        if self.state != "ended":
            self.state = "ended"
            self._actions.append(EndCall(code, reason))


def _whole_words(text: str, end: int) -> str:
    """text[:end], moved back to a word boundary when `end` falls inside a word."""
    end = max(0, min(end, len(text)))
    if end < len(text) and not text[end].isspace():
        while end > 0 and not text[end - 1].isspace():
            end -= 1
    return text[:end].rstrip()
