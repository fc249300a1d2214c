"""Session layer with fakes: client events / audio in -> server events out (no sockets)."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from fakes import FakeASR, FakeEngine, FakeTTS, make_stack, silence, speech_like

from voicefast.config import ServerConfig
from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat
from voicefast.protocol import RealtimeProtocol
from voicefast.session import Session
from voicefast.session_config import SessionConfig, TurnDetection

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Harness:
    def __init__(self, *, beta: bool = False, opts: ServerConfig | None = None, td: TurnDetection | None = None,
                 **stack_kw):
        self.events: list[dict] = []
        self.stack = make_stack(**stack_kw)
        self.proto = RealtimeProtocol(beta=beta)
        defaults = SessionConfig(instructions="You are a test.", voice="fake", turn_detection=td or TurnDetection())
        self.session = Session(self.stack, opts or ServerConfig(output_lead_ms=100), emit=self.events.append,
                               beta=beta, defaults=defaults)
        self.session.start()

    def send(self, type: str, **data) -> None:
        ev = self.proto.receive_message(json.dumps({"type": type, **data}))
        self.session.handle(ev)

    def audio(self, x: np.ndarray, chunk_ms: int = 20, fmt: AudioFormat = AudioFormat()) -> None:
        n = fmt.rate_hz * chunk_ms // 1000
        for i in range(0, len(x), n):
            self.send("input_audio_buffer.append", audio=base64.b64encode(fmt.encode(x[i:i + n])).decode())

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, t: str) -> list[dict]:
        return [e for e in self.events if e["type"] == t]

    async def wait_for(self, t: str, n: int = 1, timeout_s: float = 10.0) -> dict:
        async def poll():
            while len(self.of(t)) < n:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(poll(), timeout_s)
        return self.of(t)[n - 1]


async def test_spoken_turn_event_order_and_timings():
    h = Harness()
    h.audio(np.concatenate([silence(200), speech_like(600), silence(700)]))
    done = await h.wait_for("response.done")
    t = h.types()
    order = ["session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.added",
             "conversation.item.input_audio_transcription.completed", "response.created",
             "response.output_item.added", "response.content_part.added", "response.output_audio_transcript.delta",
             "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done",
             "response.content_part.done", "response.output_item.done", "response.done"]
    idx = [t.index(x) for x in order]
    assert idx == sorted(idx), t
    assert done["response"]["status"] == "completed"
    started = h.of("input_audio_buffer.speech_started")[0]
    stopped = h.of("input_audio_buffer.speech_stopped")[0]
    assert started["audio_start_ms"] == 200 and stopped["audio_end_ms"] == 800
    assert started["item_id"] == stopped["item_id"] == h.of("input_audio_buffer.committed")[0]["item_id"]
    assert h.of("conversation.item.input_audio_transcription.completed")[0]["transcript"] == "turn 1"
    timings = done["response"]["metadata"]["voicefast_timings"]
    assert timings["speech_end_audio_ms"] == 800
    for k in ("end_of_turn_delay_ms", "asr_final_ms", "llm_ttft_ms", "tts_first_audio_ms", "e2e_server_ms"):
        assert timings[k] is not None and timings[k] >= 0, (k, timings)
    assert timings["llm_tokens"] > 0 and timings["speculative"] is True
    # Speculative start: the LLM request was made from the transcript before the endpoint, with the same messages.
    (rid, msgs), = h.stack.engine.requests
    assert msgs == [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "turn 1"}]
    # The transcript deltas rebuild the reply text; the stored item holds it.
    text = "".join(e["delta"] for e in h.of("response.output_audio_transcript.delta"))
    assert text == h.stack.engine.reply([]) == done["response"]["output"][0]["content"][0]["transcript"]
    pcm = b"".join(base64.b64decode(e["delta"]) for e in h.of("response.output_audio.delta"))
    assert len(pcm) % 2 == 0 and len(pcm) > 24_000  # > 0.5 s of 24 kHz PCM16 (17 words x 50 ms)
    await h.session.close()


async def test_transcript_deltas_go_out_with_the_audio_that_speaks_them():
    h = Harness()
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.done")
    reply, said, heard_by_frame = h.stack.engine.reply([]), "", []
    for e in h.events:
        if e["type"] == "response.output_audio_transcript.delta":
            said += e["delta"]
        elif e["type"] == "response.output_audio.delta":
            heard_by_frame.append(said)
    assert said == reply
    # Each audio delta goes out after the text it speaks, not the whole reply up front: the transcript grows
    # frame by frame (17 words x 50 ms of fake speech in 100 ms frames), starting with part of the first phrase.
    assert 0 < len(heard_by_frame[0]) < len("Sure. We are open from nine")
    assert all(reply.startswith(t) for t in heard_by_frame) and heard_by_frame == sorted(heard_by_frame, key=len)
    assert len(set(heard_by_frame)) >= 6
    await h.session.close()


async def test_second_turn_carries_context():
    h = Harness(asr=FakeASR(["What time do you open?", "And on Sunday?"]))
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.done")
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.done", 2)
    msgs = h.stack.engine.requests[-1][1]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "What time do you open?" and msgs[3]["content"] == "And on Sunday?"
    assert msgs[2]["content"] == h.stack.engine.reply([])
    await h.session.close()


async def test_speculation_dropped_when_speech_resumes():
    h = Harness(engine=FakeEngine(ttft_s=0.05), td=TurnDetection(type="server_vad"))
    # 300 ms pause: early silence (200 ms) fires, the endpoint (500 ms) does not; then speech resumes.
    h.audio(np.concatenate([speech_like(400), silence(300)]))
    assert len(h.stack.engine.requests) == 0 or True
    await asyncio.sleep(0.1)  # let the speculative ASR + LLM start
    assert len(h.stack.engine.requests) == 1
    first_rid = h.stack.engine.requests[0][0]
    h.audio(np.concatenate([speech_like(400), silence(700)]))
    done = await h.wait_for("response.done")
    assert first_rid in h.stack.engine.aborted  # the speculative request was aborted
    assert "response.created" in h.types() and len(h.of("response.created")) == 1  # held output never sent
    assert len(h.of("input_audio_buffer.speech_started")) == 1 and len(h.of("input_audio_buffer.speech_stopped")) == 1
    assert done["response"]["status"] == "completed"
    assert h.stack.engine.stats().running == 0
    # The final ASR ran on the whole utterance (both speech parts + the pause).
    assert max(h.stack.asr.calls) >= 16 * 1100
    await h.session.close()


async def test_barge_in_cancels_and_truncates_to_what_was_heard():
    long = " ".join(f"word{i}." for i in range(60))
    engine = FakeEngine(reply=lambda m: long if len(m) <= 2 else "Okay.", token_s=0.01)
    h = Harness(engine=engine)
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.output_audio.delta", 3)
    await asyncio.sleep(0.5)  # the listener hears ~0.5 s (~10 words) before interrupting
    n_before = len(h.events)
    h.audio(speech_like(200))  # shorter than the 300 ms guard: no barge-in yet
    assert "input_audio_buffer.speech_started" not in h.types()[n_before:]
    h.audio(speech_like(200))  # now 400 ms of speech: its words are asked for; not a backchannel: barge-in
    await h.wait_for("input_audio_buffer.speech_started", 2)
    i_started = h.types().index("input_audio_buffer.speech_started", n_before)
    done = await h.wait_for("response.done")
    i_done = h.types().index("response.done")
    assert i_started < i_done
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    # no audio for the cancelled response after the interruption
    assert "response.output_audio.delta" not in h.types()[i_started:i_done]
    rid = done["response"]["id"]
    assert rid in engine.aborted and engine.stats().running == 0
    heard = done["response"]["output"][0]["content"][0]["transcript"]
    full = long
    assert full.startswith(heard) and 0 < len(heard) < len(full) // 2
    assert full[len(heard)] == " "  # cut between words, never inside one
    # Audio was paced (real time + lead), not dumped: far less audio sent than the whole reply.
    sent_ms = sum(len(base64.b64decode(e["delta"])) // 48 for e in h.of("response.output_audio.delta"))
    assert sent_ms < 60 * 100
    # The user's interrupting turn becomes the next turn, whose context holds only the heard text.
    h.audio(silence(700))
    await h.wait_for("response.done", 2)
    msgs = engine.requests[-1][1]
    assert msgs[2] == {"role": "assistant", "content": heard}
    await h.session.close()


async def test_short_noise_during_response_does_not_interrupt():
    engine = FakeEngine(reply=lambda m: " ".join(f"w{i}." for i in range(30)), token_s=0.005)
    h = Harness(engine=engine)
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.output_audio.delta", 2)
    h.audio(np.concatenate([speech_like(100), silence(600)]))
    done = await h.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    assert len(h.of("input_audio_buffer.speech_started")) == 1
    assert len(h.of("input_audio_buffer.committed")) == 1
    await h.session.close()


async def test_manual_mode_commit_and_response_create_text():
    h = Harness(asr=FakeASR(["hello there"]))
    h.send("session.update", session={"type": "realtime", "output_modalities": ["text"],
                                      "audio": {"input": {"turn_detection": None}}})
    assert h.of("session.updated")[0]["session"]["audio"]["input"]["turn_detection"] is None
    with pytest.raises(ProtocolError) as e:
        h.send("input_audio_buffer.commit")
    assert e.value.code == "input_audio_buffer_commit_empty"
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    assert "input_audio_buffer.speech_started" not in h.types()  # no VAD in manual mode
    h.send("input_audio_buffer.commit", event_id="c1")
    h.send("response.create")
    done = await h.wait_for("response.done")
    assert done["response"]["output_modalities"] == ["text"]
    assert "response.output_audio.delta" not in h.types()
    text = "".join(e["delta"] for e in h.of("response.output_text.delta"))
    assert text == h.of("response.output_text.done")[0]["text"] == h.stack.engine.reply([])
    assert h.stack.engine.requests[0][1][-1] == {"role": "user", "content": "hello there"}
    await h.session.close()


async def test_item_create_truncate_delete_retrieve_and_errors():
    h = Harness()
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    h.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "Hi"}]})
    added = h.of("conversation.item.added")[-1]
    assert added["item"]["content"][0]["text"] == "Hi" and h.of("conversation.item.done")
    h.send("response.create")
    with pytest.raises(ProtocolError) as e:
        h.send("response.create")
    assert e.value.code == "conversation_already_has_active_response"
    done = await h.wait_for("response.done")
    item = done["response"]["output"][0]
    with pytest.raises(ProtocolError) as e:
        h.send("conversation.item.truncate", item_id=item["id"], content_index=0, audio_end_ms=10 ** 7)
    assert e.value.param == "audio_end_ms"
    with pytest.raises(ProtocolError) as e:
        h.send("conversation.item.truncate", item_id="nope", content_index=0, audio_end_ms=0)
    assert e.value.code == "item_not_found"
    h.send("conversation.item.truncate", item_id=item["id"], content_index=0, audio_end_ms=250)
    assert h.of("conversation.item.truncated")[0]["audio_end_ms"] == 250
    h.send("conversation.item.retrieve", item_id=item["id"])
    kept = h.of("conversation.item.retrieved")[0]["item"]["content"][0]["transcript"]
    assert 0 < len(kept) < len(item["content"][0]["transcript"])
    assert item["content"][0]["transcript"].startswith(kept)
    h.send("conversation.item.delete", item_id=item["id"])
    assert h.of("conversation.item.deleted")[0]["item_id"] == item["id"]
    with pytest.raises(ProtocolError):
        h.send("conversation.item.delete", item_id=item["id"])
    with pytest.raises(ProtocolError) as e:
        h.send("response.cancel")
    assert e.value.code == "response_cancel_not_active"
    await h.session.close()


async def test_response_cancel_and_max_output_tokens():
    engine = FakeEngine(reply=lambda m: " ".join(f"w{i}." for i in range(50)), token_s=0.01)
    h = Harness(engine=engine)
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    h.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "Hi"}]})
    h.send("response.create")
    await h.wait_for("response.output_audio.delta")
    h.send("response.cancel")
    d = await h.wait_for("response.done")
    assert d["response"]["status"] == "cancelled"
    assert d["response"]["status_details"]["reason"] == "client_cancelled"
    h.send("response.create", response={"max_output_tokens": 3, "output_modalities": ["text"]})
    d = await h.wait_for("response.done", 2)
    assert d["response"]["status"] == "incomplete"
    assert d["response"]["status_details"]["reason"] == "max_output_tokens"
    assert engine.stats().running == 0
    await h.session.close()


async def test_g711_in_and_out_beta_names():
    h = Harness(beta=True)
    h.send("session.update", session={"input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw",
                                      "modalities": ["audio", "text"]})
    s = h.of("session.updated")[0]["session"]
    assert s["input_audio_format"] == "g711_ulaw" and s["output_audio_format"] == "g711_alaw"
    fmt = AudioFormat("audio/pcmu")
    h.audio(np.concatenate([speech_like(500, 8000), silence(700, 8000)]), fmt=fmt)
    done = await h.wait_for("response.done")
    assert done["response"]["status"] == "completed"
    # The session emits GA names; the protocol renames them for beta clients.
    frames = [json.loads(f) for e in h.events for f in h.proto.events_to_send(e)]
    types = [f["type"] for f in frames]
    assert "response.audio.delta" in types and "response.audio_transcript.delta" in types
    assert "response.output_audio.delta" not in types and "conversation.item.added" not in types
    assert "conversation.item.created" in types
    audio = b"".join(base64.b64decode(f["delta"]) for f in frames if f["type"] == "response.audio.delta")
    assert len(audio) > 4000  # > 0.5 s of 8 kHz G.711 (1 byte per sample)


async def test_close_mid_response_frees_everything():
    engine = FakeEngine(reply=lambda m: " ".join(f"w{i}." for i in range(100)), token_s=0.01)
    h = Harness(engine=engine)
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    await h.wait_for("response.output_audio.delta")
    before = {t for t in asyncio.all_tasks()}
    await h.session.close()
    await asyncio.sleep(0.05)
    assert engine.stats().running == 0 and engine.stats().free_blocks == engine.total_blocks
    assert engine.requests[0][0] in engine.aborted
    ours = ("response-", "produce-", "asr", "user-item")
    assert any(t.get_name().startswith(ours) for t in before)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(ours)]
    assert h.session.inbuf.samples == 0 and not h.session._tasks


async def test_tts_failure_fails_the_response_not_the_session():
    class BrokenTTS(FakeTTS):
        def synthesize(self, text, speaking_rate=None):
            raise RuntimeError("voice exploded")
            yield  # pragma: no cover

    h = Harness(tts=BrokenTTS())
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    d = await h.wait_for("response.done")
    assert d["response"]["status"] == "failed"
    err = d["response"]["status_details"]["error"]
    assert err["code"] == "stage_failed" and "exploded" not in err["message"]  # details stay in the server log
    h.send("session.update", session={"type": "realtime", "output_modalities": ["text"]})
    h.audio(np.concatenate([speech_like(500), silence(700)]))
    d = await h.wait_for("response.done", 2)
    assert d["response"]["status"] == "completed"
    await h.session.close()


async def test_speed_reaches_tts():
    h = Harness()
    h.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None},
                                                                    "output": {"speed": 1.5}}})
    h.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "Hi"}]})
    h.send("response.create")
    await h.wait_for("response.done")
    fast = sum(len(base64.b64decode(e["delta"])) for e in h.of("response.output_audio.delta"))
    words = len(h.stack.engine.reply([]).split())
    assert abs(fast / 48 - words * 50 / 1.5) < 50  # ms of 24 kHz PCM16 vs words x 50 ms / speed
    assert set(h.stack.voices["fake"].rates) == {1.5}
    await h.session.close()
