"""/readyz and the graceful drain on the real server (127.0.0.1:0, fake models): what callers see."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from fakes import FakeEngine
from openai import AsyncOpenAI
from test_server import Running, recv_until
from websockets.asyncio.client import connect

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class GatedEngine(FakeEngine):
    """A FakeEngine whose replies stop after their first token until `gate` is set: a response provably in
    progress for as long as the test wants."""

    def __init__(self):
        super().__init__(token_s=0.0)
        self.gate = asyncio.Event()

    async def _stream(self, rid, params, messages):
        first = True
        async for out in super()._stream(rid, params, messages):
            yield out
            if first:
                first = False
                await self.gate.wait()


async def ask(conn) -> None:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": "When are you open?"}]})
    await conn.response.create(response={"output_modalities": ["text"]})


async def closed_code(ws) -> int:
    with pytest.raises(websockets.ConnectionClosed) as e:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    return e.value.rcvd.code if e.value.rcvd else 1006


async def test_readyz_reports_capacity_and_the_reason_it_is_not_ready():
    async with Running(max_sessions=2, ready_max_waiting=8) as srv:
        status, ctype, body = await srv.get("/readyz")
        b = json.loads(body)
        assert status == 200 and ctype == "application/json"
        assert b["ready"] and b["status"] == "ready" and b["sessions"] == 0 and b["free_slots"] == 2
        assert b["engine"]["waiting"] == 0 and b["engine"]["ready_max_waiting"] == 8
        async with connect(srv.ws_url) as a, connect(srv.ws_url) as c:
            await recv_until(a, "session.created")
            await recv_until(c, "session.created")
            status, _, body = await srv.get("/readyz")
            assert status == 503 and json.loads(body)["status"] == "full" and json.loads(body)["free_slots"] == 0
            assert (await srv.get("/healthz"))[0] == 200  # alive, just not ready
        srv.server.models_loaded = False
        status, _, body = await srv.get("/readyz")
        assert status == 503 and json.loads(body)["status"] == "loading"


async def test_drain_finishes_the_response_in_progress_then_closes_with_1001():
    engine = GatedEngine()
    async with Running(drain_timeout_s=0.2, stack_kw={"engine": engine}) as srv:
        client = AsyncOpenAI(api_key="unused", websocket_base_url=f"ws://127.0.0.1:{srv.server.port}/v1")
        async with client.realtime.connect(model="voicefast") as talking, connect(srv.ws_url) as idle:
            await recv_until(idle, "session.created")
            await ask(talking)
            async with asyncio.timeout(10):
                while (await talking.recv()).type != "response.output_text.delta":
                    pass
            drain = asyncio.create_task(srv.server.drain(poll_s=0.01))
            await asyncio.sleep(0)
            # at once: not ready, and new upgrades are refused so a load balancer sends them elsewhere
            status, _, body = await srv.get("/readyz")
            assert status == 503 and json.loads(body)["status"] == "draining"
            with pytest.raises(websockets.InvalidStatus) as e:
                async with connect(srv.ws_url):
                    pass
            assert e.value.response.status_code == 503
            # after the grace period the idle session is closed; the talking one is mid-response: left alone
            assert await closed_code(idle) == 1001
            assert not drain.done()
            engine.gate.set()  # the response goes on to its end
            types = []
            with pytest.raises(websockets.ConnectionClosed) as e:
                async with asyncio.timeout(10):
                    while True:
                        ev = await talking.recv()
                        types.append(ev.type)
                        if ev.type == "response.done":
                            assert ev.response.status == "completed"
                            assert ev.response.output[0].content[0].text == engine.reply([])
            assert "response.done" in types and "error" not in types
            assert e.value.rcvd.code == 1001 and e.value.rcvd.reason == "server shutting down"
            await asyncio.wait_for(drain, 10)
        assert not srv.server.sessions
        assert srv.server.metrics.rejected_total.labels("draining")._value.get() == 1


async def test_sessions_that_hang_up_during_the_grace_period_end_the_drain():
    async with Running(drain_timeout_s=60) as srv:
        async with connect(srv.ws_url) as ws:
            await recv_until(ws, "session.created")
            drain = asyncio.create_task(srv.server.drain(poll_s=0.01))
            await asyncio.sleep(0.05)
            assert not drain.done()
            status, _, body = await srv.get("/readyz")
            assert json.loads(body)["drain_remaining_s"] > 50
        await asyncio.wait_for(drain, 10)  # long before the 60 s grace period: the last caller left
        assert ws.close_code == 1000  # the client's own close, not the server's
