"""How much the real ASR's word error rate moves when Piper speaks the same text again.

Piper samples noise inside its model, so every synthesis of a sentence is a little different; the test suite
therefore synthesizes its fixtures with a seed fixed per text (tests/speech.py), and its real-ASR assertions take
their bounds from this measurement: each sentence the tests transcribe, spoken with N seeds, through the path the
server uses (24 kHz fixture -> streaming resampler -> 16 kHz -> Whisper with the shortened final window).

    python -m bench.asr_variation --seeds 20 [--out bench/results/cpu/asr_variation.json]

Prints, per sentence, the WER of the test's own seed and the distribution over the other seeds (mean, p95, max,
the hypotheses that were wrong), and the corpus WER of CUSTOMER_SENTENCES per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The fixtures' own generator, so this measures exactly what the tests hear.
sys.path.insert(0, str(ROOT / "tests"))

# Sentences the real-ASR tests transcribe one at a time (server, demo, streaming tests).
SINGLE = [
    "What time do you open on Saturday?",
    "Where is your nearest shop located?",
    "I need to change the delivery address for my package, and I would like to cancel my subscription.",
]


_vad_model = None


def speak(text: str, seed: int) -> np.ndarray:
    """`text` as the server's speculative final hears a 24 kHz fixture (200 ms lead, 900 ms trail): Piper (seeded)
    -> 24 kHz PCM16 -> streaming resampler -> 16 kHz in 40 ms frames -> Silero VAD; the utterance from the padded
    speech start to the frame where the last early silence is detected (the speculative final the server keeps)."""
    from speech import resample_whole, synthesize_piper

    from audio.resample import StreamResampler
    from audio.vad import SileroVadModel, VadParams, VadStream

    global _vad_model
    _vad_model = _vad_model or SileroVadModel()
    x, rate = synthesize_piper(text, seed=seed)
    x24 = np.concatenate([np.zeros(4800, np.float32), np.clip(resample_whole(x, rate, 24_000), -1, 1),
                          np.zeros(21_600, np.float32)])
    x24 = np.round(x24 * 32767) / 32767  # the fixture is PCM16
    r, params = StreamResampler(24_000, 16_000), VadParams()
    vad = VadStream(_vad_model, params)
    chunks: list[np.ndarray] = []
    start = spec = None
    for i in range(0, len(x24), 960):  # 40 ms client messages, as the tests send them
        y = r.process(x24[i:i + 960])
        chunks.append(y)
        for ev in vad.process(y):
            if ev.kind == "speech_started" and start is None:
                start = max(0, ev.sample - params.prefix_padding_samples)
            elif ev.kind == "early_silence" and start is not None:  # the speculative final's audio
                spec = np.concatenate(chunks)[start:]
            elif ev.kind == "speech_stopped" and spec is not None:  # ... is the final's when speech stays stopped
                return spec
    raise RuntimeError(f"the VAD heard no end of speech in {text!r} (seed {seed})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="syntheses per sentence besides the test's own seed")
    ap.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = ap.parse_args(argv)

    from speech import CUSTOMER_SENTENCES, text_seed

    from audio.asr import WhisperASR
    from audio.wer import word_error_rate

    asr = WhisperASR(cpu_threads=2)
    seeds = list(range(1, args.seeds + 1))
    report: dict = {"seeds": seeds, "single": {}, "corpus": {}}
    try:
        for text in SINGLE:
            own = asr.transcribe(speak(text, text_seed(text)))
            hyps = [asr.transcribe(speak(text, s)) for s in seeds]
            wers = np.array([word_error_rate(text, h) for h in hyps])
            report["single"][text] = {"own_seed_hyp": own, "own_seed_wer": word_error_rate(text, own),
                                      "wer_mean": float(wers.mean()), "wer_p95": float(np.percentile(wers, 95)),
                                      "wer_max": float(wers.max()),
                                      "wrong": sorted({h for h, w in zip(hyps, wers, strict=True) if w > 0})}
            r = report["single"][text]
            print(f"{text!r}: own seed {r['own_seed_wer']:.3f}; over {len(seeds)} seeds mean {r['wer_mean']:.3f} "
                  f"p95 {r['wer_p95']:.3f} max {r['wer_max']:.3f}; wrong: {r['wrong']}", flush=True)
        corpus = []
        for s in [None, *seeds[: max(5, len(seeds) // 2)]]:
            hyps = [asr.transcribe(speak(t, text_seed(t) if s is None else s)) for t in CUSTOMER_SENTENCES]
            corpus.append(word_error_rate(CUSTOMER_SENTENCES, hyps))
            print(f"corpus WER, seed {'own' if s is None else s}: {corpus[-1]:.3f}", flush=True)
        report["corpus"] = {"own_seed": corpus[0], "other_seeds": corpus[1:], "max": max(corpus)}
    finally:
        asr.close()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
