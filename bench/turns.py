"""`voicefast bench turns`: the end-of-turn decision alone, offline, on real models (no server, no LLM, no TTS).

Every utterance (the paused set: a 600-900 ms thinking pause inside an unfinished phrase; and complete questions,
each at several speaking rates) is streamed through Silero VAD in 20 ms chunks; at every check the real Smart
Turn model and the real Whisper ASR judge the audio so far, and voicefast.turns decides, for each eagerness and
each witness rule (audio model alone, transcript alone, both). Because the decision depends only on the audio,
this measures exactly what the server would decide:

  cut rate        paused utterances whose turn ended before the true end of speech (a premature reply)
  first check     complete questions whose turn ended at the first check after the true end of speech (not at a
                  later one or the maximum silence; checks at pauses inside the question do not count)
  decided after   ms of silence after the end of speech when the turn ended (input audio clock), p50 / p90
  model ms        the end-of-turn model's wall time per check (features + ONNX, one thread), p50 / p90

server_vad (silence_duration_ms 500) is the baseline row. Writes turns_bench.json and prints a table."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.voice.prompts import PAUSED, PROMPTS, SPEAKING_RATES, pause_ms
from bench.voice.utterances import RATE_HZ as WIRE_HZ
from bench.voice.utterances import Utterance, paused, synthesize

CHUNK_MS = 20
TRAIL_MS = 3000  # silence after the utterance: longer than any eagerness' maximum wait
PAD_MS = 300  # prefix padding, as the server keeps it


@dataclass
class Outcome:
    cut: bool  # the turn ended before the true end of speech
    first_check: bool  # ended "complete" at the first check taken after the true end of speech
    decided_after_ms: float | None  # silence after the true end when the turn ended
    checks: int = 0
    checks_after_end: int = 0  # checks taken after the true end of speech (the others were at pauses inside it)
    why: list[str] = field(default_factory=list)


def load_utterances(rates: tuple[float, ...]) -> tuple[list[Utterance], list[Utterance]]:
    """(paused set, complete questions): the paused set cycles through the rates, every question is at every rate."""
    paused_set = [paused(a, b, pause_ms(i), speaking_rate=rates[i % len(rates)]) for i, (a, b) in enumerate(PAUSED)]
    complete = [u for r in rates for u in synthesize(PROMPTS, speaking_rate=r)]
    return paused_set, complete


def to16k(u: Utterance) -> tuple[np.ndarray, int]:
    """(16 kHz float32 audio with TRAIL_MS of silence after it, the true end of speech as a 16 kHz sample)."""
    from audio.resample import resample

    x = np.frombuffer(u.pcm, "<i2").astype(np.float32) / 32768.0
    y = resample(x, WIRE_HZ, 16_000)
    return np.concatenate([y, np.zeros(16 * TRAIL_MS, np.float32)]), u.speech_end_sample * 16_000 // WIRE_HZ


class Judge:
    """The real witnesses, cached per (utterance, audio end): several policies replay the same checks."""

    def __init__(self, asr_threads: int = 1):
        from audio.asr import WhisperASR
        from audio.turn_model import SmartTurnModel
        from voicefast.assets import resolve_turn

        self.model = SmartTurnModel(resolve_turn().path)
        self.asr = WhisperASR(cpu_threads=asr_threads)
        self._probability: dict[tuple[int, int], tuple[float, float]] = {}  # -> (p, model ms)
        self._text: dict[tuple[int, int], tuple[str, float | None, float]] = {}  # -> (text, last word p, asr ms)

    def probability(self, key: int, audio: np.ndarray) -> float:
        ck = (key, len(audio))
        if ck not in self._probability:
            t0 = time.perf_counter()
            p = self.model.predict(audio)
            self._probability[ck] = (p, (time.perf_counter() - t0) * 1e3)
        return self._probability[ck][0]

    def transcript(self, key: int, audio: np.ndarray) -> tuple[str, float | None]:
        ck = (key, len(audio))
        if ck not in self._text:
            t0 = time.perf_counter()
            text = self.asr.transcribe(audio)
            self._text[ck] = (str(text), getattr(text, "last_word_probability", None),
                              (time.perf_counter() - t0) * 1e3)
        return self._text[ck][:2]

    def model_ms(self) -> list[float]:
        return [v[1] for v in self._probability.values()]

    def asr_ms(self) -> list[float]:
        return [v[2] for v in self._text.values()]

    def close(self) -> None:
        self.model.close()
        self.asr.close()


def vad_events(x16: np.ndarray, early_ms: int, end_silence_ms: int) -> list[tuple[str, int, int]]:
    """(kind, sample, now) of Silero VAD over x16 streamed in 20 ms chunks; after each chunk's events an
    ("audio", now, now) entry: the turn module's audio clock (on_audio)."""
    from audio.vad import SileroVadModel, VadParams, VadStream

    vad = VadStream(_vad_model(SileroVadModel), VadParams(silence_duration_ms=end_silence_ms,
                                                          early_silence_ms=early_ms))
    out, step = [], 16 * CHUNK_MS
    for i in range(0, len(x16), step):
        now = min(len(x16), i + step)
        out += [(e.kind, e.sample, now) for e in vad.process(x16[i:now])]
        out.append(("audio", now, now))
    return out


_VAD = None


def _vad_model(cls):
    global _VAD
    if _VAD is None:
        _VAD = cls()
    return _VAD


def replay(policy, events, x16: np.ndarray, true_end: int, judge: Judge | None, key: int) -> Outcome:
    """The turn module on one utterance's VAD events, checks answered by the real witnesses at once."""
    from voicefast.turns import AskModel, EndTurn, StartCheck, TurnTaker

    t = TurnTaker(policy)
    out = Outcome(cut=False, first_check=False, decided_after_ms=None)

    def audio(start: int, end: int) -> np.ndarray:
        return x16[max(0, start - 16 * PAD_MS):end]

    for kind, sample, now in events:
        pending = list(t.on_audio(now) if kind == "audio" else t.on_vad(kind, sample, now))
        while pending:
            a = pending.pop(0)
            if isinstance(a, StartCheck) and a.purpose == "end_of_turn":
                clip = audio(a.start_sample, a.end_sample)
                pending += t.on_verdict(a.check_id, judge.probability(key, clip)) if a.use_model else []
                pending += t.on_transcript(a.check_id, *judge.transcript(key, clip))
                out.checks += 1
                out.checks_after_end += a.end_sample >= true_end
                if t.utt is not None and t.utt.check is not None and t.utt.check.why:
                    out.why.append(t.utt.check.why)
            elif isinstance(a, AskModel):
                pending += t.on_verdict(a.check_id, judge.probability(key, audio(a.start_sample, a.end_sample)))
                if t.utt is not None and t.utt.check is not None and t.utt.check.why:
                    out.why.append(t.utt.check.why)
            elif isinstance(a, EndTurn):
                decided_at = a.end_sample + 16 * a.silence_ms
                out.cut = decided_at < true_end
                out.first_check = a.reason == "complete" and out.checks_after_end == 1
                out.decided_after_ms = (decided_at - true_end) / 16
                return out
    return out


def policies(witnesses: list[str], eagerness: list[str], custom: list[str] = ()):
    """server_vad 500, each eagerness x witness, and custom
    "check_ms:max_silence_ms:threshold[:witness[:transcript_ms]]" ones (transcript_ms: the check's transcript taken
    at that silence, before the model at check_ms)."""
    from voicefast.turns import TurnPolicy

    rows = [("server_vad 500", TurnPolicy.for_mode("server_vad", silence_duration_ms=500))] if eagerness else []
    for e in eagerness:
        for w in witnesses:
            rows.append((f"semantic {e} / {w}", TurnPolicy.for_mode("semantic_vad", eagerness=e, witness=w)))
    for spec in custom:
        check, max_silence, threshold, *rest = spec.split(":")
        rows.append((f"semantic {spec}", TurnPolicy(semantic=True, check_ms=int(check),
                                                    end_silence_ms=int(max_silence), threshold=float(threshold),
                                                    witness=rest[0] if rest else "both",
                                                    transcript_ms=int(rest[1]) if len(rest) > 1 else None)))
    return rows


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def run(rates: tuple[float, ...], witnesses: list[str], eagerness: list[str], log=print,
        custom: list[str] = ()) -> dict:
    paused_set, complete = load_utterances(rates)
    judge = Judge()
    rows = []
    try:
        audio = [to16k(u) for u in paused_set + complete]
        for name, policy in policies(witnesses, eagerness, custom):
            events = {}
            res: dict[str, list[Outcome]] = {"paused": [], "complete": []}
            for k, (u, (x16, end)) in enumerate(zip(paused_set + complete, audio, strict=True)):
                win = (policy.early_ms, policy.end_silence_ms)
                events = vad_events(x16, *win)
                o = replay(policy, events, x16, end, judge if policy.semantic else None, k)
                res["paused" if u.pause_ms else "complete"].append(o)
            p, c = res["paused"], res["complete"]
            after = [o.decided_after_ms for o in c if o.decided_after_ms is not None]
            row = {"policy": name, "paused_n": len(p), "cuts": sum(o.cut for o in p),
                   "cut_rate": sum(o.cut for o in p) / len(p), "complete_n": len(c),
                   "first_check": sum(o.first_check for o in c) / len(c),
                   "decided_after_ms_p50": _pct(after, 50), "decided_after_ms_p90": _pct(after, 90),
                   "checks_per_turn": statistics.mean(o.checks for o in p + c),
                   "cut_utterances": [u.text for u, o in zip(paused_set, p, strict=True) if o.cut],
                   "late_questions": [u.text + f" ({u.source})" for u, o in zip(complete, c, strict=True)
                                      if not o.first_check][:12]}
            rows.append(row)
            log(_line(row))
        return {"rows": rows, "rates": list(rates),
                "model_ms_p50": _pct(judge.model_ms(), 50), "model_ms_p90": _pct(judge.model_ms(), 90),
                "asr_ms_p50": _pct(judge.asr_ms(), 50), "checks": len(judge.model_ms()),
                "paused_set": [{"text": u.text, "pause_ms": u.pause_ms, "voice": u.source} for u in paused_set]}
    finally:
        judge.close()


def _fmt(v, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def _line(r: dict) -> str:
    return (f"| {r['policy']} | {r['cuts']}/{r['paused_n']} ({r['cut_rate']:.0%}) | {r['first_check']:.0%} | "
            f"{_fmt(r['decided_after_ms_p50'])} / {_fmt(r['decided_after_ms_p90'])} | {r['checks_per_turn']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicefast bench turns", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in SPEAKING_RATES), help="Piper speaking rates")
    ap.add_argument("--witnesses", default="both,audio,text")
    ap.add_argument("--eagerness", default="high,auto,low", help="'' for none")
    ap.add_argument("--policy", action="append", default=[],
                    metavar="CHECK_MS:MAX_SILENCE_MS:THRESHOLD[:WITNESS[:TRANSCRIPT_MS]]",
                    help="also a custom semantic policy (repeatable), for tuning the eagerness table")
    ap.add_argument("--out", default="bench/out/turns")
    a = ap.parse_args(argv)
    rates = tuple(float(r) for r in a.rates.split(","))
    print("| policy | cuts (paused set) | complete: ended at 1st check | decided after (ms, p50 / p90) "
          "| checks per turn |\n|---|---|---|---|---|")
    res = run(rates, a.witnesses.split(","), [e for e in a.eagerness.split(",") if e], custom=a.policy)
    print(f"\nend-of-turn model per check: p50 {_fmt(res['model_ms_p50'], '.1f')} ms, "
          f"p90 {_fmt(res['model_ms_p90'], '.1f')} ms over {res['checks']} checks; ASR at a check p50 "
          f"{_fmt(res['asr_ms_p50'], '.0f')} ms")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "turns_bench.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'turns_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
