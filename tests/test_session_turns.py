"""Session turn-taking with fakes (energy VAD, scripted ASR, scripted end-of-turn model): semantic_vad, the
transcript witness, backchannels, the idle timeout, the ASR prompt and the turn_detection settings."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fakes import FakeASR, FakeEngine, FakeTurnModel, FakeVad, silence, speech_like
from test_session import Harness

from voicefast.config import ServerConfig
from voicefast.errors import ProtocolError
from voicefast.session_config import TurnDetection

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def until(cond, timeout_s: float = 10.0) -> None:
    async def poll():
        while not cond():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout_s)


def timings(done: dict) -> dict:
    return done["response"]["metadata"]["voicefast_timings"]


async def test_complete_turn_ends_at_the_first_check():
    h = Harness(asr=FakeASR(["What time do you open on Saturday?"]), turn_model=FakeTurnModel(0.93))
    h.audio(np.concatenate([speech_like(600), silence(400)]))  # 400 ms: a 500 ms window would never close
    done = await h.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    t = timings(done)
    assert t["end_of_turn_reason"] == "complete" and t["end_of_turn_checks"] == 1
    # FakeVad judges 20 ms frames (the 160 ms check fires at 160 ms) of 24 -> 16 kHz resampled 20 ms chunks.
    silence_ms = t["end_of_turn_silence_ms"]
    assert 160 <= silence_ms < 220 and t["turn_probability"] == 0.93
    assert t["speculative"] is True and t["turn_model_ms"] is not None
    assert h.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"] == 600
    (call,) = h.stack.turn_model.calls  # the model heard the turn (300 ms padding is before the start) + the pause
    assert abs(call - 16 * (600 + silence_ms)) < 16
    await h.session.close()


async def test_the_transcript_starts_before_the_model_is_asked():
    """auto: the pause's ASR final (and the held reply on it) starts at 64 ms of silence, the end-of-turn model is
    asked at 160 ms on the longer audio; the turn ends when both have answered, dated at the model's check."""
    h = Harness(asr=FakeASR(["What time do you open on Saturday?"]), turn_model=FakeTurnModel(0.93))
    h.audio(np.concatenate([speech_like(600), silence(400)]))
    done = await h.wait_for("response.done")
    t = timings(done)
    assert t["end_of_turn_reason"] == "complete" and t["end_of_turn_checks"] == 1
    (asr_call,) = [n for n in h.stack.asr.calls if n > 16 * 600]  # the check's final (partials are the fake's own)
    (model_call,) = h.stack.turn_model.calls
    assert 16 * (600 + 64) <= asr_call < 16 * (600 + 100)  # 64 ms of silence, rounded up to the fake's 20 ms frames
    assert 16 * (600 + 160) <= model_call < 16 * (600 + 200) and t["end_of_turn_silence_ms"] >= 160
    await h.session.close()


async def test_turn_transcript_ms_zero_takes_both_witnesses_at_the_check():
    opts = ServerConfig(output_lead_ms=100, turn_transcript_ms=0)

    def vad(td):  # as the loader's factory: the VAD's early silence follows the server's setting
        p = td.policy(**opts.turn_policy_kw())
        return FakeVad(silence_ms=p.end_silence_ms, early_ms=p.early_ms)

    h = Harness(asr=FakeASR(["What time do you open on Saturday?"]), turn_model=FakeTurnModel(0.93), opts=opts,
                vad_factory=vad)
    h.audio(np.concatenate([speech_like(600), silence(400)]))
    await h.wait_for("response.done")
    (asr_call,) = [n for n in h.stack.asr.calls if n > 16 * 600]
    (model_call,) = h.stack.turn_model.calls
    assert asr_call == model_call and model_call >= 16 * (600 + 160)
    await h.session.close()


async def test_unfinished_words_outvote_the_audio_model_and_the_pause_is_bridged():
    asr = FakeASR(["I'd like to book a table for", "I'd like to book a table for four people on Friday."])
    h = Harness(asr=asr, turn_model=FakeTurnModel(0.97), engine=FakeEngine(ttft_s=0.05))
    h.audio(np.concatenate([speech_like(700), silence(800)]))  # a thinking pause inside the phrase
    await until(lambda: h.stack.engine.requests and h.session.turns.utt.check.complete is not None)
    assert h.session.turns.utt.check.why == "trailing preposition 'for'"
    assert "input_audio_buffer.speech_stopped" not in h.types()  # "for ..." is not a finished turn
    (rid, _), = h.stack.engine.requests  # the speculative reply started at the check, held
    h.audio(np.concatenate([speech_like(900), silence(400)]))
    done = await h.wait_for("response.done")
    assert rid in h.stack.engine.aborted  # speech resumed: the first speculation was dropped
    assert len(h.of("input_audio_buffer.committed")) == 1 and len(h.of("response.created")) == 1
    (completed,) = h.of("conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == "I'd like to book a table for four people on Friday."
    t = timings(done)
    assert t["end_of_turn_reason"] == "complete" and t["end_of_turn_checks"] == 2
    assert h.stack.engine.requests[-1][1][-1]["content"] == completed["transcript"]
    await h.session.close()


async def test_low_probability_ends_at_the_eagerness_maximum_silence():
    h = Harness(turn_model=FakeTurnModel(0.05), td=TurnDetection(type="semantic_vad", eagerness="high"))
    h.audio(np.concatenate([speech_like(600), silence(200)]))  # the check (at 96 ms of silence) is answered ...
    await until(lambda: h.session.turns.utt is not None and h.session.turns.utt.check is not None
                and h.session.turns.utt.check.complete is False)
    assert "input_audio_buffer.speech_stopped" not in h.types()
    h.audio(silence(500))  # ... "not done", so the turn ends at high's maximum silence
    done = await h.wait_for("response.done")
    t = timings(done)
    assert t["end_of_turn_reason"] == "max_silence" and t["end_of_turn_silence_ms"] == 500
    assert t["turn_not_done_because"] == "audio 0.05 < 0.1"
    await h.session.close()


async def test_backchannel_during_the_reply_does_not_cancel_it():
    reply = " ".join(f"w{i}." for i in range(40))
    asr = FakeASR(["What are your opening hours?", "Mm-hmm."])
    h = Harness(asr=asr, engine=FakeEngine(reply=lambda m: reply, token_s=0.005))
    h.audio(np.concatenate([speech_like(600), silence(300)]))
    await h.wait_for("response.output_audio.delta", 2)
    h.audio(np.concatenate([speech_like(450), silence(300)]))  # "mm-hm": longer than the 300 ms noise guard
    done = await h.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    assert len(h.of("input_audio_buffer.speech_started")) == 1 and len(h.of("input_audio_buffer.committed")) == 1
    assert len(asr.calls) == 2  # the backchannel was transcribed to tell it from an interruption
    await h.session.close()


async def test_long_speech_during_the_reply_interrupts_whatever_its_words():
    reply = " ".join(f"w{i}." for i in range(80))
    asr = FakeASR(["Hello?", "Okay", "Okay okay so what about Sunday"], delay_s=0.01)
    h = Harness(asr=asr, engine=FakeEngine(reply=lambda m: reply if len(m) <= 2 else "Sure.", token_s=0.005))
    h.audio(np.concatenate([speech_like(600), silence(300)]))
    await h.wait_for("response.output_audio.delta", 2)
    h.audio(speech_like(1000))  # starts like a backchannel, goes on past backchannel_max_ms (900)
    done = await h.wait_for("response.done")
    assert done["response"]["status"] == "cancelled" and done["response"]["status_details"]["reason"] == "turn_detected"
    await h.session.close()


async def test_idle_timeout_commits_the_silence_and_answers():
    h = Harness(asr=FakeASR(["Hi there.", ""]), engine=FakeEngine(reply=lambda m: "Hello.", token_s=0.001))
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "silence_duration_ms": 300, "idle_timeout_ms": 1000}}}})
    h.audio(np.concatenate([speech_like(500), silence(400)]))
    await h.wait_for("response.done")
    n_before = len(h.events)
    h.audio(silence(2000))  # the reply's ~50 ms of audio finished playing long before: 1 s later the timeout fires
    fired = await h.wait_for("input_audio_buffer.timeout_triggered")
    assert 1000 <= fired["audio_end_ms"] - fired["audio_start_ms"] <= 1100
    done = await h.wait_for("response.done", 2)
    types = h.types()[n_before:]
    assert types.index("input_audio_buffer.timeout_triggered") < types.index("input_audio_buffer.committed") \
        < types.index("response.created")
    assert h.of("input_audio_buffer.committed")[-1]["item_id"] == fired["item_id"]
    assert done["response"]["status"] == "completed" and timings(done)["end_of_turn_reason"] == "idle_timeout"
    h.audio(silence(2000))
    assert len(h.of("input_audio_buffer.timeout_triggered")) == 2  # armed again by the second reply's playback
    await h.session.close()


async def test_asr_prompt_is_the_conversation_plus_the_clients_own():
    asr = FakeASR(["When do you open?", "And on Sunday?"])
    h = Harness(asr=asr, engine=FakeEngine(reply=lambda m: "We open at nine on Main Street."))
    h.send("session.update", session={
        "instructions": "You work at Maple Street Outfitters in Springfield.",
        "audio": {"input": {"transcription": {"prompt": "Order numbers have 5 digits.", "language": "en"}}}})
    assert h.of("session.updated")[-1]["session"]["audio"]["input"]["transcription"]["prompt"] == \
        "Order numbers have 5 digits."
    h.audio(np.concatenate([speech_like(500), silence(300)]))
    await h.wait_for("response.done")
    h.audio(np.concatenate([speech_like(500), silence(300)]))
    await h.wait_for("response.done", 2)
    first, last = asr.prompts[0], asr.prompts[-1]
    assert first == "Order numbers have 5 digits. Maple Street Outfitters, Springfield."
    assert last == first + " We open at nine on Main Street."  # the reply the caller is answering comes last
    # one path for every decode: the session's lane of the ASR pool, its language, the prompt above; each
    # check's final is replaceable only by a newer check of its own utterance (the committed item)
    assert {kw["owner"] for kw in asr.kw} == {h.session.cfg.id}
    assert {kw["request"].language for kw in asr.kw} == {"en"}
    committed = [e["item_id"] for e in h.of("input_audio_buffer.committed")]
    assert [kw["replace"] for kw in asr.kw] == committed
    await h.session.close()


@pytest.mark.parametrize("td, param", [
    ({"type": "semantic_vad", "silence_duration_ms": 500}, "session.audio.input.turn_detection.silence_duration_ms"),
    ({"type": "semantic_vad", "eagerness": "eager"}, "session.audio.input.turn_detection.eagerness"),
    ({"type": "server_vad", "eagerness": "high"}, "session.audio.input.turn_detection.eagerness"),
    ({"type": "vad"}, "session.audio.input.turn_detection.type"),
])
async def test_turn_detection_settings_rejected_by_name(td, param):
    h = Harness()
    with pytest.raises(ProtocolError) as e:
        h.send("session.update", session={"audio": {"input": {"turn_detection": td}}})
    assert e.value.param == param
    await h.session.close()


async def test_semantic_vad_is_the_default_and_echoes_the_ga_shape():
    h = Harness()
    td = h.of("session.created")[0]["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "semantic_vad" and td["eagerness"] == "auto" and "silence_duration_ms" not in td
    h.send("session.update", session={"audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "low", "create_response": False, "interrupt_response": False}}}})
    td = h.of("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
    assert (td["eagerness"], td["create_response"], td["interrupt_response"]) == ("low", False, False)
    h.send("session.update", session={"audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
    td = h.of("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "server_vad" and td["silence_duration_ms"] == 500 and "eagerness" not in td
    await h.session.close()


async def test_create_response_false_commits_without_answering():
    h = Harness(td=TurnDetection(type="semantic_vad", create_response=False))
    h.audio(np.concatenate([speech_like(500), silence(400)]))
    await h.wait_for("conversation.item.input_audio_transcription.completed")
    await asyncio.sleep(0.1)
    assert "response.created" not in h.types() and h.stack.engine.requests == []
    await h.session.close()


async def test_held_reply_that_spoke_before_its_release_begins_its_message_once():
    # The model says "not done" at the check, so the turn ends at high's 500 ms maximum silence: the speculative
    # reply made its first words while held, and its release must begin the message item once (twice was
    # "item id ... already exists": stage_failed, no reply).
    h = Harness(turn_model=FakeTurnModel(0.05), td=TurnDetection(type="semantic_vad", eagerness="high"),
                engine=FakeEngine(ttft_s=0.0, token_s=0.001))
    h.audio(np.concatenate([speech_like(600), silence(700)]))
    done = await h.wait_for("response.done")
    assert done["response"]["status"] == "completed", done["response"].get("status_details")
    t = timings(done)
    assert t["speculative"] is True and t["end_of_turn_reason"] == "max_silence"
    assistant = [e for e in h.of("conversation.item.added") if e["item"]["role"] == "assistant"]
    assert len(assistant) == 1 and len(h.of("response.output_item.added")) == 1
    assert len(h.of("response.content_part.added")) == 1
    await h.session.close()
