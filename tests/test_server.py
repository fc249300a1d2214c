"""The real server on 127.0.0.1:0 with fake models, driven by the official openai SDK and raw websockets."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets
from fakes import FakeEngine, make_stack, silence, speech_like
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from voicefast.config import ServerConfig
from voicefast.formats import AudioFormat
from voicefast.server import RealtimeServer
from voicefast.session_config import SessionConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Running:
    def __init__(self, **opts):
        stack_kw = opts.pop("stack_kw", {})
        self.stack = make_stack(**stack_kw)
        self.server = RealtimeServer(self.stack, ServerConfig(host="127.0.0.1", port=0, output_lead_ms=100, **opts),
                                     defaults=SessionConfig(instructions="Test persona.", voice="fake"))

    async def __aenter__(self):
        await self.server.start()
        self.ws_url = f"ws://127.0.0.1:{self.server.port}/v1/realtime"
        return self

    async def __aexit__(self, *exc):
        await self.server.close()

    async def get(self, path: str, headers: dict | None = None):
        return await asyncio.to_thread(self._get, path, headers)

    def _get(self, path: str, headers: dict | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.server.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read()


def b64(x: np.ndarray, fmt: AudioFormat = AudioFormat()) -> str:
    return base64.b64encode(fmt.encode(x)).decode()


def turn_audio(speech_ms: int = 500) -> list[str]:
    x = np.concatenate([silence(100), speech_like(speech_ms), silence(700)])
    return [b64(x[i:i + 960]) for i in range(0, len(x), 960)]  # 40 ms chunks


async def recv_until(ws, t: str, timeout_s: float = 10.0) -> list[dict]:
    got = []
    async with asyncio.timeout(timeout_s):
        while True:
            ev = json.loads(await ws.recv())
            got.append(ev)
            if ev["type"] == t:
                return got


async def test_openai_sdk_drives_a_spoken_turn():
    async with Running() as srv:
        client = AsyncOpenAI(api_key="unused", websocket_base_url=f"ws://127.0.0.1:{srv.server.port}/v1")
        async with client.realtime.connect(model="voicefast") as conn:
            await conn.session.update(session={
                "type": "realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}},
                          "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}}})
            for chunk in turn_audio():
                await conn.input_audio_buffer.append(audio=chunk)
            types, audio, transcript = [], b"", ""
            async with asyncio.timeout(10):
                async for ev in conn:
                    types.append(ev.type)
                    if ev.type == "session.updated":
                        assert ev.session.instructions == "Be brief."
                        assert ev.session.audio.input.turn_detection.silence_duration_ms == 400
                    elif ev.type == "response.output_audio.delta":
                        audio += base64.b64decode(ev.delta)
                    elif ev.type == "response.output_audio_transcript.delta":
                        transcript += ev.delta
                    elif ev.type == "conversation.item.input_audio_transcription.completed":
                        assert ev.transcript == "turn 1"
                    elif ev.type == "response.done":
                        assert ev.response.status == "completed"
                        assert ev.response.output[0].content[0].transcript == transcript
                        assert ev.response.metadata["voicefast_timings"]["llm_tokens"] > 0
                        break
            for t in ("session.created", "session.updated", "input_audio_buffer.speech_started",
                      "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added",
                      "response.created", "response.output_audio.delta", "response.output_audio.done"):
                assert t in types, t
            assert transcript == srv.stack.engine.reply([]) and len(audio) > 24_000
            assert srv.stack.engine.requests[0][1][0] == {"role": "system", "content": "Be brief."}
        metrics = (await srv.get("/metrics"))[2].decode()
        for name in ("e2e", "llm_ttft", "asr_final", "tts_first_audio", "end_of_turn_delay"):
            assert f"voicefast_{name}_seconds_count 1.0" in metrics, name
        assert 'voicefast_responses_total{status="completed"} 1.0' in metrics


async def test_auth_bearer_and_subprotocol():
    async with Running(api_keys=("s3cret",)) as srv:
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(srv.ws_url):
                pass
        assert e.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus):
            async with connect(srv.ws_url, additional_headers={"Authorization": "Bearer wrong"}):
                pass
        async with connect(srv.ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(srv.ws_url, subprotocols=["realtime", "openai-insecure-api-key.s3cret"]) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"
        # the SDK sends the key as a Bearer header
        client = AsyncOpenAI(api_key="s3cret", websocket_base_url=f"ws://127.0.0.1:{srv.server.port}/v1")
        async with client.realtime.connect(model="voicefast") as conn:
            assert (await conn.recv()).type == "session.created"
        assert srv.server.metrics.rejected_total.labels("auth")._value.get() == 2


async def test_session_limit_and_origin():
    async with Running(max_sessions=1, allowed_origins=("https://app.example",)) as srv:
        async with connect(srv.ws_url) as first:
            assert json.loads(await first.recv())["type"] == "session.created"
            async with connect(srv.ws_url) as second:
                ev = json.loads(await second.recv())
                assert ev["type"] == "error" and ev["error"]["code"] == "session_limit_reached"
                with pytest.raises(websockets.ConnectionClosed):
                    await second.recv()
                assert second.close_code == 1008
        await asyncio.sleep(0.05)
        port = srv.server.port
        for origin, ok in (("http://evil.example", False), (f"http://127.0.0.1:{port}", True),
                           ("https://app.example", True)):
            if ok:
                async with connect(srv.ws_url, origin=origin) as ws:
                    assert json.loads(await ws.recv())["type"] == "session.created"
                await asyncio.sleep(0.05)
            else:
                with pytest.raises(websockets.InvalidStatus) as e:
                    async with connect(srv.ws_url, origin=origin):
                        pass
                assert e.value.response.status_code == 403


async def test_bad_input_gets_errors_and_the_session_survives():
    async with Running(max_message_bytes=64 * 1024) as srv, connect(srv.ws_url) as ws:
        await recv_until(ws, "session.created")
        bad = [("{not json", "invalid_json"), ("[1, 2]", "invalid_event"), ('{"type": "nope"}', "invalid_event_type"),
               ('{"type": "input_audio_buffer.append"}', "missing_required_parameter"),
               ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_base64"),
               ('{"type": "input_audio_buffer.append", "audio": "AAEC"}', "invalid_audio"),
               ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/mp3"}}}}}',
                "invalid_value"),
               ('{"type": "input_audio_buffer.commit", "event_id": "e7"}', "input_audio_buffer_commit_empty"),
               ('{"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": 5}',
                "item_not_found"),
               ('{"type": "response.cancel"}', "response_cancel_not_active")]
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        await recv_until(ws, "session.updated")
        for msg, code in bad:
            await ws.send(msg)
            ev = json.loads(await ws.recv())
            assert ev["type"] == "error" and ev["error"]["code"] == code, (msg, ev)
        assert ev["error"]["event_id"] is None
        await ws.send('{"type": "input_audio_buffer.commit", "event_id": "e7"}')
        ev = json.loads(await ws.recv())
        assert ev["error"]["event_id"] == "e7"
        await ws.send(b"\x00\x01")
        assert json.loads(await ws.recv())["error"]["code"] == "invalid_frame"
        # still alive: a text turn completes
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
        evs = await recv_until(ws, "response.done")
        assert evs[-1]["response"]["status"] == "completed"


async def test_oversized_message_closes_only_that_connection():
    async with Running(max_message_bytes=16 * 1024) as srv, connect(srv.ws_url) as good, \
            connect(srv.ws_url, max_size=None) as bad:
        await recv_until(good, "session.created")
        await recv_until(bad, "session.created")
        await bad.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 40_000}))
        with pytest.raises(websockets.ConnectionClosed):
            await bad.recv()
        assert bad.close_code == 1009
        for chunk in turn_audio():
            await good.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        evs = await recv_until(good, "response.done")
        assert evs[-1]["response"]["status"] == "completed"


async def test_client_vanishing_mid_response_frees_everything():
    engine = FakeEngine(reply=lambda m: " ".join(f"w{i}." for i in range(200)), token_s=0.01)
    async with Running(stack_kw={"engine": engine}) as srv:
        ws = await connect(srv.ws_url)
        for chunk in turn_audio():
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await recv_until(ws, "response.output_audio.delta")
        assert engine.stats().running == 1
        ws.transport.abort()  # vanish without a closing handshake
        async with asyncio.timeout(5):
            while srv.server.sessions:
                await asyncio.sleep(0.01)
        st = engine.stats()
        assert st.running == 0 and st.free_blocks == st.total_blocks
        assert engine.requests[0][0] in engine.aborted
        names = [t.get_name() for t in asyncio.all_tasks()]
        assert not [n for n in names if n.startswith(("response-", "produce-", "asr", "user-item", "sender-",
                                                      "watch-"))], names
        assert b"voicefast_active_sessions 0.0" in (await srv.get("/metrics"))[2]


async def test_beta_header_uses_beta_shapes():
    async with Running() as srv, connect(srv.ws_url, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        created = json.loads(await ws.recv())
        assert created["session"]["input_audio_format"] == "pcm16" and "modalities" in created["session"]
        await ws.send(json.dumps({"type": "session.update", "session": {
            "modalities": ["text", "audio"], "input_audio_format": "pcm16", "output_audio_format": "g711_ulaw",
            "turn_detection": {"type": "server_vad"}, "temperature": 0.5, "max_response_output_tokens": 50}}))
        upd = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert upd["output_audio_format"] == "g711_ulaw" and upd["max_response_output_tokens"] == 50
        for chunk in turn_audio():
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        evs = await recv_until(ws, "response.done")
        types = {e["type"] for e in evs}
        assert {"response.audio.delta", "response.audio_transcript.delta", "response.audio.done",
                "conversation.item.created"} <= types
        assert not types & {"response.output_audio.delta", "conversation.item.added", "conversation.item.done"}
        assert evs[-1]["response"]["output"][0]["content"][0]["type"] == "audio"


async def test_http_routes():
    async with Running() as srv:
        status, ctype, body = await srv.get("/")
        assert status == 200 and ctype.startswith("text/html") and b"<html" in body.lower()
        status, ctype, _ = await srv.get("/app.js")
        assert status == 200 and ctype.startswith("text/javascript")
        assert (await srv.get("/style.css"))[1].startswith("text/css")
        for p in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/nope.js", "/..%2fREADME.md"):
            assert (await srv.get(p))[0] == 404, p
        status, _, body = await srv.get("/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, ctype, body = await srv.get("/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        for name in (b"voicefast_active_sessions", b"voicefast_e2e_seconds", b"voicefast_engine_free_blocks"):
            assert name in body
        voices = json.loads((await srv.get("/v1/voices"))[2])
        assert [v["id"] for v in voices["data"]] == ["fake"]
        assert (await srv.get("/v1/realtime"))[0] == 426


async def test_idle_timeout_and_input_buffer_cap():
    async with Running(idle_timeout_s=0.5, max_input_buffer_s=1.0) as srv, connect(srv.ws_url) as ws:
        await recv_until(ws, "session.created")
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        await recv_until(ws, "session.updated")
        chunk = b64(speech_like(500))
        for _ in range(3):  # 1.5 s > the 1 s cap
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        ev = json.loads(await ws.recv())
        assert ev["type"] == "error" and ev["error"]["code"] == "input_audio_buffer_full"
        evs = await recv_until(ws, "error", timeout_s=5)  # then silence from the client: idle timeout
        assert evs[-1]["error"]["code"] == "idle_timeout"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1000


def test_config_flags_env_and_security():
    from voicefast.serve import config_from

    c = config_from(["--port", "9001", "--api-key", "a", "--no-speculative-start"],
                    {"VOICEFAST_API_KEYS": "b,c", "VOICEFAST_MAX_SESSIONS": "3", "VOICEFAST_PORT": "1"})
    assert (c.port, c.api_keys, c.max_sessions, c.speculative_start) == (9001, ("b", "c", "a"), 3, False)
    with pytest.raises(ValueError, match="without API keys"):
        config_from(["--host", "0.0.0.0"], {}).check_security()
    config_from(["--host", "0.0.0.0", "--insecure"], {}).check_security()
    config_from(["--host", "0.0.0.0", "--api-key", "k"], {}).check_security()
    with pytest.raises(ValueError):
        ServerConfig(max_sessions=0)
    with pytest.raises(ValueError, match="VOICEFAST_PORT"):
        config_from([], {"VOICEFAST_PORT": "eighty"})
    c = config_from(["--turn-transcript-ms", "0"], {})
    assert c.turn_transcript_ms == 0 and c.turn_policy_kw() == {"transcript_ms": 0}
    assert config_from([], {}).turn_policy_kw() == {}  # the eagerness' own
    with pytest.raises(ValueError, match="turn_transcript_ms"):
        ServerConfig(turn_transcript_ms=-5)


def test_serve_refuses_open_host_without_keys(capsys):
    from voicefast.serve import main

    assert main(["--host", "0.0.0.0"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_serve_missing_model_exits_nonzero_with_a_clear_message(capsys):
    from voicefast.serve import main

    assert main(["--port", "0", "--vad-model", "/nonexistent/silero.onnx"]) == 1
    err = capsys.readouterr().err
    assert "a model is missing" in err and "/nonexistent/silero.onnx" in err


async def test_outbox_bounds_a_slow_reader():
    from voicefast.protocol import RealtimeProtocol
    from voicefast.server import Outbox

    box = Outbox(RealtimeProtocol(), max_frames=3)
    for i in range(3):
        box.put({"type": "response.output_text.delta", "delta": str(i)})
    assert not box.hopeless.is_set()
    box.put({"type": "response.output_text.delta", "delta": "x"})
    box.put({"type": "response.done"})
    assert box.hopeless.is_set() and box.dropped == 2 and box.queue.qsize() == 3


async def test_openai_sdk_beta_client():
    async with Running() as srv:
        client = AsyncOpenAI(api_key="unused", websocket_base_url=f"ws://127.0.0.1:{srv.server.port}/v1")
        async with client.beta.realtime.connect(model="voicefast") as conn:  # sends OpenAI-Beta: realtime=v1
            await conn.session.update(session={"modalities": ["text"], "turn_detection": None,
                                               "instructions": "Beta persona."})
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "hi"}]})
            await conn.response.create()
            text, types = "", []
            async with asyncio.timeout(10):
                async for ev in conn:
                    types.append(ev.type)
                    if ev.type == "session.updated":
                        assert ev.session.modalities == ["text"] and ev.session.turn_detection is None
                    elif ev.type == "response.text.delta":
                        text += ev.delta
                    elif ev.type == "response.done":
                        assert ev.response.status == "completed"
                        break
            assert text == srv.stack.engine.reply([]) and "conversation.item.created" in types
            assert srv.stack.engine.requests[0][1][0]["content"] == "Beta persona."


async def test_a_handler_bug_costs_one_error_event_not_the_session(monkeypatch):
    from voicefast.session import Session

    def boom(self, d):
        raise RuntimeError("bug")

    monkeypatch.setattr(Session, "_on_input_audio_buffer_clear", boom)
    async with Running() as srv, connect(srv.ws_url) as ws:
        await recv_until(ws, "session.created")
        await ws.send('{"type": "input_audio_buffer.clear"}')
        ev = json.loads(await ws.recv())
        assert ev["type"] == "error" and ev["error"]["code"] == "server_error"
        await ws.send('{"type": "session.update", "session": {"instructions": "still here"}}')
        assert (await recv_until(ws, "session.updated"))[-1]["session"]["instructions"] == "still here"
