"""The latency harness's metrics, checked against a scripted fake server with KNOWN delays and known audio timing,
plus a short real run against `voicefast serve` on the embedded models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fake_realtime_server import RATE_HZ, FakeRealtimeServer, FakeScript

from bench.cli import main as bench_main
from bench.voice.runner import build_parser, run, sweep_levels
from bench.voice.stats import percentile, summarize
from bench.voice.utterances import FRAME_SAMPLES, load_wav_dir, make_utterance, speech_end_sample
from bench.voice.wer import word_error_rate

TONE_MS = 700  # whole frames, so the fake's chunk-level end of speech is the exact sample


def _tone_dir(tmp_path: Path, texts: list[str]) -> Path:
    d = tmp_path / "wavs"
    d.mkdir()
    for i, text in enumerate(texts):
        n = RATE_HZ * TONE_MS // 1000
        x = 0.4 * np.sin(2 * np.pi * 300 * np.arange(n) / RATE_HZ)
        x = np.concatenate([x, np.zeros(RATE_HZ // 2)])  # trailing silence the harness must cut off
        sf.write(d / f"u{i}.wav", x, RATE_HZ, subtype="PCM_16")
        (d / f"u{i}.txt").write_text(text)
    return d


def _run(args: list[str]) -> dict:
    argv = [*args, "--quiet"]
    return run(build_parser().parse_args(argv), argv)


def test_speech_end_and_frames():
    n = RATE_HZ * TONE_MS // 1000 + 123  # not a whole number of frames
    x = np.concatenate([0.5 * np.sin(np.arange(n) / 5.0), np.zeros(RATE_HZ)]).astype(np.float32)
    assert abs(speech_end_sample(x) - n) <= RATE_HZ // 100  # within one 10 ms window
    u = make_utterance("hi", x, RATE_HZ, "test")
    assert len(u.pcm) % (FRAME_SAMPLES * 2) == 0
    assert u.speech_end_sample <= len(u.pcm) // 2 < u.speech_end_sample + FRAME_SAMPLES
    with pytest.raises(ValueError, match="silent"):
        speech_end_sample(np.zeros(RATE_HZ, np.float32))


def test_wer_and_percentiles():
    assert word_error_rate("What time do you open?", "what time do you open") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d") == 1.0  # two insertions
    assert percentile([3, 1, 2, 4], 50) == 2.5
    assert percentile([], 90) is None
    assert sweep_levels(4) == [1, 2, 4] and sweep_levels(6) == [1, 2, 4, 6] and sweep_levels(1) == [1]


def test_stage_plot_with_overlapping_stages(tmp_path):
    from bench.voice.plots import write_plots

    # a speculative server: stages run inside the silence window, so they sum past e2e (server_other < 0)
    turns = [{"status": "ok", "concurrency": c, "e2e_ms": 540.0 + i, "end_of_turn_delay_ms": 520.0,
              "asr_final_ms": 70.0, "llm_ttft_ms": 120.0, "tts_first_audio_ms": 66.0, "server_other_ms": -236.0,
              "network_client_ms": 1.0, "speech_stopped_ms": 522.0, "transcript_ms": 523.0, "first_text_ms": 530.0}
             for c in (1, 2) for i in range(3)]
    for p in write_plots(turns, tmp_path):
        _assert_png(p)


def test_wav_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_wav_dir(tmp_path / "nope")
    sf.write(tmp_path / "a.wav", np.zeros(100), RATE_HZ)
    with pytest.raises(ValueError, match="lack a .txt"):
        load_wav_dir(tmp_path)


def test_harness_reports_the_injected_delays(tmp_path):
    script = FakeScript(silence_ms=300, asr_final_ms=40, llm_ttft_ms=70, tts_first_audio_ms=50, reply_audio_ms=400,
                        transcripts=["hello there friend", "hello"])
    wavs = _tone_dir(tmp_path, ["hello there friend"])
    with FakeRealtimeServer(script) as srv:
        doc = _run(["--url", srv.url, "--sessions", "1", "--turns", "2", "--wav-dir", str(wavs),
                    "--out", str(tmp_path / "out"), "--think-ms", "100"])
    turns = doc["turns"]
    assert [t["status"] for t in turns] == ["ok", "ok"]
    assert len(srv.turns) == 2
    injected = script.silence_ms + script.asr_final_ms + script.llm_ttft_ms + script.tts_first_audio_ms  # 460
    for t, ft in zip(turns, srv.turns, strict=True):
        # The fake saw the end of speech exactly where the harness says it is (same 20 ms frame).
        assert ft.speech_end_sample - ft.speech_start_sample == RATE_HZ * TONE_MS // 1000
        # What really happened on the server, same clock: silence window (paced by the caller in real time)
        # + the server's own measured delay from the silence-completing frame to the first audio it sent.
        truth = script.silence_ms + (ft.t_first_audio_sent - ft.t_speech_end_recv) * 1000
        # Both clocks are this process's monotonic clock. The caller can only hear the reply after the server sent
        # it and can only finish the silence after pacing it, so a harness anchored on the true end of speech never
        # reports less than the truth (1 ms for rounding); anchored on speech_stopped it would report ~300 ms less.
        # The excess is delivery and scheduling delay: a few ms on a quiet machine, more under load, hence 150.
        assert truth - 1 <= t["e2e_ms"] <= truth + 150, (t["e2e_ms"], truth)
        assert t["e2e_ms"] >= injected - 1, (t["e2e_ms"], injected)  # the sleeps may overshoot, never undershoot
        # The breakdown is the server's report, passed through untouched.
        assert (t["end_of_turn_delay_ms"], t["asr_final_ms"], t["llm_ttft_ms"], t["tts_first_audio_ms"]) == \
            (300, 40, 70, 50)
        assert t["tokens_per_s"] == 42.0
        assert t["server_other_ms"] == 0  # the fake's e2e_server_ms is exactly the sum of its stages
        assert abs(t["network_client_ms"] - (t["e2e_ms"] - injected)) < 1e-6
        # Not anchored on speech_stopped: the fake sends it a full silence window after the true end.
        assert t["speech_stopped_ms"] >= script.silence_ms - 10
        assert t["reply_audio_ms"] == pytest.approx(400, abs=1)
        assert t["reply_text"] == script.reply_text
    assert turns[0]["wer"] == 0.0 and turns[1]["wer"] == pytest.approx(2 / 3, abs=1e-3)
    # every append the caller sent was a 20 ms frame
    sizes = {len(e["audio"]) for e in srv.received if e["type"] == "input_audio_buffer.append"}
    assert sizes == {len(__import__("base64").b64encode(bytes(FRAME_SAMPLES * 2)))}


def test_closed_sweep_and_outputs(tmp_path):
    script = FakeScript(silence_ms=200, asr_final_ms=10, llm_ttft_ms=20, tts_first_audio_ms=30, reply_audio_ms=200,
                        report_timings=False, api_key="sekret")
    wavs = _tone_dir(tmp_path, ["hello there", "hello there"])
    out = tmp_path / "out"
    with FakeRealtimeServer(script) as srv:
        rc = bench_main(["voice", "--url", srv.url, "--sessions", "2", "--turns", "1", "--wav-dir", str(wavs),
                         "--out", str(out), "--api-key", "sekret", "--quiet", "--think-ms", "0"])
    assert rc == 0
    doc = json.loads((out / "turns.json").read_text())
    assert doc["meta"]["levels"] == [1, 2] and doc["meta"]["commit"]
    assert sorted(t["concurrency"] for t in doc["turns"]) == [1, 2, 2]
    for t in doc["turns"]:
        assert t["status"] == "ok" and t["e2e_ms"] > 260
        assert t["llm_ttft_ms"] is None  # this server reports no timings: null, not made up
        assert t["first_text_ms"] < t["e2e_ms"]
    s = summarize(doc["turns"])
    assert set(s) == {"1", "2"} and s["2"]["e2e_ms"]["n"] == 2
    md = (out / "summary.md").read_text()
    assert "## concurrency 2" in md and "| e2e_ms |" in md
    for name in ("latency_cdf.png", "latency_vs_concurrency.png", "stage_breakdown.png"):
        _assert_png(out / name)


def test_wrong_api_key_is_a_clear_failure(tmp_path):
    wavs = _tone_dir(tmp_path, ["hi"])
    with FakeRealtimeServer(FakeScript(api_key="right")) as srv:
        doc = _run(["--url", srv.url, "--turns", "1", "--wav-dir", str(wavs), "--out", str(tmp_path / "o"),
                    "--api-key", "wrong", "--no-plots"])
    [t] = doc["turns"]
    assert t["status"].startswith("error:") and "401" in t["status"]


def test_server_closing_mid_conversation_is_recorded(tmp_path):
    wavs = _tone_dir(tmp_path, ["hello there"])
    script = FakeScript(silence_ms=200, asr_final_ms=10, llm_ttft_ms=10, tts_first_audio_ms=10, reply_audio_ms=100,
                        close_at_turn=1)
    with FakeRealtimeServer(script) as srv:
        doc = _run(["--url", srv.url, "--turns", "3", "--wav-dir", str(wavs), "--out", str(tmp_path / "o"),
                    "--think-ms", "0"])
    closed = "error: connection closed by the server (1011 scripted failure)"
    assert [t["status"] for t in doc["turns"]] == ["ok", closed]
    assert "failed turns" in (tmp_path / "o" / "summary.md").read_text()


def test_open_loop(tmp_path):
    wavs = _tone_dir(tmp_path, ["hello there"])
    script = FakeScript(silence_ms=200, asr_final_ms=10, llm_ttft_ms=10, tts_first_audio_ms=10, reply_audio_ms=120)
    with FakeRealtimeServer(script) as srv:
        doc = _run(["--url", srv.url, "--mode", "open", "--rate", "20", "--sessions", "3", "--turns", "1",
                    "--wav-dir", str(wavs), "--out", str(tmp_path / "o"), "--no-plots", "--think-ms", "0"])
    assert len(doc["turns"]) == 3
    assert all(t["status"] == "ok" and t["level"] == "open 20/s" and t["concurrency"] >= 1 for t in doc["turns"])


def test_bad_arguments_exit_cleanly(tmp_path, capsys):
    assert bench_main(["voice", "--url", "http://x", "--out", str(tmp_path)]) == 2
    assert "ws://" in capsys.readouterr().err
    assert bench_main(["nope"]) == 2


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 100 and h > 100
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.std() > 5  # not a blank canvas


@pytest.mark.slow
def test_real_server_short_run(tmp_path):
    """No --url: the harness starts `voicefast serve` (embedded models) on a free port, talks to it, stops it."""
    out = tmp_path / "real"
    rc = bench_main(["voice", "--sessions", "1", "--turns", "2", "--out", str(out), "--quiet", "--think-ms", "100",
                     "--serve-args", "--max-output-tokens 24"])  # short replies: the caller listens to them
    log = (out / "server.log").read_text() if (out / "server.log").exists() else ""
    assert rc == 0, log[-3000:]
    doc = json.loads((out / "turns.json").read_text())
    assert doc["meta"]["url"].startswith("ws://127.0.0.1:") and doc["meta"]["commit"]
    ok = [t for t in doc["turns"] if t["status"] == "ok"]
    assert ok, (doc["turns"], log[-3000:])
    for t in ok:
        assert isinstance(t["e2e_ms"], float) and t["e2e_ms"] > 0
        assert t["transcript"] and t["wer"] is not None
        assert t["reply_text"].strip() and t["reply_audio_ms"] > 0
        # our server reports its stage breakdown and decode speed
        assert t["end_of_turn_delay_ms"] is not None and t["llm_ttft_ms"] is not None
        assert t["tokens_per_s"] is not None and t["tokens_per_s"] > 0
    assert min(t["wer"] for t in ok) < 0.5  # the embedded ASR understood at least one question
    assert "| e2e_ms |" in (out / "summary.md").read_text()
    for name in ("latency_cdf.png", "latency_vs_concurrency.png", "stage_breakdown.png"):
        _assert_png(out / name)


def test_bench_dispatch_names_a_missing_module(monkeypatch, capsys):
    import bench.cli

    monkeypatch.setitem(bench.cli.BENCHES, "engine", ("bench.not_there:main", "x"))
    assert bench_main(["engine", "--help"]) == 2
    assert "bench.not_there is not part of this build" in capsys.readouterr().err
    assert bench_main(["--help"]) == 0 and "voice" in capsys.readouterr().out


def _tone(ms: int) -> np.ndarray:
    n = RATE_HZ * ms // 1000
    return (0.4 * np.sin(2 * np.pi * 300 * np.arange(n) / RATE_HZ)).astype(np.float32)


def test_paused_utterance_cut_is_detected_and_summarized(tmp_path):
    """A server with a 300 ms silence window cuts a caller who pauses 700 ms mid-phrase: response.created comes
    before the true end of speech. The harness flags it, and the per-mode summary counts it."""
    import asyncio

    from bench.voice.caller import CallerConfig
    from bench.voice.runner import _Progress, run_closed
    from bench.voice.stats import mode_markdown, mode_summary
    from bench.voice.utterances import Utterance

    whole = np.concatenate([_tone(600), np.zeros(RATE_HZ * 700 // 1000, np.float32), _tone(600)])
    u = make_utterance("book a table for ... four people", whole, RATE_HZ, "tone")
    paused_u = Utterance(u.text, u.pcm, u.speech_end_sample, u.source, pause_ms=700)
    complete_u = make_utterance("hello there", _tone(600), RATE_HZ, "tone")
    script = FakeScript(silence_ms=300, reply_audio_ms=200, transcripts=["hello there"])
    with FakeRealtimeServer(script) as srv:
        cfg = CallerConfig(url=srv.url, think_ms=50, turn_detection={"type": "server_vad", "silence_duration_ms": 300},
                           mode="server_vad 300")
        progress = _Progress(3, quiet=True)
        cfgs = {"realtime": cfg}
        turns = asyncio.run(run_closed(cfgs, [complete_u], [1], 2, progress, lambda a, b: 0.0, label="m, c="))
        turns += asyncio.run(run_closed(cfgs, [paused_u], [1], 1, progress, lambda a, b: 0.0, label="m, paused "))
    assert srv.session_updates[0]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 300
    complete, paused_rec = turns[:2], turns[2]
    assert not any(t["cut"] for t in complete) and all(t["kind"] == "complete" for t in complete)
    assert paused_rec["kind"] == "paused" and paused_rec["pause_ms"] == 700 and paused_rec["cut"] is True
    (row,) = mode_summary(turns)
    assert row["mode"] == "server_vad 300" and row["paused_cuts"] == 1 and row["paused_n"] == 1
    assert row["levels"][1]["n"] == 2 and row["levels"][1]["cut"] == 0
    md = "\n".join(mode_markdown(turns))
    assert "| server_vad 300 | 1 | 2 |" in md and "1/1 (100%)" in md
    from bench.voice.plots import write_plots

    assert any(p.name == "latency_vs_cut_rate.png" for p in write_plots(turns, tmp_path))
    _assert_png(tmp_path / "latency_vs_cut_rate.png")


def test_turn_modes_parse():
    from bench.voice.runner import parse_modes

    assert parse_modes("server_vad:500,semantic_vad:auto,semantic_vad:low") == [
        ("server_vad 500", {"type": "server_vad", "silence_duration_ms": 500}),
        ("semantic_vad auto", {"type": "semantic_vad", "eagerness": "auto"}),
        ("semantic_vad low", {"type": "semantic_vad", "eagerness": "low"})]
    assert parse_modes(None) == [("default", None)]
    for bad in ("semantic_vad:eager", "vad:1"):
        with pytest.raises(ValueError, match="turn-modes"):
            parse_modes(bad)


def test_paused_set_is_large_enough_and_its_pauses_in_range():
    from bench.voice.prompts import PAUSED, SPEAKING_RATES, pause_ms

    assert len(PAUSED) >= 20 and len(set(PAUSED)) == len(PAUSED)
    assert all(600 <= pause_ms(i) <= 900 for i in range(len(PAUSED)))
    assert len({pause_ms(i) for i in range(len(PAUSED))}) > 10 and len(SPEAKING_RATES) >= 2
