"""`voicefast bench asr | tts` and the full audio benchmark (`python -m bench.audio`): VAD cost per 32 ms
window, ASR final latency after the endpoint for 1-5 s utterances (plain and with the final started
speculatively at early_silence), concurrent finals from 8 sessions (one at a time vs batched), TTS time to
first audio and real-time factor. Utterances are spoken by the embedded Piper voice at run time."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CUSTOMER = [
    "Yes please.", "No, thank you.", "Cancel my order.",  # ~1 s
    "What time do you open on Saturday?", "I would like to check the status of my order.",
    "My order number is four five seven two one.", "How much does the premium plan cost per month?",
    "Can I return a pair of shoes that I bought last week?", "Please send the receipt to my email address.",
    "Standard delivery takes three to five business days.", "Thank you very much for your help today.",
    "We are located at one hundred Main Street in Springfield.",
    "Our store is open from nine in the morning until six in the evening.",
    "I need to change the delivery address for my package, it is going to the wrong city.",  # ~5 s
    "My credit card was charged twice for the same order, can you please refund one of the payments?",
]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _utterances(texts: list[str]) -> list[tuple[str, np.ndarray]]:
    from audio.resample import resample
    from audio.tts import PiperTTS

    tts = PiperTTS()
    out = []
    for t in texts:
        a = np.concatenate(list(tts.synthesize(t)))
        out.append((t, resample(a, tts.sample_rate_hz, 16000)))
    return out


def bench_vad(seconds: float = 20.0, streams: int = 8) -> dict:
    from audio.vad import WINDOW_SAMPLES, SileroVadModel, VadStream

    model = SileroVadModel()
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    s = VadStream(model)
    per = []
    for i in range(0, len(x) - WINDOW_SAMPLES + 1, WINDOW_SAMPLES):
        t0 = time.perf_counter()
        s.process(x[i:i + WINDOW_SAMPLES])
        per.append((time.perf_counter() - t0) * 1e3)
    many = [VadStream(model) for _ in range(streams)]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(x) // 4 - 320 + 1, 320):  # 20 ms client frames, interleaved sessions
        for st in many:
            st.process(x[i:i + 320])
            n += 1
    interleaved_ms = (time.perf_counter() - t0) * 1e3 / (n * 320 / WINDOW_SAMPLES)
    return {"window_ms": 32, "per_window_ms_median": statistics.median(per), "per_window_ms_p99": _pct(per, 99),
            "interleaved_streams": streams, "interleaved_per_window_ms": interleaved_ms,
            "realtime_streams_per_core": 32.0 / statistics.median(per)}


def bench_vad_accuracy(snrs_db: tuple = (None, 20, 10)) -> dict:
    """Onset / end-of-speech error (ms) against the clean signal's envelope, with white noise added."""
    from audio.vad import SileroVadModel, VadParams, VadStream

    model = SileroVadModel()
    utts = _utterances(CUSTOMER[3:])
    out = {}
    for snr in snrs_db:
        rng = np.random.default_rng(0)
        start_err, stop_err, misses = [], [], 0
        for _, speech in utts:
            x = np.concatenate([np.zeros(12800, np.float32), speech, np.zeros(19200, np.float32)])
            n = len(x) // 160 * 160  # truth: first / last 10 ms frame above -40 dBFS RMS in the clean signal
            idx = np.nonzero(np.sqrt(np.mean(x[:n].reshape(-1, 160) ** 2, axis=1)) > 0.01)[0]
            on, off = int(idx[0]) * 160, int(idx[-1]) * 160 + 160
            if snr is not None:
                x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(
                    np.mean(x[on:off] ** 2) / 10 ** (snr / 10))
            st = VadStream(model, VadParams())
            ev = []
            for i in range(0, len(x), 320):
                ev += st.process(x[i:i + 320])
            kinds = [e.kind for e in ev]
            if not kinds or kinds[0] != "speech_started" or kinds[-1] != "speech_stopped":
                misses += 1
                continue
            start_err.append((ev[0].sample - on) / 16)
            stop_err.append((ev[-1].sample - off) / 16)
        out["clean" if snr is None else f"{snr}dB"] = {
            "n": len(utts), "missed": misses, "start_err_ms_median": statistics.median(start_err),
            "start_err_ms_max_abs": max(abs(e) for e in start_err), "stop_err_ms_median": statistics.median(stop_err),
            "stop_err_ms_max_abs": max(abs(e) for e in stop_err)}
    return out


def bench_asr(model: str | None, cpu_threads: int, sessions: int, early_silence_ms: int = 160,
              silence_ms: int = 500) -> dict:
    from audio.asr import AsrOptions, WhisperASR
    from audio.wer import word_error_rate

    utts = _utterances(CUSTOMER)
    asr = WhisperASR(model, cpu_threads=cpu_threads, max_batch=1)
    asr.transcribe(utts[3][1])  # warm up
    rows, hyps = [], []
    tail = np.zeros(int(0.15 * 16000), np.float32)  # the final decodes speech + 150 ms, as StreamingTranscriber
    for text, x in utts:
        xx = np.concatenate([x, tail])
        t0 = time.perf_counter()
        hyp = asr.transcribe(xx)
        dt = time.perf_counter() - t0
        hyps.append(hyp)
        # Speculative: the final starts at early_silence, (silence_ms - early_silence_ms) before the endpoint.
        head_start = (silence_ms - early_silence_ms) / 1000
        rows.append({"text": text, "audio_s": len(x) / 16000, "final_s": dt,
                     "after_endpoint_spec_s": max(0.0, dt - head_start), "hyp": hyp})
    full = WhisperASR(model, cpu_threads=cpu_threads, max_batch=1, options=AsrOptions(min_window_s=30.0))
    full.transcribe(utts[3][1])
    full_s = []
    for _, x in utts:
        t0 = time.perf_counter()
        full.transcribe(np.concatenate([x, tail]))
        full_s.append(time.perf_counter() - t0)
    full.close()
    partial = []
    for _ in range(3):
        t0 = time.perf_counter()
        asr.transcribe(utts[-1][1][:16000])
        partial.append(time.perf_counter() - t0)
    finals = [r["final_s"] for r in rows]
    spec = [r["after_endpoint_spec_s"] for r in rows]
    buckets: dict[int, list[float]] = {}
    for r in rows:
        buckets.setdefault(max(1, int(round(r["audio_s"]))), []).append(r["final_s"])
    by_len = {f"{k}s": {"n": len(v), "final_s_median": statistics.median(v)} for k, v in sorted(buckets.items())}
    res = {"model": asr.name, "final_by_audio_length": by_len,
           "device": asr.device, "compute_type": asr.compute_type, "cpu_threads": cpu_threads,
           "utterances": len(rows), "audio_s_range": [min(r["audio_s"] for r in rows),
                                                      max(r["audio_s"] for r in rows)],
           "final_after_endpoint_s_median": statistics.median(finals), "final_after_endpoint_s_p90": _pct(finals, 90),
           "spec_final_after_endpoint_s_median": statistics.median(spec),
           "spec_final_after_endpoint_s_p90": _pct(spec, 90),
           "partial_decode_1s_median": statistics.median(partial),
           "final_full_30s_window_s_median": statistics.median(full_s),
           "final_full_30s_window_s_p90": _pct(full_s, 90),
           "wer": word_error_rate([t for t, _ in utts], hyps), "rows": rows}
    asr.close()
    res["concurrency"] = bench_concurrency(model, cpu_threads, sessions, utts)
    return res


def bench_concurrency(model: str | None, cpu_threads: int, sessions: int, utts) -> list[dict]:
    """`sessions` finals submitted at once (8 callers stopping together) under three pool settings."""
    from audio.asr import WhisperASR

    xs = [utts[3 + i % (len(utts) - 3)][1] for i in range(sessions)]
    configs = [("1 worker, one at a time", dict(workers=1, max_batch=1, cpu_threads=cpu_threads)),
               ("1 worker, batched", dict(workers=1, max_batch=sessions, cpu_threads=cpu_threads)),
               ("2 workers x 1 thread", dict(workers=2, max_batch=1, cpu_threads=max(1, cpu_threads // 2)))]
    out = []
    for name, kw in configs:
        asr = WhisperASR(model, **kw)
        asr.transcribe(xs[0])

        async def run(asr=asr):
            t0 = time.perf_counter()

            async def one(x):
                await asr.transcribe_async(x)
                return time.perf_counter() - t0

            lat = await asyncio.gather(*(one(x) for x in xs))
            return time.perf_counter() - t0, list(lat)

        wall, lat = asyncio.run(run())
        asr.close()
        out.append({"config": name, **kw, "sessions": sessions, "wall_s": wall,
                    "latency_s_median": statistics.median(lat), "latency_s_max": max(lat)})
    return out


def bench_tts(voice: str | None, out_rate_hz: int = 24000) -> dict:
    from audio.speech_out import SpeechOutput
    from audio.tts import PiperTTS

    tts = PiperTTS(voice)
    list(tts.synthesize("Warm up."))
    first_chunk, rtf = [], []
    for text in CUSTOMER[3:]:
        t0 = time.perf_counter()
        n = 0
        for i, chunk in enumerate(tts.synthesize(text)):
            if i == 0:
                first_chunk.append(time.perf_counter() - t0)
            n += len(chunk)
        rtf.append((time.perf_counter() - t0) / (n / tts.sample_rate_hz))
    reply = ("Sure, I can help with that. Your order shipped yesterday and should arrive on Tuesday, "
             "and you will get an email with the tracking number.")

    async def first_frame(step: int = 4) -> tuple[float, float]:
        so = SpeechOutput(tts, out_rate_hz)
        t0 = time.perf_counter()

        async def feed():  # the LLM streaming ~4 characters per token at ~100 tokens/s
            for i in range(0, len(reply), step):
                so.add_text(reply[i:i + step])
                await asyncio.sleep(0.01)
            so.finish()

        task = asyncio.create_task(feed())
        first, n = None, 0
        async for f in so.frames():
            first = first if first is not None else time.perf_counter() - t0
            n += len(f.pcm)
        await task
        return first, (time.perf_counter() - t0) / (n / out_rate_hz)

    ff = [asyncio.run(first_frame()) for _ in range(3)]
    return {"voice": tts.name, "sample_rate_hz": tts.sample_rate_hz,
            "first_audio_s_median": statistics.median(first_chunk), "first_audio_s_p90": _pct(first_chunk, 90),
            "rtf_median": statistics.median(rtf),
            "speech_output_first_frame_s_median": statistics.median(f for f, _ in ff),
            "speech_output_first_frame_includes": "LLM text streamed at 4 chars / 10 ms; first phrase 27 chars",
            "speech_output_rtf": statistics.median(r for _, r in ff), "out_rate_hz": out_rate_hz}


def _env() -> dict:
    return {"commit": _commit(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "loadavg_1m_at_end": os.getloadavg()[0]}


def _print_table(res: dict) -> None:
    lines = ["| measure | value |", "|---|---|"]
    if "vad" in res:
        v = res["vad"]
        lines += [f"| VAD per 32 ms window (median / p99) | {v['per_window_ms_median']:.3f} / "
                  f"{v['per_window_ms_p99']:.3f} ms |",
                  f"| VAD per window, {v['interleaved_streams']} interleaved streams, 20 ms frames | "
                  f"{v['interleaved_per_window_ms']:.3f} ms |"]
    for cond, v in res.get("vad_accuracy", {}).items():
        lines.append(f"| VAD error vs truth, {cond} ({v['n']} utts, {v['missed']} missed): start median / max, "
                     f"stop median / max | {v['start_err_ms_median']:+.0f} / {v['start_err_ms_max_abs']:.0f} ms, "
                     f"{v['stop_err_ms_median']:+.0f} / {v['stop_err_ms_max_abs']:.0f} ms |")
    if "asr" in res:
        a = res["asr"]
        lines += [f"| ASR {a['model']} {a['device']}/{a['compute_type']} {a['cpu_threads']} threads, "
                  f"{a['utterances']} utts {a['audio_s_range'][0]:.1f}-{a['audio_s_range'][1]:.1f} s | WER "
                  f"{a['wer'] * 100:.1f}% |",
                  f"| ASR final after endpoint (median / p90) | {a['final_after_endpoint_s_median'] * 1e3:.0f} / "
                  f"{a['final_after_endpoint_s_p90'] * 1e3:.0f} ms |",
                  f"| ASR final after endpoint, started at early_silence (median / p90) | "
                  f"{a['spec_final_after_endpoint_s_median'] * 1e3:.0f} / "
                  f"{a['spec_final_after_endpoint_s_p90'] * 1e3:.0f} ms |",
                  f"| ASR final on Whisper's full 30 s window instead (median / p90) | "
                  f"{a['final_full_30s_window_s_median'] * 1e3:.0f} / "
                  f"{a['final_full_30s_window_s_p90'] * 1e3:.0f} ms |",
                  "| ASR final by utterance length (median) | " + ", ".join(
                      f"{k}: {v['final_s_median'] * 1e3:.0f} ms (n={v['n']})"
                      for k, v in a["final_by_audio_length"].items()) + " |",
                  f"| ASR partial decode of 1 s (median) | {a['partial_decode_1s_median'] * 1e3:.0f} ms |"]
        for c in a.get("concurrency", []):
            lines.append(f"| {c['sessions']} finals at once, {c['config']} (wall; latency median / max) | "
                         f"{c['wall_s']:.2f} s; {c['latency_s_median']:.2f} / {c['latency_s_max']:.2f} s |")
    if "tts" in res:
        t = res["tts"]
        lines += [f"| TTS {t['voice']} first audio per sentence (median / p90) | "
                  f"{t['first_audio_s_median'] * 1e3:.0f} / {t['first_audio_s_p90'] * 1e3:.0f} ms |",
                  f"| TTS real-time factor (median) | {t['rtf_median']:.3f} |",
                  f"| SpeechOutput first {t['out_rate_hz'] // 1000} kHz frame from first LLM text | "
                  f"{t['speech_output_first_frame_s_median'] * 1e3:.0f} ms |"]
    print("\n".join(lines))
    e = res["env"]
    print(f"(commit {e['commit']}, {e['cores']} cores, load average {e['loadavg_1m_at_end']:.1f} at the end)")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--asr-model", default=None, help="CTranslate2 Whisper dir or name (default: embedded tiny.en)")
    p.add_argument("--voice", default=None, help="Piper .onnx voice (default: embedded joe)")
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--sessions", type=int, default=8, help="concurrent finals")
    p.add_argument("--out", default=None, help="directory for audio_bench.json")
    return p


def _finish(res: dict, out: str | None, name: str) -> int:
    res["env"] = _env()
    _print_table(res)
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(res, indent=2))
        print(f"wrote {d / f'{name}.json'}")
    return 0


def asr_main(argv: list[str] | None = None) -> int:
    a = _parser("voicefast bench asr").parse_args(argv)
    return _finish({"asr": bench_asr(a.asr_model, a.cpu_threads, a.sessions)}, a.out, "audio_asr")


def tts_main(argv: list[str] | None = None) -> int:
    a = _parser("voicefast bench tts").parse_args(argv)
    return _finish({"tts": bench_tts(a.voice)}, a.out, "audio_tts")


def main(argv: list[str] | None = None) -> int:
    a = _parser("python -m bench.audio").parse_args(argv)
    res = {"vad": bench_vad(), "vad_accuracy": bench_vad_accuracy(),
           "asr": bench_asr(a.asr_model, a.cpu_threads, a.sessions), "tts": bench_tts(a.voice)}
    return _finish(res, a.out, "audio_bench")


if __name__ == "__main__":
    sys.exit(main())
