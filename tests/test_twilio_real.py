"""A phone call through the REAL stack (Silero VAD, Whisper tiny.en, the SmolLM2 engine, Piper) on /twilio: a
scripted Twilio client sends Twilio's recorded message shapes with mu-law 8 kHz frames of reproducible Piper
speech at real time, and a handset echoes marks as their audio plays. Greeting, two turns, a barge-in (clear,
truncation to the last mark), the barge-in answered, keypad digits, stop."""

from __future__ import annotations

import asyncio

import pytest
from real_server import running_real_server
from speech import load_wav, speech_wav
from twilio_client import ScriptedCall, to_ulaw_frames
from websockets.asyncio.client import connect

from audio.wer import word_error_rate
from voicefast.config import ServerConfig

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def phone():
    opts = ServerConfig(host="127.0.0.1", port=0, max_output_tokens=32, temperature=0.0, torch_threads=2,
                        asr_cpu_threads=1, barge_in_min_ms=200, twilio_reprompt_after_s=0.0)
    with running_real_server(opts, "real-phone-server") as (server, stack, _):
        yield server, stack


def question(text: str) -> list[bytes]:
    x, rate = load_wav(speech_wav(text, rate_hz=8000, lead_silence_ms=200, trail_silence_ms=900))
    return to_ulaw_frames(x, rate)


def ends(c: ScriptedCall, prefix: str) -> int:
    return sum(1 for _, n in c.echoed if n.startswith(prefix))


def answered(c: ScriptedCall) -> int:
    """Replies heard to the end ("completed", or "incomplete" when cut at max_output_tokens)."""
    return ends(c, "end:completed") + ends(c, "end:incomplete")


async def test_a_phone_call_through_the_real_stack(phone):
    server, stack = phone
    async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
        c = ScriptedCall(ws, params={"language": "en-US"})
        await c.begin()
        await c.wait(lambda: ends(c, "end:prompt") == 1, 60)  # the greeting, spoken by Piper, heard in full
        greeting_ms = sum(len(m["media"]["payload"]) * 3 / 4 for m in c.of("media")) / 8
        assert greeting_ms > 1000
        c.say(question("What time do you open on Saturday?"))
        await c.wait(lambda: answered(c) == 1, 120)
        call = next(iter(server.twilio.calls))
        session = next(iter(server.sessions))
        # barge-in: the caller talks over the next reply once 1 s of it has been heard. Not sooner: the first spoken
        # phrase is two words, and while the next phrase is being synthesized nothing may be queued at Twilio; a
        # barge-in decided in such a gap needs no `clear` (nothing to flush), and this test is about the clear.
        c.say(question("Tell me about shipping and returns."))
        await c.wait(lambda: sum(1 for _, n in c.echoed if n[0] == "r") >= 10 + _reply_marks_heard(c), 120)
        c.say(question("Can I speak with a manager please?"))
        await c.wait(lambda: c.of("clear"), 60)
        await c.wait(lambda: answered(c) == 2, 120)  # the barge-in utterance is the second turn answered
        asked = ["What time do you open on Saturday?", "Tell me about shipping and returns.",
                 "Can I speak with a manager please?"]
        users = [it.text for it in session.conv.items if it.role == "user"]
        assert len(users) == 3 and all(word_error_rate(a, u) <= 0.25 for a, u in zip(asked, users, strict=True)), users
        [(item_id, heard_ms)] = call.truncations
        cut = session.conv.find(item_id)
        assert cut.audio_ms == heard_ms >= 200 and call.playback.echoes_ignored >= 1
        full = session._past[item_id].text  # what the model had said (not all of it was heard)
        assert len(cut.text) < len(full.rstrip()) and full.startswith(cut.text)
        # keypad
        for d in "4572#":
            await c.send(c.tw.dtmf(d))
        await c.wait(lambda: answered(c) == 3, 120)
        roles_texts = [(it.role, it.text) for it in session.conv.items]
        i = roles_texts.index(("user", "[caller pressed 4 5 7 2]"))
        assert roles_texts[i + 1][0] == "assistant" and roles_texts[i + 1][1]
        assert roles_texts[0] == ("assistant", server.opts.twilio_greeting)  # what the caller was told first
        await c.stop()
    async with asyncio.timeout(10):
        while server.sessions:
            await asyncio.sleep(0.05)
    assert stack.engine.stats().running == 0


def _reply_marks_heard(c: ScriptedCall) -> int:
    names = [n for _, n in c.echoed]
    last = max((i for i, n in enumerate(names) if n.startswith("end:")), default=-1)
    return sum(1 for n in names[:last + 1] if n[0] == "r")
