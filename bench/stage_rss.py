"""`python -m bench.stage_rss asr|tts|llm`: one model stage alone, called many times with the input shapes the
server produces (utterances of random length, phrases of random length, growing conversations), printing the
process RSS every --every calls. A stage whose RSS keeps rising with new input shapes holds shape-keyed native
caches (or leaks); one that plateaus is warming up. Used to find where the server's RSS went (docs/benchmarks.md).

    python -m bench.stage_rss asr --n 300 --window-step 1     # Whisper, one encoder window per 10 ms (the old way)
    python -m bench.stage_rss asr --n 300                     # Whisper, windows in 2.5 s steps (now)
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python -m bench.stage_rss asr --n 150 --window-step 1
    python -m bench.stage_rss tts --n 300 [--long] [--arena]  # Piper; --long: 20-60-word phrases;
                                                              # --arena: onnxruntime's CPU arena on (the old way)
    python -m bench.stage_rss llm --n 200                     # the LLM engine, conversations of 8 turns"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import numpy as np

from bench.voice.prompts import PROMPTS


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def report(i: int, every: int, what: str, t0: float) -> None:
    if i % every == every - 1:
        print(f"{i + 1} {what} rss {rss_mib():.1f} MiB ({time.time() - t0:.0f} s)", flush=True)


def asr(args) -> None:
    from audio.asr import AsrOptions, WhisperASR
    from bench.voice.utterances import resample, synthesize

    speech = np.concatenate([resample(np.frombuffer(u.pcm, "<i2").astype(np.float32) / 32768, 24_000, 16_000)
                             for u in synthesize(PROMPTS)])
    model = WhisperASR(cpu_threads=1, options=AsrOptions(window_step_frames=args.window_step))
    rng, t0 = random.Random(0), time.time()
    print(f"asr window_step_frames={args.window_step}: start rss {rss_mib():.1f} MiB", flush=True)
    for i in range(args.n):
        n = rng.randint(8000, min(len(speech) - 1, 16_000 * 12))
        a = rng.randint(0, len(speech) - n)
        model.transcribe(speech[a:a + n])
        report(i, args.every, "decodes", t0)


def tts(args) -> None:
    from audio.tts import PiperTTS

    voice = PiperTTS()
    if args.arena:
        import onnxruntime as ort
        from piper import PiperVoice

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.enable_cpu_mem_arena = 1, 1, True
        voice.voice = PiperVoice(session=ort.InferenceSession(str(voice.path), sess_options=o,
                                                              providers=["CPUExecutionProvider"]),
                                 config=voice.voice.config)
    words = " ".join(PROMPTS * 4).replace(".", ",").replace("?", ",").split()  # one sentence per phrase
    lo, hi = (20, 60) if args.long else (1, 14)
    rng, t0 = random.Random(0), time.time()
    print(f"tts arena={'on' if args.arena else 'off'} words {lo}-{hi}: start rss {rss_mib():.1f} MiB", flush=True)
    for i in range(args.n):
        k = rng.randint(lo, hi)
        a = rng.randint(0, len(words) - k)
        for _ in voice.synthesize(" ".join(words[a:a + k]) + "."):
            pass
        report(i, args.every, "phrases", t0)


def llm(args) -> None:
    from llm_engine import AsyncLLMEngine, EngineConfig, SamplingParams

    eng = AsyncLLMEngine(EngineConfig(device="cpu", max_num_seqs=4, max_waiting=8, cpu_threads=1))
    rng = random.Random(0)

    async def run() -> None:
        t0, conv = time.time(), []
        print(f"llm: start rss {rss_mib():.1f} MiB", flush=True)
        for i in range(args.n):
            if i % 8 == 0:
                conv = [{"role": "system", "content": "You are a helpful shop assistant. Be brief."}]
            conv.append({"role": "user", "content": rng.choice(PROMPTS)})
            text = ""
            async for o in eng.generate(SamplingParams(temperature=0.7, max_tokens=rng.randint(8, 48)),
                                        messages=conv):
                text += o.text
            conv.append({"role": "assistant", "content": text})
            report(i, args.every, "requests", t0)

    try:
        asyncio.run(run())
    finally:
        eng.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stage_rss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("asr", "tts", "llm"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--window-step", type=int, default=250, help="asr: AsrOptions.window_step_frames")
    ap.add_argument("--arena", action="store_true", help="tts: onnxruntime's CPU memory arena on (the old way)")
    ap.add_argument("--long", action="store_true", help="tts: phrases of 20-60 words")
    args = ap.parse_args(argv)
    {"asr": asr, "tts": tts, "llm": llm}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
