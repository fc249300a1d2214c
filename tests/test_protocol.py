"""Sans-I/O protocol + session config: messages in -> events/errors out, GA and beta shapes, no sockets."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from voicefast.conversation import Conversation, Item
from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat
from voicefast.playout import PlayoutClock
from voicefast.protocol import CLIENT_EVENTS, RealtimeProtocol
from voicefast.session_config import SessionConfig

P = RealtimeProtocol()


def err(msg) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        P.receive_message(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))
    return e.value


VALID = {
    "session.update": {"session": {"type": "realtime"}},
    "input_audio_buffer.append": {"audio": base64.b64encode(b"\x00\x00").decode()},
    "input_audio_buffer.commit": {}, "input_audio_buffer.clear": {},
    "conversation.item.create": {"item": {"type": "message", "role": "user",
                                          "content": [{"type": "input_text", "text": "hi"}]}},
    "conversation.item.truncate": {"item_id": "i", "content_index": 0, "audio_end_ms": 10},
    "conversation.item.delete": {"item_id": "i"}, "conversation.item.retrieve": {"item_id": "i"},
    "response.create": {"response": {"output_modalities": ["text"]}}, "response.cancel": {},
    "output_audio_buffer.clear": {},
}


@pytest.mark.parametrize("t", sorted(CLIENT_EVENTS))
def test_every_client_event_parses(t):
    ev = P.receive_message(json.dumps({"type": t, "event_id": "e1", **VALID[t]}))
    assert ev.type == t and ev.event_id == "e1"


def test_append_decodes_base64():
    assert P.receive_message(json.dumps({"type": "input_audio_buffer.append", **VALID["input_audio_buffer.append"]})
                             ).data["audio_bytes"] == b"\x00\x00"


@pytest.mark.parametrize("msg, code, param", [
    ("{oops", "invalid_json", None), ("[1]", "invalid_event", None), ("42", "invalid_event", None),
    (b"\x00", "invalid_frame", None), ({"no": "type"}, "missing_required_parameter", "type"),
    ({"type": "x.y"}, "invalid_event_type", "type"), ({"type": 5}, "missing_required_parameter", "type"),
    ({"type": "session.update"}, "missing_required_parameter", "session"),
    ({"type": "session.update", "session": "x"}, "invalid_type", "session"),
    ({"type": "input_audio_buffer.append"}, "missing_required_parameter", "audio"),
    ({"type": "input_audio_buffer.append", "audio": 5}, "invalid_type", "audio"),
    ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_base64", "audio"),
    ({"type": "conversation.item.create"}, "missing_required_parameter", "item"),
    ({"type": "conversation.item.create", "item": {"type": "mcp_call", "role": "user", "content": []}},
     "unsupported_item_type", "item.type"),
    ({"type": "conversation.item.create", "item": {"role": "robot", "content": []}}, "invalid_value", "item.role"),
    ({"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "video"}]}},
     "invalid_value", "item.content[0].type"),
    ({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": -1}, "invalid_value", "audio_end_ms"),
    ({"type": "conversation.item.truncate", "item_id": "i"}, "missing_required_parameter", "audio_end_ms"),
    ({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": "1"}, "invalid_type", "audio_end_ms"),
    ({"type": "conversation.item.delete"}, "missing_required_parameter", "item_id"),
    ({"type": "response.create", "response": []}, "invalid_type", "response"),
    ({"type": "response.cancel", "response_id": 3}, "invalid_type", "response_id"),
])
def test_malformed_events_are_errors(msg, code, param):
    e = err(msg)
    assert e.code == code and e.param == param
    ev = e.to_event()
    assert ev["type"] == "error" and ev["error"]["message"] and ev["error"]["type"] == "invalid_request_error"


def test_error_carries_client_event_id():
    e = err({"type": "input_audio_buffer.append", "event_id": "abc", "audio": "@@"})
    assert e.to_event()["error"]["event_id"] == "abc"


def test_outbound_ga_and_beta_names():
    ga, beta = RealtimeProtocol(), RealtimeProtocol(beta=True)
    item = {"id": "i", "type": "message", "role": "assistant", "content": [{"type": "output_audio", "transcript": "x"}]}
    added = {"type": "conversation.item.added", "previous_item_id": None, "item": item}
    assert [json.loads(f)["type"] for f in ga.events_to_send(added)] == ["conversation.item.added",
                                                                         "conversation.item.created"]
    (f,) = beta.events_to_send(added)
    f = json.loads(f)
    assert f["type"] == "conversation.item.created" and f["item"]["content"][0]["type"] == "audio"
    assert beta.events_to_send({"type": "conversation.item.done", "item": item}) == []
    for ga_name, beta_name in (("response.output_audio.delta", "response.audio.delta"),
                               ("response.output_audio_transcript.done", "response.audio_transcript.done"),
                               ("response.output_text.delta", "response.text.delta")):
        assert json.loads(beta.events_to_send({"type": ga_name})[0])["type"] == beta_name
        assert json.loads(ga.events_to_send({"type": ga_name})[0])["type"] == ga_name
    ids = [json.loads(ga.events_to_send({"type": "response.done"})[0])["event_id"] for _ in range(3)]
    assert len(set(ids)) == 3


def test_session_update_ga_and_beta():
    c = SessionConfig(voice="joe")
    g = c.apply({"type": "realtime", "instructions": "hi", "output_modalities": ["text"], "max_output_tokens": "inf",
                 "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": {
                     "type": "server_vad", "threshold": 0.6, "silence_duration_ms": 300, "create_response": False}},
                     "output": {"format": {"type": "audio/pcma"}, "voice": "alloy"}}}, beta=False, voices=["joe"])
    assert (g.instructions, g.output_modalities, g.max_output_tokens) == ("hi", ["text"], "inf")
    assert g.input_format.type == "audio/pcmu" and g.output_format.type == "audio/pcma" and g.voice == "joe"
    td = g.turn_detection
    assert (td.threshold, td.silence_duration_ms, td.create_response, td.prefix_padding_ms) == (0.6, 300, False, 300)
    d = g.to_dict(beta=False)
    assert d["audio"]["input"]["format"] == {"type": "audio/pcmu"} and d["type"] == "realtime"
    b = c.apply({"modalities": ["text", "audio"], "input_audio_format": "g711_alaw", "turn_detection": None,
                 "temperature": 0.2, "max_response_output_tokens": 20}, beta=True, voices=["joe"])
    assert b.output_modalities == ["audio"] and b.input_format.type == "audio/pcma" and b.turn_detection is None
    bd = b.to_dict(beta=True)
    assert bd["input_audio_format"] == "g711_alaw" and bd["temperature"] == 0.2 and bd["turn_detection"] is None
    assert c.input_format.type == "audio/pcm"  # apply() does not mutate the original


@pytest.mark.parametrize("session, param", [
    ({"type": "transcription"}, "session.type"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.input.format.rate"),
    ({"audio": {"output": {"format": "mp3"}}}, "session.audio.output.format"),
    ({"output_modalities": ["video"]}, "session.output_modalities"),
    ({"audio": {"input": {"turn_detection": {"type": "magic"}}}}, "session.audio.input.turn_detection.type"),
    ({"audio": {"input": {"turn_detection": {"threshold": 3}}}}, "session.audio.input.turn_detection.threshold"),
    ({"temperature": "hot"}, "session.temperature"), ({"max_output_tokens": 0}, "session.max_output_tokens"),
    ({"instructions": 5}, "session.instructions"), ({"audio": 3}, "session.audio"),
])
def test_session_update_rejects_bad_fields(session, param):
    with pytest.raises(ProtocolError) as e:
        SessionConfig().apply(session, beta=False, voices=["v"])
    assert e.value.param == param


def test_formats_roundtrip_and_odd_pcm():
    x = (0.5 * np.sin(np.arange(800) / 10)).astype(np.float32)
    for t in ("audio/pcm", "audio/pcmu", "audio/pcma"):
        f = AudioFormat(t)
        y = f.decode(f.encode(x))
        assert len(y) == len(x) and np.max(np.abs(y - x)) < 0.02
    with pytest.raises(ProtocolError) as e:
        AudioFormat().decode(b"\x00\x01\x02")
    assert e.value.code == "invalid_audio"
    assert AudioFormat.parse("pcm16", "p").rate_hz == 24_000 and AudioFormat.parse("g711_ulaw", "p").rate_hz == 8000


def test_context_policy_drops_oldest_turns_keeps_system():
    conv = Conversation()
    for i in range(10):
        conv.add(Item(f"u{i}", "user", f"question {i} " + "word " * 20))
        conv.add(Item(f"a{i}", "assistant", f"answer {i} " + "word " * 20))
    msgs = conv.messages("SYSTEM", count_tokens=lambda s: len(s.split()), max_prompt_tokens=120)
    assert msgs[0] == {"role": "system", "content": "SYSTEM"}
    assert msgs[1]["role"] == "user" and msgs[-1]["content"].startswith("answer 9")
    assert sum(len(m["content"].split()) + 6 for m in msgs) <= 120
    assert len(msgs) < 21
    full = conv.messages("SYSTEM", count_tokens=lambda s: len(s.split()), max_prompt_tokens=10_000)
    assert len(full) == 21


def test_playout_clock():
    c = PlayoutClock(lead_ms=300)
    assert c.wait_s(0.0) == 0.0
    c.sent(100, 0.0)
    c.sent(100, 0.0)
    c.sent(100, 0.0)
    assert c.wait_s(0.0) < 1e-9
    c.sent(100, 0.0)  # 400 ms buffered: must wait 100 ms
    assert abs(c.wait_s(0.0) - 0.1) < 1e-9
    assert abs(c.played_ms(0.25) - 250) < 1e-6


def test_input_buffer_absolute_offsets_trim_and_arrivals():
    from voicefast.input_buffer import InputBuffer

    b = InputBuffer()
    b.append(np.arange(100, dtype=np.float32), now_s=1.0)
    b.append(np.arange(100, 200, dtype=np.float32), now_s=2.0)
    assert (b.start, b.end, b.samples) == (0, 200, 200)
    assert b.arrival_time(50) == 1.0 and b.arrival_time(150) == 2.0
    b.trim(120)
    assert (b.start, b.samples) == (120, 80)
    assert b.slice(0, 125).tolist() == [120, 121, 122, 123, 124]  # clipped to what is kept
    assert b.slice(190).tolist() == list(range(190, 200))
    b.append(np.zeros(10, np.float32), now_s=3.0)
    assert b.end == 210 and len(b.slice(b.start)) == 90
    b.clear()
    assert b.samples == 0 and b.end == 210 and len(b.slice(0)) == 0
