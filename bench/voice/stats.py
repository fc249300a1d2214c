"""Percentiles per concurrency level, and the summary.md table (pure Python bookkeeping)."""

from __future__ import annotations

import math
from collections import defaultdict

METRICS = ("e2e_ms", "end_of_turn_delay_ms", "asr_final_ms", "llm_ttft_ms", "tts_first_audio_ms",
           "server_other_ms", "e2e_server_ms", "network_client_ms",
           "speech_stopped_ms", "transcript_ms", "first_text_ms", "tokens_per_s", "wer")
QUANTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def level_of(turn: dict) -> str:
    return turn.get("level") or str(turn["concurrency"])


def group_by_level(turns: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for t in turns:
        groups[level_of(t)].append(t)
    return dict(groups)


def summarize(turns: list[dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{level: {metric: {"p50": .., "p90": .., "p99": .., "n": ..}}} over successful turns."""
    out = {}
    for level, ts in group_by_level(turns).items():
        ok = [t for t in ts if t.get("status") == "ok"]
        out[level] = {"_turns": {"n": len(ts), "ok": len(ok)}}
        for m in METRICS:
            vals = [t[m] for t in ok if t.get(m) is not None]
            out[level][m] = {f"p{q}": percentile(vals, q) for q in QUANTILES} | {"n": len(vals)}
    return out


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if metric == "wer" else (f"{v:.1f}" if metric == "tokens_per_s" else f"{v:.0f}")


def summary_markdown(meta: dict, turns: list[dict]) -> str:
    s = summarize(turns)
    lines = ["# voicefast bench voice", "",
             f"- command: `{meta.get('command')}`", f"- url: {meta.get('url')}",
             f"- commit: {meta.get('commit')}", f"- machine: {meta.get('machine')}",
             f"- started: {meta.get('started')}", f"- mode: {meta.get('mode')}", "",
             "All latencies in ms from the TRUE end of speech in the audio the caller sent (the real-time send slot",
             "of the 20 ms frame holding its last voiced sample), not from the server's speech_stopped.",
             "e2e = first reply audio byte received. Stage columns are the server's own `voicefast_timings`",
             "(– when the server does not report them); server_other = e2e_server_ms minus those stages.", ""]
    lines += ["## overview (ms; p50 / p90)", "",
              "| concurrency | turns ok | e2e | end_of_turn | asr_final | llm_ttft | tts_first_audio | server_other "
              "| tok/s p50 | mean WER |", "|---|---|---|---|---|---|---|---|---|---|"]
    for level in sorted(s, key=_level_key):
        st = s[level]
        cells = [f"{_fmt(st[m]['p50'], m)} / {_fmt(st[m]['p90'], m)}" for m in (
            "e2e_ms", "end_of_turn_delay_ms", "asr_final_ms", "llm_ttft_ms", "tts_first_audio_ms", "server_other_ms")]
        wers = [t["wer"] for t in group_by_level(turns)[level] if t.get("status") == "ok" and t.get("wer") is not None]
        mean_wer = f"{sum(wers) / len(wers):.3f}" if wers else "–"
        lines.append(f"| {level} | {st['_turns']['ok']}/{st['_turns']['n']} | " + " | ".join(cells)
                     + f" | {_fmt(st['tokens_per_s']['p50'], 'tokens_per_s')} | {mean_wer} |")
    lines.append("")
    for level in sorted(s, key=_level_key):
        st = s[level]
        lines += [f"## concurrency {level}  ({st['_turns']['ok']}/{st['_turns']['n']} turns ok)", "",
                  "| metric | n | p50 | p90 | p99 |", "|---|---|---|---|---|"]
        for m in METRICS:
            v = st[m]
            if v["n"]:
                lines.append(f"| {m} | {v['n']} | {_fmt(v['p50'], m)} | {_fmt(v['p90'], m)} | {_fmt(v['p99'], m)} |")
        lines.append("")
    lines += transport_comparison(turns)
    failed = [t for t in turns if t.get("status") != "ok"]
    if failed:
        lines += ["## failed turns", ""] + [f"- session {t['session']} turn {t['turn']}: {t['status']}"
                                             for t in failed] + [""]
    return "\n".join(lines)


def transport_comparison(turns: list[dict]) -> list[str]:
    """Phone path vs Realtime path at each concurrency, when a run measured both (markdown lines, or none)."""
    by: dict[tuple, list[float]] = defaultdict(list)
    for t in turns:
        if t.get("status") == "ok" and t.get("e2e_ms") is not None and t.get("transport"):
            by[(t["concurrency"], t["transport"])].append(t["e2e_ms"])
    levels = sorted({c for c, tr in by if tr == "twilio"} & {c for c, tr in by if tr == "realtime"},
                    key=lambda c: (c is None, c or 0))
    if not levels:
        return []
    lines = ["## phone (Twilio) vs Realtime path: e2e ms", "",
             "| concurrency | realtime p50 / p90 (n) | twilio p50 / p90 (n) | twilio - realtime p50 |",
             "|---|---|---|---|"]
    for c in levels:
        rt, tw = by[(c, "realtime")], by[(c, "twilio")]
        d = percentile(tw, 50) - percentile(rt, 50)
        lines.append(f"| {c} | {percentile(rt, 50):.0f} / {percentile(rt, 90):.0f} ({len(rt)}) | "
                     f"{percentile(tw, 50):.0f} / {percentile(tw, 90):.0f} ({len(tw)}) | {d:+.0f} |")
    return lines + [""]


def _level_key(level: str) -> tuple:
    head, _, rest = str(level).partition(" ")
    try:
        return (0, float(head), rest)
    except ValueError:
        return (1, 0.0, level)
