"""The hardening benchmarks' machinery (soak scenarios and sampling, stall measurement, storm classification)
against the real server on 127.0.0.1:0 with fake models. The figures themselves come from the real models
(docs/benchmarks.md); these tests keep the harness honest."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest
from fakes import FakeEngine, FakeTTS, make_stack, speech_like

from bench import overload, soak, soak_traffic, stall
from bench.voice.utterances import Utterance
from voicefast.config import ServerConfig
from voicefast.server import RealtimeServer
from voicefast.session_config import SessionConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def tone_utterance(ms: int = 500) -> Utterance:
    x = np.concatenate([speech_like(ms), np.zeros(24_000 * 100 // 1000, np.float32)])
    pcm = (x * 32767).astype("<i2").tobytes()
    return Utterance("tone", pcm, 24 * ms, "tone")


class Server:
    def __init__(self, **opts):
        engine = FakeEngine(reply=lambda m: "Sure, we are open from nine to six on weekdays and from ten to four "
                                            "on Saturdays. Anything else?", token_s=0.01)
        self.stack = make_stack(engine=engine, tts=FakeTTS(word_s=0.05))
        self.server = RealtimeServer(self.stack, ServerConfig(host="127.0.0.1", port=0, output_lead_ms=100, **opts),
                                     defaults=SessionConfig(instructions="Bench persona.", voice="fake"))

    async def __aenter__(self):
        await self.server.start()
        return f"ws://127.0.0.1:{self.server.port}/v1/realtime"

    async def __aexit__(self, *exc):
        await self.server.close()


async def test_every_soak_scenario_completes_its_story():
    utts = [tone_utterance(500), tone_utterance(700)]
    async with Server() as url:
        outcomes = []
        for k, (_, fn) in enumerate(soak_traffic.SCENARIOS):
            c = await soak_traffic.Client.open(url)
            outcomes.append(await fn(c, utts, k))
            if not c.ws.transport.is_closing():
                await c.close()
    assert outcomes == ["turns", "barge_in:cancelled/completed", "vanished_mid_response", "manual:completed",
                        "bad_input:completed"]


async def test_soak_samples_counters_and_finds_them_back_at_baseline():
    utts = [tone_utterance(400)]
    async with Server() as url:
        args = argparse.Namespace(minutes=0.1, workers=2, sample_s=2.0)
        res = await soak.soak(url, None, args, utts)
    samples = res["samples"]
    assert samples[0]["phase"] == "idle" and samples[-1]["phase"] == "end" and len(samples) >= 4
    for key in ("rss_bytes", "open_fds", "threads", "tasks", "free_blocks", "malloc_in_use_bytes"):
        assert key in samples[-1], key
    assert sum(res["outcomes"].values()) >= 2 and not any("failed" in k for k in res["outcomes"])
    verdict = soak.analyse(samples, warmup_min=0.0)
    assert verdict["back_to_baseline"]["sessions"]["end"] == 0
    assert verdict["back_to_baseline"]["free_blocks"]["ok"] and verdict["back_to_baseline"]["tasks"]["ok"]
    assert verdict["post_warmup_samples"] >= 2 and "rss_slope_mib_per_min" in verdict


def test_soak_analysis_flags_a_climb_and_passes_a_plateau():
    def run(rss_mib):
        s = [{"phase": "idle", "open_fds": 10, "threads": 5}]
        s += [{"phase": "traffic", "minute": m, "rss_bytes": r * 2**20} for m, r in enumerate(rss_mib)]
        return soak.analyse(s + [{"phase": "end", "minute": 99, "open_fds": 10, "threads": 6}], warmup_min=2)

    climbing = run([100, 150, 200, 212, 224, 236, 248, 260])
    assert not climbing["rss_flat"] and climbing["rss_slope_mib_per_min"] == pytest.approx(12, abs=0.5)
    plateau = run([100, 150, 200, 201, 199, 200, 202, 200])
    assert plateau["rss_flat"] and abs(plateau["rss_slope_mib_per_min"]) < 0.5
    assert plateau["back_to_baseline"]["open_fds"]["ok"] and not plateau["back_to_baseline"]["threads"]["ok"]


async def test_stall_measurement_reports_idle_and_during_round_trips():
    async with Server(max_message_bytes=300_000) as url:
        args = argparse.Namespace(appends=2, format="pcm", message_bytes=300_000, idle_s=0.5)
        r = await stall.measure(url, args)
    assert r["append_bytes"] <= 300_000 and r["audio_s_per_append"] == pytest.approx(4.7, abs=0.1)
    assert r["idle_rtt_ms"]["n"] > 5 and r["during_rtt_ms"]["n"] >= 1 and r["worst_stall_ms"] > 0


async def test_storm_connections_are_classified():
    async with Server(max_sessions=1) as url:
        assert await overload.storm_client(url) == "accepted"
        c = await soak_traffic.Client.open(url)  # the server is now full
        assert await asyncio.gather(*(overload.storm_client(url) for _ in range(3))) == ["refused_clean"] * 3
        await c.close()
