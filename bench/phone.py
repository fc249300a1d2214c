"""`voicefast bench phone`: what the telephone band costs, measured in one run on the same audio.

1. ASR word error rate: wideband 16 kHz against the phone band a Twilio call delivers (16 kHz -> anti-aliased
   8 kHz -> G.711 mu-law -> 8 kHz -> 16 kHz through the server's streaming resampler, in 20 ms frames), and, for
   comparison, naive decimation (every other sample, no anti-alias filter).
2. VAD: an utterance after a long silence (the caller listening to the assistant): how late Silero hears its
   start, and how often it splits it into two turns, wideband vs phone band, at the Realtime default threshold
   (0.5) and at the phone calls' threshold, with and without the VAD's model-state reset after a long quiet.
3. The TTS path out: 22.05 kHz Piper audio to 8 kHz through the same resampler; gain of tones in the passband
   and above 4 kHz (the stopband, where anything left aliases into the call), against naive sample picking.

Utterances: customer-service sentences spoken by the embedded Piper voice, seeded per sentence so every run hears
the same audio (or --wav-dir foo.wav + foo.txt).
Writes phone.json and phone.md into --out."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

RATE_HZ = 16_000
PHONE_HZ = 8000
FRAME = 160  # 20 ms at 8 kHz: a Twilio media frame


def phone_band(x16: np.ndarray, *, anti_alias: bool = True) -> np.ndarray:
    """16 kHz audio as it reaches the ASR after a phone call's round trip (or after naive decimation)."""
    from audio.codecs import ulaw_decode, ulaw_encode
    from audio.resample import StreamResampler, resample

    x8 = resample(x16, RATE_HZ, PHONE_HZ) if anti_alias else x16[::2].copy()
    y8 = ulaw_decode(ulaw_encode(x8))
    up = StreamResampler(PHONE_HZ, RATE_HZ)  # the session's resampler, fed 20 ms frames like a call
    return np.concatenate([up.process(y8[i:i + FRAME]) for i in range(0, len(y8), FRAME)] + [up.flush()])


def load_utterances(args) -> list[tuple[str, np.ndarray]]:
    from audio.resample import resample

    if args.wav_dir:
        from bench.voice.utterances import RATE_HZ as U_RATE
        from bench.voice.utterances import load_wav_dir

        out = []
        for u in load_wav_dir(args.wav_dir):
            x = np.frombuffer(u.pcm, "<i2").astype(np.float32) / 32768.0
            out.append((u.text, resample(x, U_RATE, RATE_HZ)))
        return out
    from bench.audio import CUSTOMER

    return [(t, resample(*piper_seeded(t), RATE_HZ)) for t in CUSTOMER]


def piper_seeded(text: str) -> tuple[np.ndarray, int]:
    """`text` spoken by the embedded Piper voice, the same samples on every run: Piper draws noise inside its ONNX
    graph, so onnxruntime's generator is seeded per text before a fresh voice session is made."""
    import hashlib

    import onnxruntime
    from piper import PiperVoice

    from voicefast.assets import resolve_tts

    onnxruntime.set_seed(int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little"))
    voice = PiperVoice.load(str(resolve_tts().path))
    chunks = list(voice.synthesize(text))
    return np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32), chunks[0].sample_rate


def bench_wer(utts: list[tuple[str, np.ndarray]], asr_model: str | None, cpu_threads: int) -> dict:
    from audio.asr import WhisperASR
    from audio.wer import word_error_rate

    asr = WhisperASR(asr_model, cpu_threads=cpu_threads)
    rows = []
    try:
        for text, x in utts:
            row = {"text": text}
            for band, sig in (("wideband", x), ("phone", phone_band(x)), ("naive", phone_band(x, anti_alias=False))):
                hyp = asr.transcribe(sig)
                row[band] = {"transcript": hyp, "wer": round(word_error_rate(text, hyp), 4)}
            rows.append(row)
    finally:
        asr.close()
    refs = [r["text"] for r in rows]
    corpus = {band: round(word_error_rate(refs, [r[band]["transcript"] for r in rows]), 4)
              for band in ("wideband", "phone", "naive")}
    return {"asr": asr.name, "utterances": rows, "corpus_wer": corpus}


def _onset(x: np.ndarray) -> int:
    """First sample of the first 10 ms window within 20 dB of the loudest one (the true onset of speech)."""
    win = RATE_HZ // 100
    rms = np.sqrt((x[: len(x) // win * win].reshape(-1, win) ** 2).mean(axis=1))
    return int(np.nonzero(rms >= 0.1 * rms.max())[0][0]) * win


def bench_vad_after_silence(utts: list[tuple[str, np.ndarray]], gap_s: float, trials: int,
                            thresholds: list[float]) -> dict:
    """Trial i: utterance A, `gap_s` of silence (+ (i // n) * 140 ms: every utterance meets several frame
    alignments), utterance B = utterance i mod n. Silero hears the start of speech later after a long silence;
    `late_ms` is how far B's speech_started lags its true onset (the session keeps prefix padding before it for
    the ASR), and a split is B ending more than once (one utterance taken as two turns)."""
    from audio.vad import SileroVadModel, VadParams, VadStream

    model = SileroVadModel()
    reset_ms = VadParams().reset_after_quiet_ms
    out = {}
    for band in ("wideband", "phone"):
        sigs = [x if band == "wideband" else phone_band(x) for _, x in utts]
        for thr, reset in [(t, r) for t in thresholds for r in (0, reset_ms)]:
            splits, late = 0, []
            for i in range(trials):
                a, b = sigs[(i + 1) % len(sigs)], sigs[i % len(sigs)]
                gap = np.zeros(int(RATE_HZ * gap_s) + 2240 * (i // len(sigs)), np.float32)
                x = np.concatenate([np.zeros(RATE_HZ, np.float32), a, gap, b, np.zeros(RATE_HZ, np.float32)])
                b_start = RATE_HZ + len(a) + len(gap)
                st = VadStream(model, VadParams(threshold=thr, reset_after_quiet_ms=reset))
                stops, started = 0, None
                for j in range(0, len(x), 320):  # 20 ms chunks, as a session feeds the VAD
                    for e in st.process(x[j:j + 320]):
                        stops += e.kind == "speech_stopped"
                        if e.kind == "speech_started" and e.sample >= b_start - RATE_HZ // 10 and started is None:
                            started = e.sample
                splits += stops != 2
                if started is not None:
                    late.append((started - b_start - _onset(b)) * 1000 / RATE_HZ)
            label = f"{band} @ {thr:g}, state reset " + (f"after {reset / 1000:g} s" if reset else "off")
            out[label] = {"trials": trials, "split": splits, "missed": trials - len(late),
                                        "late_ms_p50": round(float(np.median(late)), 1) if late else None,
                                        "late_ms_max": round(float(np.max(late)), 1) if late else None}
    return {"gap_s": gap_s, "results": out}


def bench_downsampling(freqs_hz=(1000, 3000, 3400, 4200, 5000, 6000, 8000, 10_000)) -> dict:
    """Gain (dB) of a 1 s tone through 22.05 kHz -> 8 kHz: the streaming resampler vs nearest-sample picking."""
    from audio.resample import StreamResampler

    tts_hz = 22_050
    rows = []
    for f in freqs_hz:
        t = np.arange(tts_hz) / tts_hz
        x = (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)
        r = StreamResampler(tts_hz, PHONE_HZ)
        y = np.concatenate([r.process(x[i:i + 2205]) for i in range(0, len(x), 2205)] + [r.flush()])
        naive = x[np.minimum(np.round(np.arange(PHONE_HZ) * tts_hz / PHONE_HZ).astype(int), len(x) - 1)]

        def db(z: np.ndarray) -> float:
            mid = z[len(z) // 4: 3 * len(z) // 4]  # away from the edges
            return round(20 * np.log10(max(float(np.sqrt(np.mean(mid ** 2))), 1e-9) / (0.5 / np.sqrt(2))), 1)

        rows.append({"freq_hz": f, "resampler_db": db(y), "naive_db": db(naive)})
    return {"from_hz": tts_hz, "to_hz": PHONE_HZ, "tones": rows}


def summary_markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# voicefast bench phone", "", f"- command: `{m['command']}`", f"- commit: {m['commit']}",
             f"- machine: {m['machine']}", f"- ASR: {res['wer']['asr']}", "",
             "## ASR word error rate: wideband vs phone band (same utterances, same run)", "",
             "| band | corpus WER |", "|---|---|"]
    labels = {"wideband": "wideband 16 kHz", "phone": "phone: 8 kHz mu-law (anti-aliased)",
              "naive": "8 kHz mu-law, naive decimation"}
    lines += [f"| {labels[b]} | {w:.3f} |" for b, w in res["wer"]["corpus_wer"].items()]
    lines += ["", "| utterance | wideband | phone | naive |", "|---|---|---|---|"]
    for r in res["wer"]["utterances"]:
        w = [f"{r[b]['wer']:.2f}" for b in ("wideband", "phone", "naive")]
        lines.append(f"| {r['text']} | " + " | ".join(w) + " |")
    v = res["vad"]
    lines += ["", f"## VAD: an utterance after {v['gap_s']:g} s of silence", "",
              "| band @ threshold, Silero state reset | onset heard late by (ms) p50 / max | split in two turns "
              "| missed |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {r['late_ms_p50']} / {r['late_ms_max']} | {r['split']} / {r['trials']} | {r['missed']} |"
              for k, r in v["results"].items()]
    d = res["downsampling"]
    lines += ["", f"## TTS out: {d['from_hz']} Hz -> {d['to_hz']} Hz, tone gain (dB; above 4 kHz it aliases)", "",
              "| tone (Hz) | streaming resampler | nearest-sample picking |", "|---|---|---|"]
    lines += [f"| {r['freq_hz']} | {r['resampler_db']} | {r['naive_db']} |" for r in d["tones"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from voicefast.config import ServerConfig

    ap = argparse.ArgumentParser(prog="voicefast bench phone", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/phone")
    ap.add_argument("--wav-dir", help="folder of foo.wav + foo.txt utterances instead of Piper sentences")
    ap.add_argument("--asr-model", default=None, help="Whisper model (default: embedded tiny.en)")
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--vad-gap-s", type=float, default=40.0, help="silence before the second utterance")
    ap.add_argument("--vad-trials", type=int, default=30, help="per configuration (2 per utterance)")
    ap.add_argument("--vad-thresholds", default=f"0.5,{ServerConfig().twilio_vad_threshold:g}")
    return ap


def main(argv: list[str] | None = None) -> int:
    from bench.voice.runner import _git_commit, _machine

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        thresholds = [float(t) for t in args.vad_thresholds.split(",")]
        utts = load_utterances(args)
    except (ValueError, OSError) as e:
        print(f"voicefast bench phone: {e}", file=sys.stderr)
        return 2
    res = {"meta": {"command": shlex.join(["voicefast", "bench", "phone", *argv]), "commit": _git_commit(),
                    "machine": _machine()}}
    res["wer"] = bench_wer(utts, args.asr_model, args.cpu_threads)
    res["vad"] = bench_vad_after_silence(utts, args.vad_gap_s, args.vad_trials, thresholds)
    res["downsampling"] = bench_downsampling()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "phone.json").write_text(json.dumps(res, indent=1))
    md = summary_markdown(res)
    (out / "phone.md").write_text(md)
    print(md)
    print(f"wrote {out / 'phone.json'}, {out / 'phone.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
