"""TwilioCall, the sans-I/O bridge between Twilio frames and a Session: frames and session events in, Twilio
frames and actions out, time passed in. Marks, clear and truncation to what was heard; keypad groups; prompts,
re-prompts, busy and refusals."""

from __future__ import annotations

import base64
import json

import pytest
from twilio_client import TwilioMessages

from voicefast.personas import Persona
from voicefast.twilio_call import CallSettings, EndCall, FeedAudio, OpenSession, Say, SessionInput, StopSay, TwilioCall
from voicefast.twilio_setup import Catalog

CATALOG = Catalog(personas={"default": Persona("default", "Be helpful.")}, voices=["v1"], asr_language="en",
                  default_greeting="")


class Bridge:
    def __init__(self, params: dict | None = None, catalog: Catalog = CATALOG, **settings):
        self.call = TwilioCall(CallSettings(**settings), catalog)
        self.tw = TwilioMessages()
        self.now = 0.0
        self.sent: list[dict] = []
        self.acts: list = []
        self.recv(self.tw.connected())
        self.recv(self.tw.start(params))

    def recv(self, frame: str):
        note = self.call.receive(frame, self.now)
        self.collect()
        return note

    def collect(self) -> None:
        self.sent += [json.loads(m) for m in self.call.messages_to_send()]
        self.acts += self.call.actions()

    def ev(self, **e) -> None:
        self.call.on_session_event(e, self.now)
        self.collect()

    def at(self, t: float) -> None:
        self.now = t
        self.call.tick(t)
        self.collect()

    def take(self, kind=None) -> list:
        out = [a for a in self.acts if kind is None or isinstance(a, kind)]
        self.acts = [a for a in self.acts if a not in out]
        return out

    def inputs(self) -> list[dict]:
        return [a.event.data for a in self.take(SessionInput)]

    def drain_sent(self) -> list[dict]:
        out, self.sent = self.sent, []
        return out

    # session events
    def response(self, rid: str, chunks: int, item: str = "item_r", chunk_ms: int = 100) -> None:
        self.ev(type="response.created", response={"id": rid})
        for _ in range(chunks):
            self.ev(type="response.output_audio.delta", response_id=rid, item_id=item,
                    delta=base64.b64encode(b"\xff" * (8 * chunk_ms)).decode())

    def done(self, rid: str, status: str = "completed") -> None:
        self.ev(type="response.done", response={"id": rid, "status": status})


def opened(**kw) -> Bridge:
    b = Bridge(**kw)
    [op] = b.take(OpenSession)
    b.call.session_opened(b.now)
    b.collect()
    return b


def marks(sent: list[dict]) -> list[str]:
    return [m["mark"]["name"] for m in sent if m["event"] == "mark"]


def test_start_opens_a_session_and_media_feeds_it():
    b = Bridge(params={"CustomerId": "7"})
    [op] = b.take(OpenSession)
    assert op.setup.persona.name == "default" and op.setup.parameters == {"CustomerId": "7"}
    assert b.recv(b.tw.media(b"\xff" * 160)) is None and not b.take(FeedAudio)  # not before the session is up
    b.call.session_opened(0.0)
    b.recv(b.tw.media(b"\xff" * 160))
    [fa] = b.take(FeedAudio)
    assert fa.x.dtype.name == "float32" and len(fa.x) == 160  # 20 ms at 8 kHz, decoded mu-law


def test_audio_goes_out_as_20ms_media_then_a_mark_and_an_end_mark():
    b = opened()
    b.response("resp_1", 2)
    sent = b.drain_sent()
    assert [m["event"] for m in sent] == ["media"] * 5 + ["mark"] + ["media"] * 5 + ["mark"]
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in sent if m["event"] == "media")
    assert all(m["streamSid"] == b.tw.stream_sid for m in sent)
    b.done("resp_1")
    [end] = marks(b.drain_sent())
    assert end.startswith("end:completed:")
    for name in marks(sent) + [end]:
        b.recv(b.tw.mark(name))
    assert not b.call.playback.playing and not b.call.playback.sources and not b.call.truncations


def test_barge_in_clears_and_truncates_to_the_last_mark_echoed_before_the_clear():
    b = opened()
    b.response("resp_1", 4)
    names = marks(b.drain_sent())
    b.recv(b.tw.mark(names[0]))
    b.recv(b.tw.mark(names[1]))  # the caller has heard 200 ms
    b.ev(type="input_audio_buffer.speech_started")  # the session's guard passed: it cancels the response
    assert b.drain_sent() == [{"event": "clear", "streamSid": b.tw.stream_sid}]
    for name in names[2:]:  # Twilio flushes and echoes the pending marks: not heard
        b.recv(b.tw.mark(name))
    assert b.call.playback.echoes_ignored == 2 and not b.inputs()  # the truncation waits for response.done
    b.done("resp_1", "cancelled")
    [trunc] = b.inputs()
    assert trunc == {"type": "conversation.item.truncate", "item_id": "item_r", "content_index": 0,
                     "audio_end_ms": 200}
    assert b.call.truncations == [("item_r", 200)] and not marks(b.drain_sent())  # no end mark for a cut response


def test_speech_over_a_finished_replys_tail_needs_the_guard():
    b = opened(barge_in_min_ms=300)
    b.response("resp_1", 3)
    names = marks(b.drain_sent())
    b.done("resp_1")
    b.drain_sent()
    b.recv(b.tw.mark(names[0]))
    b.now = 1.0
    b.ev(type="input_audio_buffer.speech_started")
    assert b.call.next_deadline() == pytest.approx(1.3) and not b.drain_sent()
    b.at(1.29)
    assert not b.drain_sent()
    b.at(1.3)
    assert [m["event"] for m in b.drain_sent()] == ["clear"]
    assert b.inputs()[0]["audio_end_ms"] == 100  # the response is over: truncated at once
    # a cough shorter than the guard clears nothing
    b.response("resp_2", 2)
    b.done("resp_2")
    b.drain_sent()
    b.ev(type="input_audio_buffer.speech_started")
    b.now = 1.5
    b.ev(type="input_audio_buffer.speech_stopped")
    b.at(2.0)
    assert not [m for m in b.drain_sent() if m["event"] == "clear"] and not b.inputs()


def test_keypad_digits_are_grouped_interrupt_and_get_an_answer():
    b = opened(dtmf_pause_ms=1000)
    b.response("resp_1", 3)
    first = marks(b.drain_sent())[0]
    b.recv(b.tw.mark(first))
    b.recv(b.tw.dtmf("4"))  # the first key interrupts: clear, and the response is cancelled
    assert [m["event"] for m in b.drain_sent()] == ["clear"]
    assert b.inputs() == [{"type": "response.cancel", "response_id": "resp_1"}]
    for t, d in ((0.4, "5"), (0.8, "7"), (1.2, "2")):
        b.now = t
        b.recv(b.tw.dtmf(d))
    b.at(2.1)
    assert not b.inputs() and b.call.next_deadline() == pytest.approx(2.2)
    b.at(2.2)
    [item] = b.inputs()
    assert item["item"]["content"] == [{"type": "input_text", "text": "[caller pressed 4 5 7 2]"}]
    assert item["item"]["role"] == "user"
    b.done("resp_1", "cancelled")  # the cancelled response ends: truncated, then the digits are answered
    assert [e["type"] for e in b.inputs()] == ["conversation.item.truncate", "response.create"]
    # '#' ends a group at once; with nothing playing the answer is immediate
    b.recv(b.tw.dtmf("1"))
    b.recv(b.tw.dtmf("#"))
    assert [e["type"] for e in b.inputs()] == ["conversation.item.create", "response.create"]
    b.recv(b.tw.dtmf("#"))
    assert b.inputs()[0]["item"]["content"][0]["text"] == "[caller pressed #]"


def test_greeting_is_said_and_joins_the_conversation_once_heard():
    cat = Catalog(personas=CATALOG.personas, voices=["v1"], asr_language="en", default_greeting="Hello there caller.")
    b = opened(catalog=cat)
    [say] = b.take(Say)
    assert say.text == "Hello there caller." and say.voice == "v1"
    b.call.prompt_audio(say.prompt_id, b"\xff" * 800, 6)
    b.call.prompt_audio(say.prompt_id, b"\xff" * 800, 19)
    b.call.prompt_done(say.prompt_id, 0.0)
    b.collect()
    names = marks(b.drain_sent())
    assert names[-1].startswith("end:prompt:") and len(names) == 3
    for n in names[:2]:
        b.recv(b.tw.mark(n))
    assert not b.inputs()  # not until all of it has played
    b.recv(b.tw.mark(names[2]))
    [item] = b.inputs()
    assert item["item"]["role"] == "assistant" and item["item"]["content"][0]["text"] == "Hello there caller."


def test_a_cut_prompt_joins_the_conversation_as_heard_whole_words():
    cat = Catalog(personas=CATALOG.personas, voices=["v1"], asr_language="en", default_greeting="Hello there caller.")
    b = opened(catalog=cat, barge_in_min_ms=0)
    [say] = b.take(Say)
    for end in (8, 14, 19):  # the first chunk ends inside "there"
        b.call.prompt_audio(say.prompt_id, b"\xff" * 800, end)
    b.collect()
    b.recv(b.tw.mark(marks(b.drain_sent())[0]))
    b.ev(type="input_audio_buffer.speech_started")
    b.at(0.0)
    assert [m["event"] for m in b.drain_sent()] == ["clear"]
    assert b.take(StopSay)[0].prompt_id == say.prompt_id
    assert b.inputs()[0]["item"]["content"][0]["text"] == "Hello"
    assert b.call.prompts_heard == [("Hello there caller.", "Hello")]
    b.call.prompt_audio(say.prompt_id, b"\xff" * 800, 19)  # late audio of a cut prompt goes nowhere
    b.collect()
    assert not b.drain_sent()


def _play_prompt(b: Bridge) -> Say:
    [say] = b.take(Say)
    b.call.prompt_audio(say.prompt_id, b"\xff" * 800, len(say.text))
    b.call.prompt_done(say.prompt_id, b.now)
    b.collect()
    for n in marks(b.drain_sent()):
        b.recv(b.tw.mark(n))
    return say


def test_reprompts_after_silence_then_goodbye_and_hang_up():
    b = opened(reprompt_after_s=5.0, max_reprompts=2)
    assert b.call.next_deadline() == pytest.approx(5.0)
    b.at(4.9)
    assert not b.take(Say)
    b.at(5.0)
    assert _play_prompt(b).text == "Are you still there?"
    assert b.inputs()[0]["item"]["content"][0]["text"] == "Are you still there?"
    b.at(10.0)
    assert _play_prompt(b).text == "Are you still there?" and b.call.reprompts == 2
    b.inputs()
    b.at(15.0)
    say = _play_prompt(b)
    assert "Goodbye" in say.text
    [end] = b.take(EndCall)
    assert (end.code, end.reason) == (1000, "goodbye") and b.call.state == "ended"


def test_speech_resets_reprompts_and_a_dead_handset_still_gets_hung_up():
    b = opened(reprompt_after_s=5.0, max_reprompts=1, hangup_grace_s=2.0)
    b.at(5.0)
    _play_prompt(b)
    b.ev(type="input_audio_buffer.speech_started")
    assert b.call.reprompts == 0 and b.call.next_deadline() is None  # the caller is talking: no timer
    b.now = 6.0
    b.ev(type="input_audio_buffer.speech_stopped")
    b.at(11.0)
    _play_prompt(b)
    b.at(16.0)
    [bye] = b.take(Say)  # a handset that never echoes: the call still ends
    b.call.prompt_audio(bye.prompt_id, b"\xff" * 8000, len(bye.text))  # 1 s
    b.call.prompt_done(bye.prompt_id, 16.0)
    b.collect()
    b.at(18.9)
    assert not b.take(EndCall)
    b.at(19.0)
    assert b.take(EndCall)[0].reason == "goodbye"


def test_busy_says_so_without_a_conversation_then_ends():
    b = Bridge()
    b.take(OpenSession)
    b.call.busy(0.0)
    b.collect()
    [say] = b.take(Say)
    assert "busy" in say.text
    assert b.recv(b.tw.media(b"\xff" * 160)) is None and not b.take(FeedAudio)
    b.recv(b.tw.dtmf("1"))
    b.call.prompt_audio(say.prompt_id, b"\xff" * 800, len(say.text))
    b.call.prompt_done(say.prompt_id, 0.0)
    b.collect()
    for n in marks(b.drain_sent()):
        b.recv(b.tw.mark(n))
    assert not b.take(SessionInput)
    assert [(e.code, e.reason) for e in b.take(EndCall)] == [(1000, "all lines busy")]


def test_refused_calls_and_ignored_frames():
    b = Bridge(params={"persona": "nobody"})
    [end] = b.take(EndCall)
    assert end.code == 1008 and end.reason == "unknown_persona" and b.call.refused.code == "unknown_persona"
    assert not b.take(OpenSession)
    early = TwilioCall(CallSettings(), CATALOG)
    assert early.receive(TwilioMessages().media(b"\xff" * 160), 0.0) == "media before start ignored"
    assert not early.actions() and early.stats["media_ignored"] == 1
    b = Bridge()
    assert "malformed" in b.recv("{nope")
    assert "unknown event" in b.recv('{"event": "hello"}')
    assert "second start" in b.recv(b.tw.start({}))
    assert b.recv(b.tw.mark("never-sent")) is None and b.call.playback.unknown_marks == 1
    assert b.call.stats["malformed"] == 1 and b.call.stats["unknown_events"] == 1
    b.recv(b.tw.stop())
    assert b.take(EndCall)[-1].reason == "stream stopped"


def test_a_prompt_that_produced_no_audio_is_not_heard():
    cat = Catalog(personas=CATALOG.personas, voices=["v1"], asr_language="en", default_greeting="Hello.")
    b = opened(catalog=cat)
    [say] = b.take(Say)
    b.call.prompt_done(say.prompt_id, 0.0)  # synthesis failed: nothing was sent
    b.collect()
    [end] = marks(b.drain_sent())
    b.recv(b.tw.mark(end))
    assert b.call.prompts_heard == [("Hello.", "")] and not b.inputs()
