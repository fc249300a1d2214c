"""bench/gpu_voice: per-level figures, utilisation sampling, reports and the call plan (pure parts), and the run's
orchestration end to end against a fake-model server (tests/fake_replica.py) with the real bench voice client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_voice import report, run
from bench.gpu_voice.sampler import (
    Sampler,
    parse_metrics,
    parse_pid_ticks,
    parse_proc_stat,
    process_tree,
    window_summary,
)

ROOT = Path(__file__).resolve().parents[1]


def test_turns_per_caller():
    assert [run.turns_per_caller(c, 10) for c in (1, 2, 8, 32, 64)] == [10, 5, 2, 2, 2]
    assert run.turns_per_caller(3, 10, min_per_caller=1) == 4
    with pytest.raises(ValueError):
        run.turns_per_caller(0, 10)


def _turn(i: int, e2e: float, **kw) -> dict:
    return {"session": i // 2, "turn": i % 2, "status": "ok", "e2e_ms": e2e, "end_of_turn_delay_ms": 100 + i,
            "asr_final_ms": 50.0, "llm_ttft_ms": 20.0, "tts_first_audio_ms": 30.0, "server_other_ms": 5.0,
            "e2e_server_ms": e2e - 10, "network_client_ms": 10.0, "tokens_per_s": 100.0, "llm_tokens": 30,
            "reply_audio_ms": 4000.0, "wer": 0.0, "anchor_lag_ms": 1.0} | kw


def test_level_summary_percentiles_and_statuses():
    turns = [_turn(i, 100.0 * (i + 1)) for i in range(10)]
    turns += [{"session": 9, "turn": 0, "status": "timeout"}, {"session": 8, "turn": 1, "status": "error: boom x"}]
    s = run.level_summary(turns)
    assert (s["turns"], s["ok"], s["statuses"]) == (12, 10, {"ok": 10, "timeout": 1, "error": 1})
    assert s["e2e_ms"]["p50"] == 550.0 and s["e2e_ms"]["p90"] == 910.0 and s["e2e_ms"]["p95"] == 955.0
    assert s["e2e_ms_steady"]["n"] == 5 and s["e2e_ms_steady"]["p50"] == 600.0  # turns 1, 3, 5, 7, 9
    assert s["stages"]["end_of_turn_delay_ms"] == {"p50": 104.5, "p95": 108.5, "n": 10}
    assert s["reply_tokens_p50"] == 30 and s["wer_mean"] == 0.0


PROC_STAT = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n"


def test_proc_and_metrics_parsing():
    assert parse_proc_stat(PROC_STAT) == (150, 1000)
    assert parse_pid_ticks("123 (python3 -m x) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 40 0") == 280
    text = ("# HELP voicefast_engine_running x\nvoicefast_engine_running 3.0\nvoicefast_engine_steps 120.0\n"
            "voicefast_e2e_seconds_count 4.0\nvoicefast_engine_step_seconds 0.5\n")
    assert parse_metrics(text) == {"running": 3.0, "steps": 120.0, "step_seconds": 0.5}
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2")


def _sample(t, busy, total, srv, steps, seqs, step_s, gpu=None, top=()):
    return {"t": t, "cpu_busy": busy, "cpu_total": total, "server_ticks": srv, "client_ticks": None, "client_pid": None,
            "server_top_threads_pct": list(top), "gpu_util_pct": gpu, "gpu_mem_mib": None,
            "engine": {"steps": steps, "step_seqs": seqs, "step_seconds": step_s, "running": seqs and 4,
                       "waiting": 0, "decode_tok_s": 50.0}}


def test_window_summary_derives_batch_step_time_and_cores():
    samples = [_sample(0.0, 0, 0, 0, 0, 0, 0.0), _sample(1.0, 50, 100, 200, 100, 800, 0.2, gpu=40.0, top=(90.0,)),
               _sample(2.0, 150, 200, 300, 300, 1200, 0.4, gpu=60.0, top=(70.0,)),
               _sample(9.0, 0, 0, 0, 0, 0, 0.0)]  # outside the window
    w = window_summary(samples, 0.0, 2.0, clk_tck=100)
    assert w["cpu_host_pct"]["mean"] == 75.0 and w["server_cores"]["mean"] == 1.5
    assert w["engine"]["steps"] == 300 and w["engine"]["batch_mean"] == 4.0 and w["engine"]["step_ms_mean"] == 1.333
    assert w["engine"]["batch_p50"] == 5.0 and w["engine"]["busy_pct"] == 20.0  # intervals: batch 8 then 2
    assert w["gpu_util_pct"]["mean"] == 50.0 and w["server_top_thread_pct"]["p95"] == 89.0


def test_sampler_reads_this_process():
    s = Sampler(os.getpid(), None)
    a = s.sample()
    sum(i * i for i in range(200_000))  # some CPU time between the two samples
    b = s.sample()
    assert b["server_ticks"] >= a["server_ticks"] and b["cpu_total"] > a["cpu_total"]
    assert b["server_top_threads_pct"] and b["engine"] == {}


def test_sampler_counts_the_servers_child_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in process_tree(os.getpid()) and process_tree(None) == []
        assert os.getpid() == process_tree(os.getpid())[0]
    finally:
        child.kill()
        child.wait()


def test_serve_args_may_be_one_flag():
    argv = run.glue_serve_args(["--out", "o", "--tag", "t", "--serve-args", "--engine-process"])
    assert run.build_parser().parse_args(argv).serve_args == "--engine-process"
    argv = run.glue_serve_args(["--out", "o", "--tag", "t", "--serve-args", "--asr-device cuda --engine-process"])
    assert run.build_parser().parse_args(argv).serve_args == "--asr-device cuda --engine-process"


def test_startup_report_parses_the_servers_lines():
    log = ("x\n  VAD  Silero VAD (/a.onnx)\n  ASR  Whisper tiny.en, CTranslate2 (cpu, int8)\n  LLM  SmolLM2 (cuda)\n"
           "  TTS  Piper joe (22050 Hz)\n  host: 16 CPU cores, 1 GPU (NVIDIA H200); LLM on cuda\nvoicefast serving\n")
    r = run.startup_report(log)
    assert r["asr"].startswith("Whisper") and r["llm"] == "SmolLM2 (cuda)" and r["host"].startswith("16 CPU cores")


def _doc(model, tag, started, levels, mode="semantic_vad:auto"):
    return {"meta": {"model": model, "tag": tag, "started": started, "turn_mode": mode, "note": "n", "commit": "abc",
                     "what": "w", "command": "c"}, "levels": levels, "turns": [], "skipped": []}


def _level(c, p50, p95):
    util = window_summary([], 0, 1)
    st = {m: {"p50": 1.0, "p95": 2.0, "n": 1} for m in run.STAGE_METRICS}
    return {"callers": c, "turns": 10, "ok": 10, "e2e_ms": {"p50": p50, "p90": p95, "p95": p95, "p99": p95},
            "e2e_ms_steady": {"p50": p50, "p95": p95}, "stages": st, "util": util}


def test_report_merges_runs_judges_the_target_and_finds_the_1s_crossing(tmp_path):
    a = _doc("embedded", "emb_a", "2026-01-01T00:00:00", [_level(1, 250, 400), _level(8, 260, 450)])
    b = _doc("embedded", "emb_b", "2026-01-01T00:05:00", [_level(8, 280, 480), _level(32, 290, 490),
                                                           _level(64, 600, 1200)])
    g = _doc("glm4-9b", "glm", "2026-01-01T00:10:00", [_level(1, 400, 700)])
    merged = report.merge([b, a, g])
    assert [lv["callers"] for lv in merged[("embedded", "semantic_vad:auto")]] == [1, 8, 32, 64]
    assert merged[("embedded", "semantic_vad:auto")][1]["tag"] == "emb_b"  # the later run wins
    assert report.crossing(merged[("embedded", "semantic_vad:auto")]) == 64
    text = report.summary_markdown([a, b, g])
    assert "p95 crosses 1 s at: 64 callers" in text and "-> **met**" in text
    assert "stays under 1 s up to 1 callers" in text
    srv = _doc("embedded", "s", "2026-01-01", [_level(32, 700, 900)], mode="server_vad:500")
    assert "reported, not judged" in report.summary_markdown([srv])
    assert [p.name for p in report.plot([a, b, g], tmp_path)] == ["latency_vs_callers.png", "stages_vs_callers.png"]
    assert "| 64 | 10/10 | **600 / 1,200 / 1,200** |" in report.run_markdown(b)


def test_turn_mode_follows_what_bench_voice_supports(tmp_path):
    a = run.build_parser().parse_args(["--out", str(tmp_path), "--tag", "t"])
    r = run.Run(a)
    has = "--turn-modes" in r.bench_flags
    assert r.turn_mode == ("semantic_vad:auto" if has else None)
    assert ("--turn-modes" in r.client_cmd("ws://x", 8, 2, tmp_path)) == has
    if not has:
        with pytest.raises(ValueError, match="turn-modes"):
            run.Run(run.build_parser().parse_args(["--out", str(tmp_path), "--tag", "t", "--turn-mode", "x"]))
    with pytest.raises(ValueError, match="tag"):
        run.Run(run.build_parser().parse_args(["--out", str(tmp_path), "--tag", "a/b"]))
    glm = run.Run(run.build_parser().parse_args(["--out", str(tmp_path), "--tag", "g", "--model", "glm4-9b"]))
    args = glm.serve_args(host_max_sessions=32)
    assert args[args.index("--max-output-tokens") + 1] == "12" and "--llm-model" in args
    assert args[args.index("--max-sessions") + 1] == "64" and "32 < 64" in glm.doc["meta"]["raised_limits"]
    assert "--max-sessions" not in glm.serve_args(host_max_sessions=64)
    assert "noise" in glm.doc["meta"]["note"]


@pytest.mark.slow
def test_run_orchestration_against_a_fake_model_server(tmp_path):
    """The whole run loop: a server process (fake models, real RealtimeServer), the real bench voice client at one
    level, the sampler on the server's pid and /metrics, the per-level summary and the five output files."""
    out = tmp_path / "out"
    rc = run.main(["--out", str(out), "--tag", "fake", "--levels", "2", "--turns-per-level", "2",
                   "--min-turns-per-caller", "1", "--budget-s", "240", "--server-cmd",
                   f"{ROOT / 'tests' / 'fake_replica.py'} --name r1 --port {{port}} --drain-timeout-s 1"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["fake.json", "fake.md", "fake_latency.png", "fake_server.log", "fake_stages.png"]
    doc = json.loads((out / "fake.json").read_text())
    (lv,) = doc["levels"]
    assert lv["callers"] == 2 and lv["ok"] == 2 and lv["e2e_ms"]["p50"] > 0
    assert lv["util"]["samples"] >= 2 and lv["util"]["server_cores"]["mean"] is not None
    assert len(doc["turns"]) == 2 and all(t["callers"] == 2 for t in doc["turns"])
    assert doc["meta"]["server_exit"] == 0 and sys.executable in doc["meta"]["command"]
    assert "| 2 | 2/2 |" in (out / "fake.md").read_text()


def test_call_plan_commands_fit_the_device_tool(tmp_path):
    from bench.gpu_voice import plan, stage

    st = tmp_path / ".stage"
    f = tmp_path / "w.whl"
    f.write_bytes(b"x" * 5000)
    m = stage.bundle([("wheels/w.whl", f)], st, "base", chunk_bytes=4096)
    calls = plan.build_plan(st, "abc1234", ["base"])
    chunks = [c for c in calls if c.carry]
    assert len(m["chunks"]) >= 2
    assert [c.carry for c in chunks] == [[f".stage/base-c{k:02d}"] for k in range(1, len(m["chunks"]) + 1)]
    assert "nvidia-smi" in chunks[0].command and "pip show" in chunks[0].command
    assert "stage install --group base" in chunks[-1].command and "asr_host" in chunks[-1].command
    runs = [c for c in calls if not c.carry]
    assert [("--model embedded" in c.command, "--model glm4-9b" in c.command) for c in runs] == \
        [(True, False), (False, True)]
    assert all("--commit abc1234" in c.command and "$OUT" in c.command for c in runs)
    assert all(len(c.command) <= 2000 and c.timeout_s <= 600 for c in calls)
    with pytest.raises(FileNotFoundError, match="--cublas12"):
        plan.build_plan(st, "abc1234", ["base", "cublas12"])
    # with the cuBLAS group (Whisper on the GPU) its chunks come before the runs and its install measures the pools
    stage.bundle([("wheels/c.whl", f)], st, "cublas12", chunk_bytes=4096)
    gpu = plan.build_plan(st, "abc1234", ["base", "cublas12"])
    carried = [c.carry[0] for c in gpu if c.carry]
    assert carried[0] == ".stage/base-c01" and carried[-1].startswith(".stage/cublas12-c")
    last_stage = max(i for i, c in enumerate(gpu) if c.carry)
    assert all(not c.carry for c in gpu[last_stage + 1:]) and len(gpu) - last_stage - 1 == 2  # then the two runs
    assert "asr_host" not in gpu[last_stage - len([x for x in carried if "cublas12" in x])].command  # base install
    assert "install --group cublas12" in gpu[last_stage].command and "cuda:2x1" in gpu[last_stage].command
    assert not any(c.optional for c in gpu)
    long = plan.Call("x", "y" * 2001)
    with pytest.raises(ValueError, match="2001 characters"):
        long.check()
    text = plan.markdown(calls, st, 1 << 20)
    assert text.count("```json") == len(calls) and "Expected device time" in text


def test_asr_host_config_parsing():
    from bench.gpu_voice.asr_host import parse_configs

    assert parse_configs("cpu:4x2, cuda:2x1") == [("cpu", 4, 2), ("cuda", 2, 1)]
    for bad in ("gpu:1x1", "cpu:0x1", "cpu:4", "cpu:ax2"):
        with pytest.raises(ValueError, match="configs"):
            parse_configs(bad)
