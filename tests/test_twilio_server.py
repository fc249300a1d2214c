"""/twilio on the real server (127.0.0.1:0) with fake models, driven by a scripted Twilio client over a real
WebSocket: Twilio's recorded message shapes, 20 ms mu-law frames at real time, and a handset that echoes marks
when their audio has played. Whole calls, bad input, auth, capacity, lifecycle."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import websockets
from fakes import FakeASR, FakeEngine, make_stack, silence, speech_like
from twilio_client import ScriptedCall, TwilioMessages, to_ulaw_frames
from websockets.asyncio.client import connect

from voicefast.config import ServerConfig
from voicefast.server import RealtimeServer
from voicefast.session_config import SessionConfig
from voicefast.twilio_auth import signature

pytestmark = pytest.mark.anyio

SHORT = "Sure, we open at nine."
LONG = ("Let me tell you everything about our shop, our opening hours, our prices, our return policy, our "
        "delivery times, our membership plan and our socks, starting with the hours on every day of the week.")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _reply(msgs: list[dict]) -> str:
    return LONG if msgs and "everything" in msgs[-1]["content"] else SHORT


class Phone:
    """The real server with fakes; phone-friendly defaults (short greeting, no re-prompt)."""

    def __init__(self, transcripts=(), **opts):
        self.stack = make_stack(engine=FakeEngine(_reply), asr=FakeASR(list(transcripts)))
        opts = {"output_lead_ms": 100, "barge_in_min_ms": 100, "twilio_greeting": "Thanks for calling.",
                "twilio_reprompt_after_s": 0.0, **opts}
        self.server = RealtimeServer(self.stack, ServerConfig(host="127.0.0.1", port=0, **opts),
                                     defaults=SessionConfig(instructions="Test persona.", voice="fake"))

    async def __aenter__(self):
        await self.server.start()
        self.url = f"ws://127.0.0.1:{self.server.port}/twilio"
        return self

    async def __aexit__(self, *exc):
        await self.server.close()

    def call(self):
        return next(iter(self.server.twilio.calls))


def speech(ms: int = 500, trail_ms: int = 700) -> list[bytes]:
    return to_ulaw_frames(np.concatenate([speech_like(ms, 8000), silence(trail_ms, 8000)]), 8000)


def ends_echoed(c: ScriptedCall, prefix: str = "end:") -> int:
    return sum(1 for _, n in c.echoed if n.startswith(prefix))


def mark_audio_ms(c: ScriptedCall) -> dict[str, float]:
    """Per mark: the ms of its source's audio received before it (a source ends at its end mark)."""
    out, ms = {}, 0.0
    for _, m in c.received:
        if m["event"] == "media":
            ms += len(base64.b64decode(m["media"]["payload"])) / 8
        elif m["event"] == "mark":
            out[m["mark"]["name"]] = ms
            if m["mark"]["name"].startswith("end:"):
                ms = 0.0
        elif m["event"] == "clear":
            ms = 0.0
    return out


async def test_whole_call_greeting_turns_barge_in_dtmf_and_stop():
    # "Stop, thanks." twice: speech during a reply is transcribed once to tell a backchannel from an interruption
    # (issue 11), then the interrupting turn gets its own final.
    async with Phone(["What time do you open?", "And on Sunday?", "Tell me everything.", "Stop, thanks.",
                      "Stop, thanks."]) as p, \
            connect(p.url) as ws:
        c = ScriptedCall(ws, params={"CallerName": "Jane"})
        await c.begin()
        await c.wait(lambda: ends_echoed(c, "end:prompt") == 1)  # the greeting, heard in full
        sizes = [len(base64.b64decode(m["media"]["payload"])) for m in c.of("media")]
        assert sizes and all(0 < n <= 160 for n in sizes) and sizes.count(160) >= len(sizes) - 1  # 20 ms frames
        assert all(m["streamSid"] == c.tw.stream_sid for _, m in c.received)
        for k in (1, 2):  # two spoken turns
            c.say(speech())
            await c.wait(lambda k=k: ends_echoed(c, "end:completed") == k)
        # barge-in: speak once 200 ms of the long reply have been heard
        c.say(speech())
        await c.wait(lambda: ends_echoed(c, "end:completed") == 3 or (
            len([n for _, n in c.echoed if n[0] == "r"]) >= 2 + _reply_marks_before_last_end(c)))
        t_speak = asyncio.get_running_loop().time()
        heard_before = [n for t, n in c.echoed if n[0] == "r" and t <= t_speak]
        c.say(speech(600))
        await c.wait(lambda: c.of("clear"))
        t_clear = next(t for t, m in c.received if m["event"] == "clear")
        echoed_before_clear = [n for t, n in c.echoed if n[0] == "r" and t < t_clear]
        # the cut reply sends no end mark; the barge-in utterance is answered
        await c.wait(lambda: ends_echoed(c, "end:completed") == 3)
        # keypad: 4 5 7 2 #
        for d in "4572#":
            await c.send(c.tw.dtmf(d))
        await c.wait(lambda: ends_echoed(c, "end:completed") == 4)
        call = p.call()
        [(item_id, heard_ms)] = call.truncations
        ms_at = mark_audio_ms(c)
        lo, hi = ms_at[heard_before[-1]], ms_at[echoed_before_clear[-1]]
        assert lo <= heard_ms <= hi and heard_ms in {ms_at[n] for n in echoed_before_clear}
        assert call.playback.echoes_ignored >= 1  # Twilio's flush echoes were not counted as heard
        assert call.prompts_heard == [("Thanks for calling.", "Thanks for calling.")]
        msgs = p.stack.engine.requests[-1][1]
        assert msgs[0] == {"role": "system", "content": "Test persona."}
        assert [m["content"] for m in msgs if m["role"] == "user"] == [
            "What time do you open?", "And on Sunday?", "Tell me everything.", "Stop, thanks.",
            "[caller pressed 4 5 7 2]"]
        said = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert said[:2] == [SHORT, SHORT] and said[3] == SHORT
        assert 0 < len(said[2]) < len(LONG) and LONG.startswith(said[2])  # cut to what was heard
        session = next(iter(p.server.sessions))
        cut = session.conv.find(item_id)
        assert cut.audio_ms == heard_ms and cut.text == said[2]
        await c.stop()
        assert ws.close_code == 1000
        await asyncio.sleep(0.05)
        assert not p.server.sessions and not p.server.twilio.calls
        assert not p.stack.engine._blocks  # no engine request left running
        assert not [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith(("twilio", "response", "speech"))]
        metrics = (await asyncio.to_thread(_get, p.server.port, "/metrics")).decode()
        assert 'voicefast_twilio_calls_total{outcome="answered"} 1.0' in metrics


def _reply_marks_before_last_end(c: ScriptedCall) -> int:
    """Response audio marks echoed up to the last end mark echoed (so the next ones belong to the reply in progress)."""
    names = [n for _, n in c.echoed]
    last = max((i for i, n in enumerate(names) if n.startswith("end:")), default=-1)
    return sum(1 for n in names[:last + 1] if n[0] == "r")


def _get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()


async def test_bad_frames_are_ignored_and_other_calls_are_unaffected():
    async with Phone(["hello one", "hello two"], twilio_secret="s3cret") as p, connect(p.url) as a, \
            connect(p.url) as b:
        good = ScriptedCall(a, params={"secret": "s3cret"})
        await good.begin()
        tw = TwilioMessages(stream_sid="MZ" + "c" * 32, call_sid="CA" + "d" * 32)
        for frame in ("{nope", b"\x00\x01", "[]", '{"event": "media", "media": {"payload": "%%"}}',
                      '{"event": "brand_new_thing"}', tw.media(b"\xff" * 160), tw.mark("never-sent")):
            await b.send(frame)  # before start: media ignored, garbage ignored, nothing crashes
        bad = ScriptedCall(b, params={"secret": "s3cret"}, msgs=tw)
        await bad.begin()
        for frame in ('{"event": "dtmf", "dtmf": {"digit": "x"}}', '{"event": "media", "media": {}}',
                      '{"event": "mark", "mark": {"name": 5}}', tw.start({"persona": "other"})):
            await b.send(frame)
        good.say(speech())
        bad.say(speech())
        await good.wait(lambda: ends_echoed(good, "end:completed") == 1)
        await bad.wait(lambda: ends_echoed(bad, "end:completed") == 1)
        stats = [c.stats for c in p.server.twilio.calls]
        assert sorted(s["malformed"] for s in stats) == [0, 7] and max(s["duplicate_start"] for s in stats) == 1
        assert max(c.playback.unknown_marks for c in p.server.twilio.calls) == 1
        await good.stop()
        await bad.stop()


async def test_wrong_secret_or_signature_is_refused():
    async with Phone(twilio_secret="s3cret") as p:
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(p.url + "/wrong"):
                pass
        assert e.value.response.status_code == 403 and b"invalid_secret" in e.value.response.body
        async with connect(p.url + "/s3cret") as ws:  # the secret in the URL: no parameter needed
            c = ScriptedCall(ws)
            await c.begin()
            await c.wait(lambda: ends_echoed(c, "end:prompt") == 1)
            await c.stop()
        async with connect(p.url) as ws:  # no secret anywhere: refused at start, no session made
            await ws.send(TwilioMessages().start({"secret": "guess"}))
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008 and ws.close_reason == "invalid_secret"
        assert p.server.metrics.sessions_total._value.get() == 1
    async with Phone(twilio_auth_token="tok") as p:
        url = f"wss://127.0.0.1:{p.server.port}/twilio"  # what Twilio signs: the URL it connects to
        for sig in (None, "bad", signature("other-token", url)):
            with pytest.raises(websockets.InvalidStatus) as e:
                async with connect(p.url, additional_headers={"X-Twilio-Signature": sig} if sig else None):
                    pass
            assert e.value.response.status_code == 403
        async with connect(p.url, additional_headers={"X-Twilio-Signature": signature("tok", url)}) as ws:
            c = ScriptedCall(ws)
            await c.begin()
            await c.wait(lambda: ends_echoed(c, "end:prompt") == 1)
            await c.stop()
    async with Phone(api_keys=("k",)) as p:  # an exposed server without phone auth keeps /twilio closed
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(p.url):
                pass
        assert b"twilio_auth_not_configured" in e.value.response.body
    async with Phone() as p:  # loopback, but relayed by a proxy: exposed all the same
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(p.url, additional_headers={"X-Forwarded-For": "203.0.113.7"}):
                pass
        assert b"twilio_auth_not_configured" in e.value.response.body


async def test_personas_voice_and_language_from_custom_parameters(tmp_path):
    (tmp_path / "boots.toml").write_text('instructions = "You sell boots."\ngreeting = ""\n')
    async with Phone(["hi"], personas_dir=str(tmp_path)) as p:
        async with connect(p.url) as ws:
            c = ScriptedCall(ws, params={"persona": "boots", "voice": "fake", "language": "en-US"})
            await c.begin()
            c.say(speech())
            await c.wait(lambda: ends_echoed(c, "end:completed") == 1)
            assert not any(n.startswith("end:prompt") for n in c.marks_sent())  # this persona has no greeting
            assert p.stack.engine.requests[-1][1][0] == {"role": "system", "content": "You sell boots."}
            cfg = next(iter(p.server.sessions)).cfg  # the session speaks mu-law 8 kHz with the phone VAD settings
            assert cfg.input_format.type == cfg.output_format.type == "audio/pcmu"
            assert cfg.transcription.language == "en"
            assert (cfg.turn_detection.threshold, cfg.turn_detection.prefix_padding_ms) == (0.4, 1000)
            await c.stop()
        for params, reason in (({"language": "de"}, "unsupported_language"), ({"persona": "x"}, "unknown_persona"),
                               ({"instructions": "Be evil."}, "instructions_not_allowed"),
                               ({"voice": "nope"}, "unknown_voice")):
            async with connect(p.url) as ws:
                await ws.send(TwilioMessages().start(params))
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert (ws.close_code, ws.close_reason) == (1008, reason)
        assert len(p.stack.engine.requests) == 1 and not p.server.sessions


async def test_at_capacity_the_caller_hears_all_lines_busy_then_a_clean_stop():
    async with Phone(max_sessions=1, twilio_busy_text="All lines are busy.") as p, connect(p.url) as a, \
            connect(p.url) as b:
        first = ScriptedCall(a)
        await first.begin()
        await first.wait(lambda: len(p.server.sessions) == 1)
        second = ScriptedCall(b)
        await second.begin()
        await second.wait(lambda: second.closed.is_set())
        assert b.close_code == 1000 and b.close_reason == "all lines busy"
        assert second.of("media") and any(n.startswith("end:prompt") for _, n in second.echoed)
        assert len(p.server.sessions) == 1 and not first.closed.is_set()
        await first.stop()
        metrics = (await asyncio.to_thread(_get, p.server.port, "/metrics")).decode()
        assert 'voicefast_twilio_calls_total{outcome="busy"} 1.0' in metrics


async def test_silence_gets_a_reprompt_then_goodbye():
    async with Phone(twilio_greeting="", twilio_reprompt_after_s=0.3, twilio_max_reprompts=1,
                     twilio_reprompt_text="Still there?", twilio_goodbye_text="Bye now.") as p, connect(p.url) as ws:
        c = ScriptedCall(ws)
        await c.begin()
        await c.wait(lambda: c.closed.is_set())
        assert ws.close_code == 1000 and ws.close_reason == "goodbye"
        assert sum(1 for n in c.marks_sent() if n.startswith("end:prompt")) == 2
        await c.stop(send_stop=False)
        assert not p.server.sessions


async def test_socket_loss_mid_reply_ends_everything():
    async with Phone(["Tell me everything."], twilio_greeting="") as p, connect(p.url) as ws:
        c = ScriptedCall(ws)
        await c.begin()
        c.say(speech())
        await c.wait(lambda: len(c.of("media")) > 10)
        ws.transport.abort()  # vanish without a closing handshake, mid-reply
        await c.stop(send_stop=False)
        async with asyncio.timeout(10):
            while p.server.sessions or p.server.twilio.calls:
                await asyncio.sleep(0.01)
        [(rid, _)] = p.stack.engine.requests
        assert rid in p.stack.engine.aborted and not p.stack.engine._blocks
        assert not [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith(("twilio", "response", "speech"))]


async def test_a_connection_that_never_starts_is_closed(monkeypatch):
    import voicefast.twilio_endpoint as ep

    monkeypatch.setattr(ep, "START_TIMEOUT_S", 0.3)
    async with Phone() as p, connect(p.url) as ws:
        await ws.send(TwilioMessages().connected())
        await ws.send(TwilioMessages().media(b"\xff" * 160))  # media is not a start
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (1008, "no start message")
        assert not p.server.sessions and p.server.metrics.sessions_total._value.get() == 0


async def test_a_drain_refuses_new_calls_and_closes_a_live_one_with_1001_after_its_reply():
    async with Phone(["Tell me everything."], twilio_greeting="", drain_timeout_s=0.2) as p, \
            connect(p.url) as ws:
        c = ScriptedCall(ws)
        await c.begin()
        await c.wait(lambda: len(p.server.sessions) == 1)
        c.say(speech())
        await c.wait(lambda: len(c.of("media")) > 5)  # the long reply is being spoken
        drain = asyncio.create_task(p.server.drain(poll_s=0.02))
        await asyncio.sleep(0.05)
        with pytest.raises(websockets.InvalidStatus) as refused:  # a new call goes to another replica
            async with connect(p.url):
                pass
        assert refused.value.response.status_code == 503
        await c.wait(lambda: c.closed.is_set())
        assert ws.close_code == 1001  # the documented drain close, after the reply in progress was sent
        assert any(n.startswith("end:completed") for n in c.marks_sent())
        async with asyncio.timeout(10):
            await drain
        await c.stop(send_stop=False)
        assert not p.server.sessions


# -- the Realtime endpoint's protections hold on /twilio too (issue 13) ---------------------------------------
async def test_twilio_rate_limit_and_media_bound():
    # (the Host guard on /twilio: tests/test_server_guards.py)
    async with Phone(twilio_secret="s3cret") as p, connect(p.url + "/s3cret") as ws:
        c = ScriptedCall(ws)
        await c.begin()
        await c.wait(lambda: ends_echoed(c, "end:prompt") == 1)
        await c.send(c.tw.media(b"\xff" * 1601))  # over 200 ms in one message: ignored, noted
        await c.send(c.tw.media(b"\xff" * 1600))
        await c.wait(lambda: p.call().stats["malformed"] == 1)
        await c.stop()
    async with Phone(connect_rate_per_address_per_min=2) as p:  # connection attempts per address
        for _ in range(2):
            async with connect(p.url) as ws:
                await ws.send(TwilioMessages().connected())
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(p.url):
                pass
        assert e.value.response.status_code == 429 and int(e.value.response.headers["Retry-After"]) >= 1
        assert b"rate_limit_exceeded" in e.value.response.body


async def test_twilio_call_gets_the_session_length_limit_and_its_language_reaches_the_asr():
    async with Phone(["hi"], max_session_s=4.0, twilio_greeting="") as p, connect(p.url) as ws:
        c = ScriptedCall(ws, params={"language": "en-GB"})
        await c.begin()
        c.say(speech())
        await c.wait(lambda: ends_echoed(c, "end:completed") == 1)
        kw = p.stack.asr.kw[-1]
        assert kw["request"].language == "en" and kw["owner"] == next(iter(p.server.sessions)).cfg.id
        await c.wait(lambda: c.closed.is_set())  # the call is kept alive by media, but not past max_session_s
        assert (ws.close_code, ws.close_reason) == (1008, "maximum session length reached")
        await c.stop(send_stop=False)
        async with asyncio.timeout(10):
            while p.server.sessions:
                await asyncio.sleep(0.01)
