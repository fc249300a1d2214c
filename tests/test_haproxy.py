"""Two replicas behind Debian's HAProxy with deploy/haproxy.cfg, on loopback ports, driven by the official openai
SDK. The replicas are the real server and the real `voicefast serve` lifecycle with the test fakes for the models
(tests/fake_replica.py): this tests routing, readiness and drain, not speed (two replicas of the real models do
not fit 2 cores). Every reply names its replica ("This is r1. ..."), so each caller knows where it landed."""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass, field

import pytest
import websockets
from openai import AsyncOpenAI
from test_server import turn_audio

from bench.lb import LoadBalancer, Replica, fake_replica_cmd, free_port

pytestmark = [pytest.mark.slow, pytest.mark.anyio,
              pytest.mark.skipif(shutil.which("haproxy") is None and not __import__("os").path.exists(
                  "/usr/sbin/haproxy"), reason="Debian's haproxy is not installed (scripts/setup.sh test)")]
DOCUMENTED_CLOSE = 1001  # docs/deploy.md: the drain's close, after the response in progress


@pytest.fixture
def anyio_backend():
    return "asyncio"


@dataclass
class Call:
    replicas: list[str] = field(default_factory=list)  # per turn: the replica that answered
    statuses: list[str] = field(default_factory=list)  # per turn: response.done status
    errors: list[str] = field(default_factory=list)  # `error` events received
    close_code: int | None = None  # the server's close code, when the server ended the call
    first_audio: asyncio.Event = field(default_factory=asyncio.Event)


async def run_call(url: str, call: Call, *, turns: int = 1, wait_for_server_close: bool = False) -> Call:
    client = AsyncOpenAI(api_key="unused", websocket_base_url=url)
    async with client.realtime.connect(model="voicefast") as conn:
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["audio"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}})
        try:
            async with asyncio.timeout(60):
                for _ in range(turns):
                    for chunk in turn_audio():
                        await conn.input_audio_buffer.append(audio=chunk)
                    transcript = ""
                    while True:
                        ev = await conn.recv()
                        if ev.type == "error":
                            call.errors.append(str(ev.error))
                        elif ev.type == "response.output_audio.delta":
                            call.first_audio.set()
                        elif ev.type == "response.output_audio_transcript.delta":
                            transcript += ev.delta
                        elif ev.type == "response.done":
                            call.statuses.append(ev.response.status)
                            m = re.match(r"This is (\w+)\.", transcript)
                            call.replicas.append(m.group(1) if m else f"?{transcript!r}")
                            break
                while wait_for_server_close:
                    ev = await conn.recv()
                    if ev.type == "error":
                        call.errors.append(str(ev.error))
        except websockets.ConnectionClosed as e:
            call.close_code = e.rcvd.code if e.rcvd else 1006
    return call


async def test_calls_spread_over_replicas_and_a_sigtermed_replica_drains_without_errors(tmp_path):
    ports = {"r1": free_port(), "r2": free_port()}
    # A short grace period: the live call is closed right after its response (the documented close).
    replicas = {n: Replica(n, p, fake_replica_cmd(n, p, 0.5), tmp_path / f"{n}.log") for n, p in ports.items()}
    lb = None
    try:
        for r in replicas.values():
            r.start()
        lb = LoadBalancer([replicas["r1"].addr, replicas["r2"].addr], tmp_path / "haproxy.log").start()
        await asyncio.to_thread(lb.wait_status, {"r1": "UP", "r2": "UP"})
        url = f"ws://127.0.0.1:{lb.port}/v1"

        # 1. four callers at once: leastconn spreads them over both replicas; every turn completes
        calls = await asyncio.gather(*(run_call(url, Call(), turns=2) for _ in range(4)))
        landed = [c.replicas[0] for c in calls]
        assert sorted(set(landed)) == ["r1", "r2"], landed
        for c in calls:
            assert c.statuses == ["completed", "completed"] and not c.errors and c.close_code is None
            assert len(set(c.replicas)) == 1  # one call = one WebSocket = one replica for all its turns

        # 2. SIGTERM the replica of a live call while its response is playing
        live = Call()
        live_task = asyncio.create_task(run_call(url, live, wait_for_server_close=True))
        await asyncio.wait_for(live.first_audio.wait(), 30)
        counts = {n: (await asyncio.to_thread(r.readyz))[1].get("sessions") for n, r in replicas.items()}
        victim = next(n for n, k in counts.items() if k == 1)
        other = "r2" if victim == "r1" else "r1"
        replicas[victim].terminate()
        # new calls right away (some reach the draining replica before HAProxy's next check: 503, retried)
        after = await asyncio.gather(*(run_call(url, Call()) for _ in range(3)))
        await asyncio.wait_for(live_task, 60)

        assert live.statuses == ["completed"] and live.replicas == [victim], live
        assert live.close_code == DOCUMENTED_CLOSE and not live.errors
        for c in after:
            assert c.replicas == [other] and c.statuses == ["completed"] and not c.errors, c
        assert await asyncio.to_thread(replicas[victim].wait, 30) == 0
        await asyncio.to_thread(lb.wait_status, {victim: "DOWN", other: "UP"})
    except BaseException:
        for name, r in replicas.items():
            print(f"--- {name} log ---\n{r.log_tail()}")
        if lb is not None:
            print(f"--- haproxy log ---\n{lb.log_path.read_text()[-3000:]}")
        raise
    finally:
        if lb is not None:
            lb.stop()
        for r in replicas.values():
            r.stop()
