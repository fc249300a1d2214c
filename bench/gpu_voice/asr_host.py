"""Where the ASR runs on this host, decided by measurement: Whisper tiny.en (the embedded model) under the load of N
real-time callers, for several worker pools on the CPU cores and, where CTranslate2 can use CUDA (a GPU and CUDA 12
cuBLAS, e.g. staged with scripts/gpu_stage.sh --cublas12), on the GPU.

Each simulated caller speaks Piper-made questions at real-time pace in 20 ms chunks into the real
StreamingTranscriber (partials every 800 ms of new audio, never two at once, finals outranking partials on the
shared WhisperASR pool), then listens for the rest of its turn cycle; its final decode starts at the end of its
speech. Per configuration: the final's latency p50/p95/p99 under load (the voice-to-voice chain's `asr_final_ms`),
the idle latency, partial decodes done, and the CPU cores the process used. The configuration with the lowest final
p95 is the recommendation; `voicefast serve`'s host default (voicefast/host.py) is marked.

    python3 -m bench.gpu_voice.asr_host --out $OUT/asr_host.json [--callers 64] [--seconds 15]
           [--configs cpu:4x2,cpu:8x1,cpu:2x4,cuda:2x1]"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 320  # 20 ms at 16 kHz


def parse_configs(spec: str) -> list[tuple[str, int, int]]:
    """'cpu:4x2,cuda:2x1' -> [('cpu', 4 workers, 2 threads), ('cuda', 2, 1)]."""
    out = []
    for item in spec.split(","):
        dev, _, wt = item.strip().partition(":")
        w, _, t = wt.partition("x")
        if dev not in ("cpu", "cuda") or not w.isdigit() or not t.isdigit() or int(w) < 1 or int(t) < 1:
            raise ValueError(f"--configs item {item!r} is not cpu|cuda:<workers>x<threads>")
        out.append((dev, int(w), int(t)))
    return out


def utterances() -> list[np.ndarray]:
    """The bench voice prompts spoken by the embedded Piper voice, 16 kHz float32."""
    from audio.resample import resample
    from audio.tts import PiperTTS
    from bench.voice.prompts import PROMPTS

    tts = PiperTTS()
    return [resample(np.concatenate(list(tts.synthesize(t))), tts.sample_rate_hz, 16_000) for t in PROMPTS]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


async def _caller(asr, utts: list[np.ndarray], rng: random.Random, t_end: float, cycle_s: float,
                  finals: list[float], partials: list[int], owner: str = "caller") -> None:
    from audio.transcriber import StreamingTranscriber

    await asyncio.sleep(rng.uniform(0, min(cycle_s, max(0.0, t_end - time.monotonic() - 3))))  # spread starts
    while time.monotonic() < t_end:
        x = utts[rng.randrange(len(utts))]
        t_turn = time.monotonic()
        tr = StreamingTranscriber(asr, partial_interval_ms=800, submit_kw={"owner": owner})  # a session's lane
        pending: set[asyncio.Task] = set()
        t_next = time.monotonic()
        for i in range(0, len(x), CHUNK):
            tr.feed(x[i:i + CHUNK])
            if tr.partial_due():
                task = asyncio.ensure_future(tr.partial())
                pending.add(task)
                task.add_done_callback(pending.discard)
            t_next += CHUNK / 16_000
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))
        t0 = time.monotonic()
        await tr.final()
        finals.append((time.monotonic() - t0) * 1000)
        partials.append(tr.partial_decodes)
        for task in list(pending):
            task.cancel()
        tr.close()
        t_next_turn = t_turn + cycle_s
        if t_next_turn >= t_end:
            return
        await asyncio.sleep(max(0.0, t_next_turn - time.monotonic()))


def measure(device: str, workers: int, threads: int, utts: list[np.ndarray], callers: int, seconds: float,
            cycle_s: float, seed: int = 0) -> dict:
    from audio.asr import WhisperASR

    t_load = time.perf_counter()
    asr = WhisperASR(None, device=device, cpu_threads=threads, workers=workers)
    load_s = time.perf_counter() - t_load
    try:
        for _ in range(2):
            asr.transcribe(utts[0])
        idle = []
        for x in utts[:8]:
            t0 = time.perf_counter()
            asr.transcribe(x)
            idle.append((time.perf_counter() - t0) * 1000)
        finals: list[float] = []
        partials: list[int] = []
        rng = random.Random(seed)
        cpu0, t0 = _cpu_s(), time.monotonic()

        async def load():
            t_end = time.monotonic() + seconds
            await asyncio.gather(*(_caller(asr, utts, random.Random(rng.random()), t_end, cycle_s, finals, partials,
                                           owner=f"caller{i}") for i in range(callers)))

        asyncio.run(load())
        wall = time.monotonic() - t0
        cores = (_cpu_s() - cpu0) / wall
    finally:
        asr.close()
    return {"device": asr.device, "compute_type": asr.compute_type, "workers": workers, "threads": threads,
            "load_s": round(load_s, 2), "idle_final_ms_p50": _pct(idle, 50), "callers": callers,
            "seconds": round(wall, 1), "finals": len(finals), "final_ms_p50": _pct(finals, 50),
            "final_ms_p95": _pct(finals, 95), "final_ms_p99": _pct(finals, 99),
            "partials_per_turn": round(sum(partials) / len(partials), 2) if partials else None,
            "cpu_cores_used": round(cores, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_voice.asr_host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file")
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0, help="load per configuration")
    ap.add_argument("--cycle-s", type=float, default=9.0, help="a caller's turn cycle: speak, then listen")
    ap.add_argument("--configs", help="cpu|cuda:<workers>x<threads>,... (default: the host default, 3 CPU "
                    "alternatives, and CUDA where usable)")
    a = ap.parse_args(argv)
    from voicefast.host import detect_host, host_defaults, placement

    facts = detect_host()
    cores, cuda_ok, cuda_note = facts.cpu_cores, facts.asr_cuda, facts.asr_cuda_note
    d = host_defaults(cores, placement(facts)[0], "cpu")
    default = ("cpu", d["asr_workers"], d["asr_cpu_threads"])
    if a.configs:
        configs = parse_configs(a.configs)
    else:
        alt = [("cpu", max(1, cores // 2), 1), ("cpu", max(1, cores // 8), 4), ("cpu", max(1, cores * 3 // 8), 2)]
        configs = list(dict.fromkeys([default, *alt] + ([("cuda", 2, 1), ("cuda", 1, 1)] if cuda_ok else [])))
    utts = utterances()
    rows = []
    for dev, w, t in configs:
        if dev == "cuda" and not cuda_ok:
            rows.append({"device": "cuda", "workers": w, "threads": t, "skipped": cuda_note})
            continue
        r = measure(dev, w, t, utts, a.callers, a.seconds, a.cycle_s) | {"host_default": (dev, w, t) == default}
        rows.append(r)
        print(f"[asr_host] {dev} {w}x{t}: final p50/p95/p99 {r['final_ms_p50']}/{r['final_ms_p95']}/"
              f"{r['final_ms_p99']} ms under {a.callers} callers (idle {r['idle_final_ms_p50']} ms), "
              f"{r['finals']} finals, {r['partials_per_turn']} partials/turn, {r['cpu_cores_used']} cores", flush=True)
    done = [r for r in rows if "final_ms_p95" in r and r["final_ms_p95"] is not None]
    best = min(done, key=lambda r: r["final_ms_p95"]) if done else None
    doc = {"what": "Whisper tiny.en final latency under N real-time callers per ASR placement (bench/gpu_voice/"
                   "asr_host.py)", "cpu_cores": cores, "ctranslate2_cuda": cuda_ok, "ctranslate2_cuda_note": cuda_note,
           "callers": a.callers, "cycle_s": a.cycle_s, "results": rows,
           "recommended": None if best is None else {k: best[k] for k in ("device", "workers", "threads",
                                                                        "final_ms_p95")}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    if best:
        print(f"[asr_host] lowest final p95: {best['device']} {best['workers']}x{best['threads']} "
              f"({best['final_ms_p95']} ms); host default {default[0]} {default[1]}x{default[2]}", flush=True)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
