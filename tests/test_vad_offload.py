"""The VAD model off the event loop (Stack.vad_threads, Session.feed_audio_async via voicefast.intake.deliver): the
same events as the inline path, in the same order at the same samples, with the model run on the VAD threads —
with the energy fake and with the real Silero VAD on real (Piper) speech."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from fakes import FakeASR, FakeTurnModel, make_stack, silence, speech_like
from speech import load_wav, speech_wav

from voicefast.config import ServerConfig
from voicefast.formats import AudioFormat
from voicefast.intake import deliver
from voicefast.protocol import RealtimeProtocol
from voicefast.session import Session
from voicefast.session_config import SessionConfig, TurnDetection

pytestmark = pytest.mark.anyio
VAD_EVENTS = ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
              "input_audio_buffer.committed")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _session(stack, td: TurnDetection) -> tuple[Session, list[dict]]:
    events: list[dict] = []
    defaults = SessionConfig(instructions="You are a test.", voice="fake", turn_detection=td)
    s = Session(stack, ServerConfig(output_lead_ms=100), emit=events.append, defaults=defaults)
    s.start()
    return s, events


async def _feed(session: Session, x24: np.ndarray, chunk_ms: int = 20) -> None:
    """What the server does per input_audio_buffer.append (voicefast/server.py): validate, then deliver."""
    proto, fmt = RealtimeProtocol(), AudioFormat()
    n = fmt.rate_hz * chunk_ms // 1000
    for i in range(0, len(x24), n):
        msg = json.dumps({"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(fmt.encode(x24[i:i + n])).decode()})
        await deliver(session, proto.receive_message(msg), inline_audio_ms=100)


def _vad_view(events: list[dict]) -> list[tuple]:
    return [(e["type"], e.get("audio_start_ms"), e.get("audio_end_ms")) for e in events if e["type"] in VAD_EVENTS]


async def _run(stack, td: TurnDetection, x24: np.ndarray) -> list[dict]:
    s, events = _session(stack, td)
    await _feed(s, x24)
    await asyncio.sleep(0.05)  # let the turn's tasks (commit) run
    await s.close()
    return events


async def test_offloaded_vad_gives_the_inline_events_and_runs_on_the_vad_threads():
    x = np.concatenate([silence(200), speech_like(600), silence(700), speech_like(300), silence(700)])
    td = TurnDetection(type="server_vad", silence_duration_ms=500, create_response=False)
    inline = make_stack(asr=FakeASR(["one", "two"]), turn_model=FakeTurnModel(0.9))
    pooled = make_stack(asr=FakeASR(["one", "two"]), turn_model=FakeTurnModel(0.9), vad_threads=1)
    a = await _run(inline, td, x)
    b = await _run(pooled, td, x)
    assert inline.vad_executor is None and pooled.vad_executor is not None
    assert _vad_view(a) == _vad_view(b)
    assert [t for t, *_ in _vad_view(b)].count("input_audio_buffer.speech_stopped") == 2


async def test_vad_threads_run_the_model_and_the_loop_does_not():
    td = TurnDetection(type="server_vad", silence_duration_ms=500, create_response=False)
    seen = []

    def factory(t):
        from fakes import _fake_vad
        v = _fake_vad(t)
        seen.append(v)
        return v

    stack = make_stack(vad_threads=2, vad_factory=factory)
    await _run(stack, td, np.concatenate([speech_like(400), silence(600)]))
    (vad,) = seen
    assert vad.judged_on and all(name.startswith("voicefast-vad") for name in vad.judged_on)


@pytest.mark.parametrize("td", [TurnDetection(type="server_vad", silence_duration_ms=500, create_response=False),
                                TurnDetection(create_response=False)], ids=["server_vad", "semantic_vad"])
async def test_real_silero_offloaded_equals_inline_on_real_speech(td):
    from audio.vad import SileroVadModel, VadParams, VadStream

    model = SileroVadModel()

    def factory(t):
        p = t.policy()
        return VadStream(model, VadParams(threshold=t.threshold, prefix_padding_ms=t.prefix_padding_ms,
                                          silence_duration_ms=p.end_silence_ms, early_silence_ms=p.check_ms))

    x, rate = load_wav(speech_wav("What time do you open on Saturday?", rate_hz=24_000, lead_silence_ms=300,
                                  trail_silence_ms=1500))
    assert rate == 24_000
    x = np.concatenate([x, x])  # two turns
    runs = []
    for threads in (0, 1):
        stack = make_stack(asr=FakeASR(["What time do you open on Saturday?"] * 2), turn_model=FakeTurnModel(0.95),
                           vad_factory=factory, vad_threads=threads)
        runs.append(_vad_view(await _run(stack, td, x)))
    inline, pooled = runs
    assert [t for t, *_ in inline].count("input_audio_buffer.speech_stopped") == 2
    assert pooled == inline
