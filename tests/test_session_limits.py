"""Session layer with fakes: every client event is all-or-nothing, every per-session resource is bounded (items,
text, pending transcriptions, utterance length, queued responses), and every setting either reaches the stage it
configures or is rejected with an error naming it."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from fakes import FakeASR, FakeEngine, silence, speech_like
from test_session import Harness as SessionHarness

from voicefast.config import ServerConfig
from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Harness(SessionHarness):
    """test_session's harness, ServerConfig fields as keyword arguments, plus error()."""

    def __init__(self, *, beta: bool = False, **kw):
        opts = {"output_lead_ms": 100, **{k: kw.pop(k) for k in list(kw) if hasattr(ServerConfig, k)}}
        super().__init__(beta=beta, opts=ServerConfig(**opts), **kw)

    def error(self, type: str, **data) -> ProtocolError:
        with pytest.raises(ProtocolError) as e:
            self.send(type, **data)
        return e.value

    def manual(self) -> None:
        self.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})


def b64(x: np.ndarray) -> str:
    return base64.b64encode(AudioFormat().encode(x)).decode()


def user_audio_item(item_id: str | None = None, audio: str | None = None) -> dict:
    item = {"type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": audio if audio is not None else b64(speech_like(300))}]}
    return item | ({"id": item_id} if item_id else {})


# -- all or nothing -------------------------------------------------------------------------------------
async def test_item_with_bad_audio_leaves_nothing_and_its_id_stays_free():
    h = Harness()
    e = h.error("conversation.item.create", item=user_audio_item("item_a", audio="not base64!"))
    assert e.code == "invalid_base64"
    assert h.session.conv.items == [] and h.of("conversation.item.added") == [] and h.stack.asr.calls == []
    e = h.error("conversation.item.create", item=user_audio_item("item_a", audio=b64(speech_like(300))[:-3]))
    assert e.code in ("invalid_base64", "invalid_audio") and h.session.conv.items == []
    h.send("conversation.item.create", item=user_audio_item("item_a"))  # the retry with the same id works
    done = await h.wait_for("conversation.item.done")
    assert done["item"]["id"] == "item_a" and [it.id for it in h.session.conv.items] == ["item_a"]
    await h.session.close()


async def test_item_refused_for_its_position_or_id_is_not_transcribed():
    h = Harness()
    assert h.error("conversation.item.create", item=user_audio_item("x"), previous_item_id="nope").code == \
        "item_not_found"
    h.send("conversation.item.create", item={"type": "message", "id": "t", "role": "user",
                                              "content": [{"type": "input_text", "text": "hi"}]})
    assert h.error("conversation.item.create", item=user_audio_item("t")).code == "duplicate_item_id"
    await asyncio.sleep(0.05)
    assert h.stack.asr.calls == [] and [it.id for it in h.session.conv.items] == ["t"]
    await h.session.close()


# -- conversation caps ----------------------------------------------------------------------------------
def text_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]} | (
        {"id": item_id} if item_id else {})


async def test_conversation_items_and_bytes_are_capped_with_clear_errors():
    h = Harness(max_item_bytes=1000, max_conversation_bytes=2500, max_conversation_items=4)
    for _ in range(50):  # 50 texts of 1 MB: each refused, nothing held
        assert h.error("conversation.item.create", item=text_item("x" * 1_000_000)).code == \
            "conversation_item_too_large"
    assert h.session.conv.items == []
    h.send("conversation.item.create", item=text_item("é" * 450))  # 900 bytes of UTF-8
    h.send("conversation.item.create", item=text_item("a" * 900, "second"))
    e = h.error("conversation.item.create", item=text_item("b" * 900))
    assert e.code == "conversation_limit_reached" and h.session.conv.text_bytes == 1800
    h.send("conversation.item.delete", item_id="second")
    h.send("conversation.item.create", item=text_item("b" * 900))
    h.send("conversation.item.create", item=text_item("c"))
    h.send("conversation.item.create", item=text_item("d"))
    e = h.error("conversation.item.create", item=text_item("e"))
    assert e.code == "conversation_limit_reached" and len(h.session.conv.items) == 4
    await h.session.close()


async def test_function_call_items_are_held_to_the_same_caps():
    h = Harness(max_item_bytes=1000, max_conversation_items=3)
    call = {"type": "function_call", "call_id": "c1", "name": "check_order", "arguments": "{\"id\": 1}"}
    big = {"type": "function_call", "call_id": "c0", "name": "check_order",
           "arguments": json.dumps({"note": "x" * 2000})}
    assert h.error("conversation.item.create", item=big).code == "conversation_item_too_large"
    h.send("conversation.item.create", item=call)
    out = {"type": "function_call_output", "call_id": "c1", "output": json.dumps({"status": "y" * 2000})}
    assert h.error("conversation.item.create", item=out).code == "conversation_item_too_large"
    assert [it.call_id for it in h.session.conv.items] == ["c1"]  # nothing of the refused ones
    h.send("conversation.item.create", item=out | {"output": "{\"status\": \"shipped\"}"})
    h.send("conversation.item.create", item=text_item("thanks"))
    e = h.error("conversation.item.create", item={"type": "function_call", "call_id": "c2", "name": "f"})
    assert e.code == "conversation_limit_reached" and len(h.session.conv.items) == 3
    assert h.session.conv.text_bytes == len('{"id": 1}') + len('{"status": "shipped"}') + len("thanks")
    await h.session.close()


async def test_server_turns_evict_the_oldest_items_and_say_so():
    h = Harness(max_conversation_items=3)
    for _ in range(3):
        h.audio(np.concatenate([speech_like(500), silence(700)]))
        await h.wait_for("response.done", len(h.of("response.done")) + 1)
    deleted = [e["item_id"] for e in h.of("conversation.item.deleted")]
    assert len(h.session.conv.items) <= 3 and len(deleted) == 3
    added = [e["item"]["id"] for e in h.of("conversation.item.added")]
    assert deleted == added[:3]  # oldest first
    await h.session.close()


async def test_pending_transcriptions_per_session_are_bounded():
    h = Harness(asr=FakeASR(delay_s=0.3), max_pending_transcriptions=2)
    h.send("conversation.item.create", item=user_audio_item("a"))
    h.send("conversation.item.create", item=user_audio_item("b"))
    e = h.error("conversation.item.create", item=user_audio_item("c"))
    assert e.code == "too_many_pending_transcriptions" and h.session.conv.find("c") is None
    h.manual()
    h.audio(speech_like(300))
    assert h.error("input_audio_buffer.commit").code == "too_many_pending_transcriptions"
    await h.wait_for("conversation.item.input_audio_transcription.completed", 2)
    h.send("conversation.item.create", item=user_audio_item("c"))  # room again
    h.send("input_audio_buffer.commit")
    await h.wait_for("conversation.item.input_audio_transcription.completed", 4)
    await h.session.close()


async def test_item_audio_longer_than_the_max_utterance_is_refused():
    h = Harness(max_utterance_s=2.0)
    e = h.error("conversation.item.create", item=user_audio_item("long", audio=b64(speech_like(2500))))
    assert e.code == "input_audio_too_long" and e.param == "item.content.audio" and h.session.conv.items == []
    await h.session.close()


# -- utterance bound ------------------------------------------------------------------------------------
async def test_continuous_speech_ends_the_turn_at_max_utterance_s():
    h = Harness(max_utterance_s=1.0)
    h.audio(np.concatenate([silence(100), speech_like(3500)]))  # 3.5 s without a pause
    stopped = h.of("input_audio_buffer.speech_stopped")
    started = h.of("input_audio_buffer.speech_started")
    assert len(stopped) >= 2 and len(started) >= 3  # turns end every second, new ones start as speech goes on
    for a, b in zip(started, stopped, strict=False):
        assert b["audio_end_ms"] - a["audio_start_ms"] <= 1000 + 20
    assert all(c <= 16_000 + 300 * 16 + 320 for c in h.stack.asr.calls)  # finals: <= 1 s + prefix padding
    assert h.session.inbuf.samples <= 2 * 16_000
    await h.session.close()


# -- settings reach their stage or are rejected ----------------------------------------------------------
@pytest.mark.parametrize("transcription, param", [
    ({"model": "gpt-5-ears"}, "session.audio.input.transcription.model"),
    ({"language": "xx"}, "session.audio.input.transcription.language"),
    ({"language": 7}, "session.audio.input.transcription.language"),
    ({"prompt": "p" * 5000}, "session.audio.input.transcription.prompt"),
    ("whisper-1", "session.audio.input.transcription"),
])
async def test_bad_transcription_settings_are_rejected_by_name(transcription, param):
    h = Harness()
    e = h.error("session.update", session={"type": "realtime", "audio": {"input": {"transcription": transcription}}})
    assert e.param == param and h.session.cfg.transcription.model == "whisper"
    await h.session.close()


async def test_transcription_language_and_prompt_reach_the_asr_and_usage_is_real():
    h = Harness()
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"transcription": {
        "model": "gpt-4o-transcribe", "language": "de", "prompt": "Zebrafink, Quokka"}}}})
    tr = h.of("session.updated")[0]["session"]["audio"]["input"]["transcription"]
    assert tr == {"model": "gpt-4o-transcribe", "language": "de", "prompt": "Zebrafink, Quokka"}
    h.audio(np.concatenate([speech_like(600), silence(700)]))
    done = await h.wait_for("conversation.item.input_audio_transcription.completed")
    kw = h.stack.asr.kw[-1]
    assert (kw["request"].language, kw["request"].prompt) == ("de", "Zebrafink, Quokka")
    assert kw["owner"] == h.session.cfg.id
    assert 0.6 < done["usage"]["seconds"] <= 1.3 and done["usage"]["type"] == "duration"  # the committed audio
    h.manual()
    h.send("input_audio_buffer.clear")
    h.audio(speech_like(520))
    h.send("input_audio_buffer.commit")
    done = await h.wait_for("conversation.item.input_audio_transcription.completed", 2)
    assert done["usage"] == {"type": "duration", "seconds": 0.52} and h.stack.asr.calls[-1] == 0.52 * 16_000
    await h.session.close()


@pytest.mark.parametrize("beta", [False, True])
async def test_transcription_off_sends_no_transcription_events_but_the_turn_is_understood(beta):
    h = Harness(beta=beta)
    off = {"input_audio_transcription": None} if beta else {"type": "realtime",
                                                           "audio": {"input": {"transcription": None}}}
    h.send("session.update", session=off)
    h.audio(np.concatenate([speech_like(600), silence(700)]))
    await h.wait_for("response.done")
    assert not [e for e in h.events if "input_audio_transcription" in e["type"]]
    user = h.session.conv.items[0]
    assert user.text == "turn 1" and user.to_dict()["content"][0]["transcript"] is None
    assert {"role": "user", "content": "turn 1"} in h.stack.engine.requests[0][1]  # the LLM still heard it
    s = h.of("session.updated")[0]["session"]
    assert (s["input_audio_transcription"] if beta else s["audio"]["input"]["transcription"]) is None
    await h.session.close()


async def test_voices_resolve_the_same_way_on_both_paths():
    h = Harness()
    h.manual()
    assert h.error("session.update", session={"type": "realtime", "audio": {"output": {"voice": "robot9"}}}).param \
        == "session.audio.output.voice"
    assert h.error("response.create", response={"voice": "robot9"}).param == "response.voice"
    assert h.error("response.create", response={"audio": {"output": {"voice": "robot9"}}}).param == \
        "response.audio.output.voice"
    h.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": "marin"}}})
    assert h.session.cfg.voice == "fake"  # an OpenAI name maps to the default voice
    h.send("response.create", response={"voice": "alloy", "output_modalities": ["audio"]})
    done = await h.wait_for("response.done")
    assert done["response"]["audio"]["output"]["voice"] == "fake"
    await h.session.close()


@pytest.mark.parametrize("over, param", [
    ({"max_output_tokens": 10**9}, "response.max_output_tokens"),
    ({"max_output_tokens": -5}, "response.max_output_tokens"),
    ({"max_response_output_tokens": 0}, "response.max_response_output_tokens"),
    ({"conversation": "other"}, "response.conversation"),
    ({"input": [{"type": "message"}]}, "response.input"),
    ({"audio": "loud"}, "response.audio"),
    ({"instructions": "i" * 100_001}, "response.instructions"),
])
async def test_response_create_settings_are_bounded(over, param):
    h = Harness()
    assert h.error("response.create", response=over).param == param
    assert h.session.active is None and h.stack.engine.requests == []
    await h.session.close()


async def test_large_max_output_tokens_never_leaves_a_negative_prompt_budget():
    h = Harness()
    h.stack.max_model_len = 1024
    h.send("conversation.item.create", item=text_item("What time do you open?"))
    h.send("response.create", response={"max_output_tokens": 4096, "output_modalities": ["text"]})
    await h.wait_for("response.done")
    msgs = h.stack.engine.requests[0][1]
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "What time do you open?"}
    await h.session.close()


# -- bounded work per session ---------------------------------------------------------------------------
async def test_turns_while_a_response_runs_queue_at_most_one_response():
    slow = FakeEngine(reply=lambda m: " ".join(["word"] * 60), token_s=0.02)
    h = Harness(engine=slow)
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "interrupt_response": False}}}})
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.created")
    peak = 0
    for _ in range(5):  # five more turns while the first answer is still generating
        h.audio(np.concatenate([speech_like(350), silence(700)]))
        await asyncio.sleep(0.01)
        peak = max(peak, slow.stats().running)
    await h.wait_for("response.done", 2, timeout_s=20)
    await asyncio.sleep(0.2)
    # the first answer plus one for the newest turn; the queued ones in between were superseded before the engine
    assert len(slow.requests) == 2 and peak <= 3
    last_prompt = slow.requests[-1][1]
    assert sum(m["role"] == "user" for m in last_prompt) == 6  # it answers every turn the user took
    assert len(h.of("response.done")) == 2
    await h.session.close()


async def test_every_transcription_is_owned_by_its_session_and_speculation_replaces():
    h = Harness()
    h.audio(np.concatenate([speech_like(500), silence(300), speech_like(300), silence(700)]))
    await h.wait_for("response.done")
    owners = {kw["owner"] for kw in h.stack.asr.kw}
    assert owners == {h.session.cfg.id}
    assert any(kw["replace"] for kw in h.stack.asr.kw)  # the speculative finals
    await h.session.close()


# -- one big append does not hold the event loop ---------------------------------------------------------
async def test_a_big_append_is_fed_in_slices_with_the_loop_turning_between():
    from voicefast.intake import deliver

    h = Harness()
    # server_vad without responses: its turns end on silence alone (semantic_vad's checks wait for the ASR, which
    # a feed this fast outruns; a reply still playing would make each next utterance a candidate barge-in)
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "create_response": False}}}})
    fed: list[int] = []
    real_feed = h.session.feed_audio_async

    async def feed(x, **kw):
        fed.append(len(x))
        await real_feed(x, **kw)

    h.session.feed_audio_async = feed
    turns = 0

    async def ticker():  # another session's work: it runs whenever the loop turns
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    x = np.concatenate([silence(200), speech_like(600), silence(900)] * 25)  # 42.5 s: one 2 MiB append
    pcm = AudioFormat().encode(x)
    assert len(base64.b64encode(pcm)) > 2_000_000
    ev = h.proto.receive_message(json.dumps({"type": "input_audio_buffer.append", "event_id": "big",
                                             "audio": base64.b64encode(pcm).decode()}))
    before = turns
    await deliver(h.session, ev, inline_audio_ms=500)
    t.cancel()
    assert sum(fed) == len(x) and max(fed) == 24_000 // 2 and len(fed) == -(-len(x) // 12_000)
    assert turns - before >= len(fed) - 1  # the loop turned between every two slices
    # sliced or not, the audio means the same: 25 turns were detected
    assert len(h.of("input_audio_buffer.speech_stopped")) == 25
    bad = h.proto.receive_message(json.dumps({"type": "input_audio_buffer.append", "event_id": "odd",
                                              "audio": base64.b64encode(b"\x01\x02\x03").decode()}))
    fed.clear()
    with pytest.raises(ProtocolError) as e:
        await deliver(h.session, bad, inline_audio_ms=500)
    assert e.value.event_id == "odd" and e.value.code == "invalid_audio" and fed == []
    await h.session.close()
    # one append, however many slices, is told the buffer is full once
    small = Harness(max_input_buffer_s=10.0)
    small.manual()
    await deliver(small.session, ev, inline_audio_ms=500)
    assert [e["error"]["code"] for e in small.of("error")] == ["input_audio_buffer_full"]
    assert small.session.inbuf.samples == 10 * 16_000
    await small.session.close()


async def test_response_with_nothing_to_answer_is_refused_up_front():
    h = Harness()
    h.send("session.update", session={"type": "realtime", "instructions": ""})
    e = h.error("response.create", response={"conversation": "none"})  # found by the live fuzz test
    assert e.param == "response" and h.session.active is None
    e = h.error("response.create")
    assert e.param == "response"
    h.send("response.create", response={"instructions": "Say hello."})  # instructions alone are enough
    assert (await h.wait_for("response.done"))["response"]["status"] == "completed"
    await h.session.close()
