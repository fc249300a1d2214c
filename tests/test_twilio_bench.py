"""`voicefast bench voice --transport twilio|both` against the real server with fake models (in its own thread):
the simulated phone caller speaks Twilio Media Streams, acknowledges marks as a handset, and its turns sit beside
the Realtime caller's in one report; plus `voicefast bench phone`'s pure pieces."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fakes import FakeEngine, make_stack

from bench.phone import bench_downsampling, phone_band
from bench.voice.runner import build_parser, run
from bench.voice.stats import _level_key
from bench.voice.twilio_caller import ulaw_frames
from bench.voice.utterances import FRAME_SAMPLES, RATE_HZ, make_utterance
from voicefast.config import ServerConfig
from voicefast.server import RealtimeServer
from voicefast.session_config import SessionConfig, TurnDetection


@pytest.fixture
def server():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-server", daemon=True)
    thread.start()
    stack = make_stack(engine=FakeEngine(lambda m: "We open at nine."))
    srv = RealtimeServer(stack, ServerConfig(host="127.0.0.1", port=0, output_lead_ms=100,
                                             twilio_greeting="Hello caller."),
                         # server_vad 500 ms: a known floor under every reply (the default is semantic_vad)
                         defaults=SessionConfig(instructions="Test.", voice="fake",
                                                turn_detection=TurnDetection(type="server_vad")))
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(10)
    yield srv
    asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _tone_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wavs"
    d.mkdir()
    x = 0.4 * np.sin(2 * np.pi * 300 * np.arange(RATE_HZ * 600 // 1000) / RATE_HZ)
    sf.write(d / "u0.wav", np.concatenate([x, np.zeros(RATE_HZ // 2)]), RATE_HZ, subtype="PCM_16")
    (d / "u0.txt").write_text("hello there")
    return d


def test_both_transports_in_one_run(server, tmp_path):
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    argv = ["--url", url, "--transport", "both", "--turns", "2", "--wav-dir", str(_tone_dir(tmp_path)),
            "--out", str(tmp_path / "out"), "--no-plots", "--think-ms", "50", "--quiet"]
    doc = run(build_parser().parse_args(argv), argv)
    by = {t: [x for x in doc["turns"] if x["transport"] == t] for t in ("realtime", "twilio")}
    assert doc["meta"]["transports"] == ["realtime", "twilio"]
    for transport, turns in by.items():
        assert [t["status"] for t in turns] == ["ok", "ok"], turns
        assert [t["level"] for t in turns] == [f"1 {transport}"] * 2
        for t in turns:
            # the reply cannot start before the server's 500 ms silence window has been sent in real time
            assert t["e2e_ms"] >= 500 - 20 and t["reply_audio_ms"] > 0 and not t["early_audio"]
    assert all(t["transcript"] is None and t["response_status"] == "completed" for t in by["twilio"])
    # 4 words of fake speech at 50 ms each: the same reply heard on both paths
    assert by["twilio"][0]["reply_audio_ms"] == pytest.approx(by["realtime"][0]["reply_audio_ms"], abs=20)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "phone (Twilio) vs Realtime path" in summary and "| 1 realtime |" in summary


def test_ulaw_frames_anchor_on_the_last_voiced_frame():
    x = np.concatenate([0.3 * np.sin(np.arange(RATE_HZ // 2) / 3.0), np.zeros(RATE_HZ // 10)]).astype(np.float32)
    u = make_utterance("x", x, RATE_HZ, "test")
    frames, last = ulaw_frames(u)
    assert all(len(f) == 160 for f in frames) and len(frames) == -(-len(u.pcm) // 2 // FRAME_SAMPLES)
    assert last == (-(-u.speech_end_sample // 3) - 1) // 160  # the 8 kHz frame holding the last voiced sample
    assert sorted(["2 twilio", "10 realtime", "1 twilio", "1 realtime"], key=_level_key) == [
        "1 realtime", "1 twilio", "2 twilio", "10 realtime"]


def test_phone_band_path_and_downsampling_filter():
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    y = phone_band(x)
    assert len(y) == 16000  # 16 kHz in, 16 kHz out, nothing lost at the edges
    spec = np.abs(np.fft.rfft(y[2000:14000]))
    band = np.fft.rfftfreq(12000, 1 / 16000)
    assert spec[band > 4200].mean() < 0.01 * spec[band < 3000].mean()  # nothing above the phone band
    tones = {r["freq_hz"]: r for r in bench_downsampling((1000, 3000, 5000, 6000))["tones"]}
    assert abs(tones[1000]["resampler_db"]) < 0.5 and abs(tones[3000]["resampler_db"]) < 1.0
    for f in (5000, 6000):  # above 4 kHz: removed by the filter, folded back by naive picking
        assert tones[f]["resampler_db"] < -50 and tones[f]["naive_db"] > -3
