"""The server with the REAL embedded models (Silero VAD, Whisper tiny.en, SmolLM2 engine, Piper), started once
per module in its own thread, driven by the official openai SDK with Piper-spoken questions."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from real_server import running_real_server
from speech import load_wav, speech_wav
from websockets.asyncio.client import connect

from voicefast.config import ServerConfig

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def real():
    opts = ServerConfig(host="127.0.0.1", port=0, max_output_tokens=24, max_message_bytes=256 * 1024,
                        torch_threads=2, asr_cpu_threads=1)
    with running_real_server(opts, "real-server") as (server, stack, _):
        yield server, stack


def question_chunks(text: str, chunk_ms: int = 40, trail_ms: int = 900) -> list[str]:  # 24 kHz PCM16, base64
    x, rate = load_wav(speech_wav(text, rate_hz=24_000, lead_silence_ms=200, trail_silence_ms=trail_ms))
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    step = rate * chunk_ms // 1000 * 2
    return [base64.b64encode(pcm[i:i + step]).decode() for i in range(0, len(pcm), step)]


async def speak(conn, text: str, pace_s: float = 0.02) -> None:
    for chunk in question_chunks(text):
        await conn.input_audio_buffer.append(audio=chunk)
        await asyncio.sleep(pace_s)  # about 2x real time: the VAD and partials see a live-like stream


async def collect_turn(conn, timeout_s: float = 90) -> dict:
    got = {"types": [], "user": None, "text": "", "audio": b"", "done": None}
    async with asyncio.timeout(timeout_s):
        async for ev in conn:
            got["types"].append(ev.type)
            if ev.type == "conversation.item.input_audio_transcription.completed":
                got["user"] = ev.transcript
            elif ev.type == "response.output_audio_transcript.delta":
                got["text"] += ev.delta
            elif ev.type == "response.output_audio.delta":
                got["audio"] += base64.b64decode(ev.delta)
            elif ev.type == "error":
                raise AssertionError(f"error event: {ev.error}")
            elif ev.type == "response.done":
                got["done"] = ev.response
                return got


def client_for(server) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="local", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")


async def test_two_spoken_turns_with_context(real):
    server, stack = real
    async with client_for(server).realtime.connect(model="voicefast") as conn:
        sender = asyncio.create_task(speak(conn, "What time do you open on Saturday?"))
        t1 = await collect_turn(conn)
        await sender
        for t in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                  "input_audio_buffer.committed", "response.created", "response.output_audio.delta"):
            assert t in t1["types"], t
        assert t1["types"].index("input_audio_buffer.speech_stopped") < t1["types"].index("response.created")
        from audio.wer import normalize_words, word_error_rate

        # The fixture is synthesized with a fixed seed (tests/speech.py), so this transcript is the same on every
        # run (measured: exact). The bound is what 20 other seeds gave through this very path
        # (`python -m bench.asr_variation`): 19 exact, one "open on setter day?" (2 of 7 words), so a fixture that
        # differs on another CPU still passes, and the content words must be there whatever the seed.
        assert word_error_rate("What time do you open on Saturday?", t1["user"]) <= 2 / 7, t1["user"]
        assert {"what", "time", "open"} <= set(normalize_words(t1["user"])), t1["user"]
        assert t1["done"].status in ("completed", "incomplete") and t1["text"].strip()
        assert len(t1["audio"]) > 24_000  # > 0.5 s of 24 kHz PCM16 speech
        tim = t1["done"].metadata["voicefast_timings"]
        assert tim["speech_end_audio_ms"] > 1000 and tim["e2e_server_ms"] > 0 and tim["llm_tokens"] > 0
        print("turn 1 timings:", json.dumps(tim))

        sender = asyncio.create_task(speak(conn, "Where is your nearest shop located?"))
        t2 = await collect_turn(conn)
        await sender
        assert "located" in t2["user"].lower() or "shop" in t2["user"].lower()
        assert t2["done"].status in ("completed", "incomplete")
        # The second prompt extends the first (same chat messages): the engine's prefix cache reuses it.
        usage = t2["done"].usage
        assert usage.input_token_details.cached_tokens >= t1["done"].usage.input_tokens // 2
        session = next(iter(server.sessions))
        roles = [it.role for it in session.conv.items]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert session.conv.items[0].text == t1["user"] and session.conv.items[1].text == t1["done"].output[0] \
            .content[0].transcript
        print("turn 2 timings:", json.dumps(t2["done"].metadata["voicefast_timings"]))


async def ask_for_a_long_reply(conn, max_output_tokens: int) -> None:
    await conn.session.update(session={"type": "realtime", "max_output_tokens": max_output_tokens})
    await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Please explain your return policy and your shipping policy in detail."}]})
    await conn.response.create()


async def test_barge_in_cancels_frees_blocks_and_truncates(real):
    server, stack = real
    async with client_for(server).realtime.connect(model="voicefast") as conn:
        await ask_for_a_long_reply(conn, 120)
        said, item_id, sender, types = "", None, None, []
        async with asyncio.timeout(90):
            async for ev in conn:
                types.append(ev.type)
                if ev.type == "response.output_audio_transcript.delta":
                    said += ev.delta
                elif ev.type == "response.output_audio.delta" and sender is None:
                    item_id = ev.item_id
                    sender = asyncio.create_task(speak(conn, "Can I speak with a manager please?", pace_s=0.04))
                elif ev.type == "response.done":
                    done = ev.response
                    break
        assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
        i_started = types.index("input_audio_buffer.speech_started")
        assert i_started < len(types) - 1
        assert "response.output_audio.delta" not in types[i_started + 1:]
        heard = done.output[0].content[0].transcript
        assert said.startswith(heard) or heard == ""
        async with asyncio.timeout(30):
            while stack.engine.stats().running:
                await asyncio.sleep(0.05)
        st = stack.engine.stats()
        assert st.running == 0 and st.free_blocks == st.total_blocks
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=0)
        await conn.conversation.item.retrieve(item_id=item_id)
        truncated = retrieved = None
        async with asyncio.timeout(60):
            async for ev in conn:
                if ev.type == "conversation.item.truncated":
                    truncated = ev
                elif ev.type == "conversation.item.retrieved":
                    retrieved = ev.item
                    break
        assert truncated.audio_end_ms == 0 and retrieved.content[0].transcript == ""
        await sender


async def test_bad_input_answered_while_another_session_talks(real):
    server, stack = real

    async def good_turn():
        async with client_for(server).realtime.connect(model="voicefast") as conn:
            sender = asyncio.create_task(speak(conn, "How much does the premium plan cost per month?"))
            t = await collect_turn(conn)
            await sender
            return t

    async def bad_inputs():
        codes = []
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            for msg in ("{oops", "[]", '{"type": "nope"}', '{"type": "input_audio_buffer.append", "audio": "%"}',
                        '{"type": "input_audio_buffer.append", "audio": "AAEC"}', '{"type": "session.update", '
                        '"session": {"audio": {"input": {"format": {"type": "audio/flac"}}}}}',
                        '{"type": "input_audio_buffer.commit"}', '{"type": "response.cancel"}',
                        '{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 1}'):
                await ws.send(msg)
                ev = json.loads(await ws.recv())
                assert ev["type"] == "error", ev
                codes.append(ev["error"]["code"])
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 400_000}))
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
        return codes

    turn, codes = await asyncio.gather(good_turn(), bad_inputs())
    assert codes == ["invalid_json", "invalid_event", "invalid_event_type", "invalid_base64", "invalid_audio",
                     "invalid_value", "input_audio_buffer_commit_empty", "response_cancel_not_active",
                     "item_not_found"]
    assert turn["done"].status in ("completed", "incomplete") and turn["user"] and len(turn["audio"]) > 0


def paused_chunks(first: str, second: str, pause_ms: int, chunk_ms: int = 40) -> list[str]:
    """`first`, a thinking pause, `second` (each phrase spoken by Piper on its own), 24 kHz PCM16 chunks."""
    from speech import resample_whole, synthesize_piper

    from bench.voice.utterances import trim_to_speech

    a, rate = synthesize_piper(first)
    b, _ = synthesize_piper(second)
    x = np.concatenate([np.zeros(rate // 5, np.float32), trim_to_speech(a, rate),
                        np.zeros(rate * pause_ms // 1000, np.float32), b, np.zeros(rate, np.float32)])
    pcm = (np.clip(resample_whole(x, rate, 24_000), -1, 1) * 32767).astype("<i2").tobytes()
    step = 24_000 * chunk_ms // 1000 * 2
    return [base64.b64encode(pcm[i:i + step]).decode() for i in range(0, len(pcm), step)]


async def send_paced(conn, chunks: list[str], pace_s: float = 0.04) -> None:
    for chunk in chunks:
        await conn.input_audio_buffer.append(audio=chunk)
        await asyncio.sleep(pace_s)  # real time: the pause is a pause to the server too


async def test_semantic_vad_answers_at_the_check_not_after_the_old_window(real):
    server, stack = real
    async with client_for(server).realtime.connect(model="voicefast") as conn:
        chunks = question_chunks("What time do you open on Saturday?", trail_ms=450)  # a 500 ms window never closes
        sender = asyncio.create_task(send_paced(conn, chunks))
        t = await collect_turn(conn)
        await sender
        tim = t["done"].metadata["voicefast_timings"]
        print("semantic_vad timings:", json.dumps(tim))
        assert t["done"].status in ("completed", "incomplete")
        assert tim["end_of_turn_reason"] == "complete" and 1 <= tim["end_of_turn_checks"] <= 2  # 2: a gap between words
        assert tim["end_of_turn_silence_ms"] < 500 and tim["end_of_turn_delay_ms"] is not None
        assert tim["turn_probability"] >= 0.5 and tim["speculative"] is True


async def test_a_thinking_pause_mid_sentence_is_one_turn(real):
    server, stack = real
    async with client_for(server).realtime.connect(model="voicefast") as conn:
        sender = asyncio.create_task(send_paced(conn, paused_chunks("I'd like to book a table for",
                                                                    "four people on Friday.", 800)))
        t = await collect_turn(conn)
        await sender
        assert t["types"].count("input_audio_buffer.committed") == 1 and t["types"].count("response.created") == 1
        assert t["done"].status in ("completed", "incomplete"), t["done"].status_details
        assert "people" in t["user"].lower() and "table" in t["user"].lower(), t["user"]
        # a check at the thinking pause (kept listening) and one at the end; a short gap between words (>= 64 ms,
        # the transcript's silence) may add one that the resumed speech dropped
        assert 2 <= t["done"].metadata["voicefast_timings"]["end_of_turn_checks"] <= 4
        session = next(s for s in server.sessions if s.conv.items)
        assert [it.role for it in session.conv.items] == ["user", "assistant"]


async def test_backchannel_does_not_cancel_the_reply(real):
    server, stack = real
    async with client_for(server).realtime.connect(model="voicefast") as conn:
        await ask_for_a_long_reply(conn, 60)
        sender, types = None, []
        async with asyncio.timeout(180):
            async for ev in conn:
                types.append(ev.type)
                if ev.type == "response.output_audio.delta" and sender is None:
                    sender = asyncio.create_task(send_paced(conn, question_chunks("Okay.", trail_ms=600)))
                elif ev.type == "response.done":
                    done = ev.response
                    break
        await sender
        assert done.status in ("completed", "incomplete"), done.status_details  # not cancelled
        assert "input_audio_buffer.speech_started" not in types and "input_audio_buffer.committed" not in types


async def test_tool_round_trip_with_the_openai_sdk(real):
    """A forced function call through the official SDK: the arguments validate against the tool's schema, the
    page-style client answers with function_call_output, and the spoken answer uses the result."""
    import jsonschema

    server, stack = real
    tool = {"type": "function", "name": "check_order_status", "description": "Look up an order by its number",
            "parameters": {"type": "object", "properties": {"order_number": {"type": "string"}},
                           "required": ["order_number"]}}
    async with client_for(server).realtime.connect(model="voicefast") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "tools": [tool],
                                           "audio": {"input": {"turn_detection": None}}})
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Where is my order A1234?"}]})
        # Greedy (temperature 0) both times: what a 135M model sampling at 0.3 says depends on the server's random
        # state, i.e. on every reply sampled before in the module (it flaked in CI: '... "check_order_status_fri.').
        await conn.response.create(response={"tool_choice": {"type": "function", "name": "check_order_status"},
                                             "temperature": 0})
        got = {"types": [], "args": "", "done": None}
        async with asyncio.timeout(120):
            async for ev in conn:
                got["types"].append(ev.type)
                if ev.type == "error":
                    raise AssertionError(f"error event: {ev.error}")
                if ev.type == "response.function_call_arguments.delta":
                    got["args"] += ev.delta
                if ev.type == "response.done":
                    got["done"] = ev.response
                    break
        assert got["done"].status == "completed", got["done"].status_details
        call = next(o for o in got["done"].output if o.type == "function_call")
        assert call.name == "check_order_status" and call.arguments == got["args"]
        jsonschema.validate(json.loads(call.arguments), tool["parameters"])
        assert "response.function_call_arguments.done" in got["types"]
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                  "output": json.dumps({"status": "shipped", "arrives": "Friday"})})
        await conn.response.create(response={"temperature": 0})
        answer = await collect_turn(conn)
        assert answer["done"].status in ("completed", "incomplete")
        said = answer["text"].lower()
        assert "shipped" in said or "friday" in said, said  # the answer used the tool's result
        assert len(answer["audio"]) > 24_000
