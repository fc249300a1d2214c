"""Server edge guards with fake models on 127.0.0.1:0: the DNS-rebinding Host check, no key echoed in the
subprotocol, no exception text to clients, connection-rate limits and the session-length limit."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from fakes import FakeEngine
from test_server import Running as ServerRunning
from websockets.asyncio.client import connect

from voicefast import auth
from voicefast.limits import ConnectionLimits, RateLimiter, receive_timeout
from voicefast.server import Outbox

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Running(ServerRunning):
    """test_server's running server, plus raw HTTP requests with exactly the headers given."""

    async def raw(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 request with exactly these headers (Host included): (status, headers, body)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *hdr_lines = head.decode().split("\r\n")
        hdrs = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in hdr_lines if ":" in h)}
        body = await reader.readexactly(int(hdrs.get("content-length", "0")))
        writer.close()
        return int(status_line.split()[1]), hdrs, body


WS_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


# -- DNS rebinding ----------------------------------------------------------------------------------------
def test_host_names_parsed_and_loopback_recognised():
    assert auth.host_name("LocalHost:8000") == "localhost"
    assert auth.host_name("[::1]:8000") == "::1" and auth.host_name("127.0.0.1") == "127.0.0.1"
    assert all(auth.is_loopback(h) for h in ("localhost", "127.0.0.1", "127.3.2.1", "::1"))
    assert not any(auth.is_loopback(h) for h in ("evil.example", "10.0.0.1", "", "localhost.evil.example"))
    assert auth.host_ok("evil.example", ("k",), ())  # with a key, the key is the gate
    assert not auth.host_ok("evil.example:80", (), ()) and not auth.host_ok(None, (), ())
    assert auth.host_ok("Voice.Example:443", (), ("voice.example",))


async def test_without_a_key_only_loopback_and_configured_hosts_are_served():
    async with Running(allowed_hosts=("voice.example",)) as srv:
        port = srv.server.port
        # a rebinding page: its own hostname now resolves to 127.0.0.1, and its Origin matches its Host
        status, _, body = await srv.raw("/v1/realtime", {"Host": f"rebind.evil.example:{port}",
                                                         "Origin": f"http://rebind.evil.example:{port}", **WS_HEADERS})
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
        status, _, _ = await srv.raw("/healthz", {"Host": f"rebind.evil.example:{port}"})
        assert status == 403
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "voice.example"):
            status, hdrs, _ = await srv.raw("/v1/realtime", {"Host": host, **WS_HEADERS})
            assert status == 101, host
        assert srv.server.metrics.rejected_total.labels("host")._value.get() == 2


async def test_twilio_gets_the_host_guard_unless_its_own_credentials_gate_it():
    async with Running() as srv:  # no credential at all: /twilio answers only on loopback, like /v1/realtime
        status, _, body = await srv.raw("/twilio", {"Host": "rebind.evil.example", **WS_HEADERS})
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
        status, _, _ = await srv.raw("/twilio", {"Host": f"localhost:{srv.server.port}", **WS_HEADERS})
        assert status == 101
    async with Running(twilio_secret="s3cret") as srv:  # its shared secret is the gate (the public name is fine)
        status, _, _ = await srv.raw("/twilio/s3cret", {"Host": "voice.example", **WS_HEADERS})
        assert status == 101
        status, _, _ = await srv.raw("/v1/realtime", {"Host": "voice.example", **WS_HEADERS})
        assert status == 403  # ... for /twilio only
    async with Running(api_keys=("k",)) as srv:  # an API key passes the Host; /twilio's own check still refuses
        status, _, body = await srv.raw("/twilio", {"Host": "voice.example", **WS_HEADERS})
        assert status == 403 and json.loads(body)["error"]["code"] == "twilio_auth_not_configured"


async def test_with_a_key_any_host_is_served_to_a_key_holder():
    async with Running(api_keys=("k3y",)) as srv:
        status, _, _ = await srv.raw("/v1/realtime", {"Host": "voice.example", "Authorization": "Bearer k3y",
                                                      **WS_HEADERS})
        assert status == 101


# -- no secrets or internals to clients -------------------------------------------------------------------
def test_the_key_subprotocol_is_never_selected():
    key = auth.KEY_SUBPROTOCOL_PREFIX + "s3cret"
    assert auth.choose_subprotocol(["realtime", key]) == "realtime"
    assert auth.choose_subprotocol([key, "realtime"]) == "realtime"
    assert auth.choose_subprotocol([key, "openai-beta.realtime-v1"]) == "openai-beta.realtime-v1"
    assert auth.choose_subprotocol([key]) is None
    assert auth.key_only_subprotocols([key]) and not auth.key_only_subprotocols([key, "realtime"])


async def test_key_only_subprotocol_offer_is_refused_without_echoing_the_key():
    async with Running(api_keys=("s3cret",)) as srv:
        status, hdrs, body = await srv.raw("/v1/realtime", {
            "Host": f"127.0.0.1:{srv.server.port}", "Sec-WebSocket-Protocol": "openai-insecure-api-key.s3cret",
            **WS_HEADERS})
        assert status == 400 and json.loads(body)["error"]["code"] == "realtime_subprotocol_required"
        assert "s3cret" not in json.dumps(hdrs) + body.decode()
        async with connect(srv.ws_url, subprotocols=["openai-insecure-api-key.s3cret", "realtime"]) as ws:
            assert ws.subprotocol == "realtime"
            assert "s3cret" not in str(ws.response.headers)


class SecretError(RuntimeError):
    pass


SECRET = "/srv/secret/path.bin: token=abc123"


class FailingEngine(FakeEngine):
    def generate(self, params, **kw):
        raise SecretError(SECRET)


async def test_stage_failures_and_bugs_reach_the_client_as_codes_without_exception_text():
    async with Running(stack_kw={"engine": FailingEngine()}) as srv, connect(srv.ws_url) as ws:
        got = []

        async def until(t):
            async with asyncio.timeout(10):
                while True:
                    got.append(json.loads(await ws.recv()))
                    if got[-1]["type"] == t:
                        return got[-1]

        await until("session.created")
        await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
        done = await until("response.done")
        assert done["response"]["status"] == "failed"
        assert done["response"]["status_details"]["error"]["code"] == "stage_failed"
        # a bug while handling one event: an error with a code, and the session goes on
        srv.server.sessions.copy().pop()._on_conversation_item_delete = lambda d: (_ for _ in ()).throw(
            SecretError(SECRET))
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": "x"}))
        err = await until("error")
        assert err["error"]["code"] == "server_error" and err["error"]["message"] == "internal error"
        text = json.dumps(got)
        assert "secret" not in text.lower() and "SecretError" not in text


# -- abuse limits -----------------------------------------------------------------------------------------
def test_rate_limiter_refills_and_stays_bounded():
    rl = RateLimiter(3)
    assert [rl.acquire("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.acquire("a", 0.0) == pytest.approx(20.0)  # one token per 20 s at 3/min
    assert rl.acquire("b", 0.0) == 0.0  # keys are independent
    assert rl.acquire("a", 19.0) > 0 and rl.acquire("a", 21.0) == 0.0
    assert RateLimiter(0).acquire("a", 0.0) == 0.0  # 0: off
    small = RateLimiter(2, max_keys=4)
    for i in range(100):
        small.acquire(f"k{i}", float(i))
        assert len(small) <= 4


def test_connection_limits_hash_keys_and_explain_refusals():
    lim = ConnectionLimits(1, 1)
    assert lim.check_address("1.2.3.4", 0.0) is None
    r = lim.check_address("1.2.3.4", 1.0)
    assert r.code == "rate_limit_exceeded" and r.reason == "rate_address" and r.retry_after_s == pytest.approx(59.0)
    assert lim.check_key("sk-secret", 0.0) is None and lim.check_key("sk-secret", 0.0).reason == "rate_key"
    assert lim.check_key(None, 0.0) is None
    assert all("sk-secret" not in k for k in lim.keys._buckets)


def test_session_length_limit_timeout():
    assert receive_timeout(0.0, 0.0, idle_timeout_s=300, max_session_s=3600) == (300, "idle_timeout")
    assert receive_timeout(3500.0, 0.0, idle_timeout_s=300, max_session_s=3600) == (100, "session_expired")
    assert receive_timeout(3700.0, 0.0, idle_timeout_s=300, max_session_s=3600) == (0.0, "session_expired")
    assert receive_timeout(9e9, 0.0, idle_timeout_s=300, max_session_s=0) == (300, "idle_timeout")


async def test_connection_attempts_per_address_and_per_key_are_limited():
    async with Running(connect_rate_per_address_per_min=3) as srv:
        for _ in range(3):
            async with connect(srv.ws_url) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
        status, hdrs, body = await srv.raw("/v1/realtime", {"Host": f"127.0.0.1:{srv.server.port}", **WS_HEADERS})
        assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        assert int(hdrs["retry-after"]) == 20
        status, _, _ = await srv.raw("/healthz", {"Host": f"127.0.0.1:{srv.server.port}"})
        assert status == 200  # plain HTTP routes are not counted
    async with Running(api_keys=("a", "b"), connect_rate_per_key_per_min=2) as srv:
        for _ in range(2):
            async with connect(srv.ws_url, additional_headers={"Authorization": "Bearer a"}):
                pass
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(srv.ws_url, additional_headers={"Authorization": "Bearer a"}):
                pass
        assert e.value.response.status_code == 429
        async with connect(srv.ws_url, additional_headers={"Authorization": "Bearer b"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        assert srv.server.metrics.rejected_total.labels("rate_key")._value.get() == 1


async def test_a_session_past_max_session_s_is_told_and_closed_1008():
    async with Running(max_session_s=0.3) as srv, connect(srv.ws_url) as ws:
        types = []
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    ev = json.loads(await ws.recv())
                    types.append(ev["type"] if ev["type"] != "error" else ev["error"]["code"])
                    await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))  # a chatty client too
        assert types[0] == "session.created" and types[-1] == "session_expired"
        assert ws.close_code == 1008


async def test_outbox_bounds_queued_bytes_as_well_as_frames():
    from voicefast.protocol import RealtimeProtocol

    box = Outbox(RealtimeProtocol(), max_frames=100, max_bytes=1000)
    box.put({"type": "x", "pad": "a" * 400})
    box.put({"type": "x", "pad": "a" * 400})
    assert not box.hopeless.is_set() and box.queue.qsize() == 2
    box.put({"type": "x", "pad": "a" * 400})
    assert box.hopeless.is_set() and box.dropped == 1 and box.queue.qsize() == 2
    first = await box.get()
    assert 400 < len(first) == box.queued_bytes
    await box.get()
    assert box.queued_bytes == 0  # the sender's get() gives the bytes back
