"""Fuzzing a live server on the REAL embedded models (Silero VAD, Whisper tiny.en, SmolLM2, Piper): a few hundred
random and mutated frames (tests/fuzz_events.py) over one connection, while another session takes spoken turns.
Each frame is followed by response.cancel (so a fuzzed response.create cannot keep the models busy for long) and a
sentinel event whose answer marks the end of the frame's replies: every frame is answered, no event carries
`server_error`, the fuzzed connection is never dropped, and the concurrent turns complete."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from fuzz_events import frames
from hypothesis import HealthCheck, given, settings
from real_server import running_real_server
from speech import load_wav, speech_wav
from websockets.asyncio.client import connect

from voicefast.config import ServerConfig

pytestmark = pytest.mark.slow
LIVE_CASES = 300


@pytest.fixture(scope="module")
def live():
    opts = ServerConfig(host="127.0.0.1", port=0, max_output_tokens=8, max_message_bytes=256 * 1024,
                        torch_threads=1, asr_cpu_threads=1, connect_rate_per_address_per_min=0)
    with running_real_server(opts, "live-server") as (server, _, _):
        clients = asyncio.new_event_loop()
        cthread = threading.Thread(target=clients.run_forever, name="live-clients", daemon=True)
        cthread.start()
        try:
            yield f"ws://127.0.0.1:{server.port}/v1/realtime", clients
        finally:
            clients.call_soon_threadsafe(clients.stop)
            cthread.join(10)


class FuzzConnection:
    def __init__(self, url: str):
        self.url, self.ws, self.n = url, None, 0
        self.stats = {"frames": 0, "errors": 0, "other_events": 0}

    async def exchange(self, frame: str | bytes) -> list[dict]:
        if self.ws is None:
            self.ws = await connect(self.url, max_size=None)
            assert json.loads(await self.ws.recv())["type"] == "session.created"
        self.n += 1
        sentinel = f"sentinel_{self.n}"
        await self.ws.send(frame)
        await self.ws.send(json.dumps({"type": "response.cancel"}))
        await self.ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": sentinel}))
        got = []
        async with asyncio.timeout(120):
            while True:
                ev = json.loads(await self.ws.recv())
                if ev["type"] == "error" and sentinel in ev["error"].get("message", ""):
                    break
                got.append(ev)
        self.stats["frames"] += 1
        self.stats["errors"] += sum(e["type"] == "error" for e in got)
        self.stats["other_events"] += sum(e["type"] != "error" for e in got)
        return got


async def turns_until(url: str, stop: asyncio.Event, pcm_chunks: list[str]) -> list[str]:
    """Spoken turns, one after another, until `stop`: the statuses of their responses."""
    statuses = []
    async with connect(url, max_size=None) as ws:
        await ws.recv()
        while not stop.is_set():
            for c in pcm_chunks:
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": c}))
                await asyncio.sleep(0.02)
            async with asyncio.timeout(180):
                while True:
                    ev = json.loads(await ws.recv())
                    assert ev["type"] != "error", ev
                    if ev["type"] == "response.done":
                        statuses.append(ev["response"]["status"])
                        break
    return statuses


def test_live_server_answers_fuzzed_frames_while_another_session_talks(live):
    import base64

    import numpy as np

    url, clients = live
    x, rate = load_wav(speech_wav("What time do you open on Saturday?", rate_hz=24_000, lead_silence_ms=200,
                                  trail_silence_ms=900))
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    chunks = [base64.b64encode(pcm[i:i + 1920]).decode() for i in range(0, len(pcm), 1920)]
    stop = asyncio.Event()
    victim = asyncio.run_coroutine_threadsafe(turns_until(url, stop, chunks), clients)
    fuzz = FuzzConnection(url)

    @settings(max_examples=LIVE_CASES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(frames())
    def one(frame):
        got = asyncio.run_coroutine_threadsafe(fuzz.exchange(frame), clients).result(180)
        codes = [e["error"]["code"] for e in got if e["type"] == "error"]
        assert "server_error" not in codes, got
        for e in got:
            if e["type"] == "response.done" and e["response"]["status"] == "failed":
                raise AssertionError(f"a response failed: {e}")

    one()
    if fuzz.ws is not None:  # (its keepalive task must not outlive the client loop)
        asyncio.run_coroutine_threadsafe(fuzz.ws.close(), clients).result(30)
    clients.call_soon_threadsafe(stop.set)
    statuses = victim.result(300)
    print(f"\nlive fuzz: {fuzz.stats}; concurrent turns: {statuses}")
    assert fuzz.stats["frames"] == LIVE_CASES and fuzz.stats["errors"] > 0 and fuzz.stats["other_events"] > 0
    assert statuses and all(s in ("completed", "incomplete") for s in statuses)
