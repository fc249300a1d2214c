"""Percentiles per concurrency level, and the summary.md table (pure Python bookkeeping)."""

from __future__ import annotations

import math
from collections import defaultdict

METRICS = ("e2e_ms", "end_of_turn_delay_ms", "asr_final_ms", "llm_ttft_ms", "tts_first_audio_ms",
           "server_other_ms", "e2e_server_ms", "network_client_ms",
           "speech_stopped_ms", "transcript_ms", "first_text_ms", "tokens_per_s", "wer",
           "end_of_turn_silence_ms", "turn_model_ms", "chain_asr_ms", "chain_first_phrase_ms", "chain_ms")
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


CHAIN = ("end_of_turn_silence_ms", "turn_model_ms", "chain_asr_ms", "llm_ttft_ms", "chain_first_phrase_ms",
         "tts_first_audio_ms", "chain_ms")


def mode_summary(turns: list[dict]) -> list[dict]:
    """Per turn-detection mode: complete questions' voice-to-voice latency per concurrency and the paused set's
    premature-cut rate (a reply created before the caller's true end of speech)."""
    out = []
    for mode in dict.fromkeys(t.get("mode", "default") for t in turns):
        ts = [t for t in turns if t.get("mode", "default") == mode]
        complete = [t for t in ts if t.get("kind", "complete") == "complete"]
        row: dict = {"mode": mode, "levels": {}}
        for c in sorted({t["concurrency"] for t in complete if t.get("concurrency") is not None}):
            ok = [t for t in complete if t["concurrency"] == c and t.get("status") == "ok"
                  and t.get("e2e_ms") is not None]
            e2e = [t["e2e_ms"] for t in ok]
            eot = [t["end_of_turn_delay_ms"] for t in ok if t.get("end_of_turn_delay_ms") is not None]
            row["levels"][c] = {"n": len(ok), "e2e_p50": percentile(e2e, 50), "e2e_p90": percentile(e2e, 90),
                                "e2e_p95": percentile(e2e, 95), "eot_p50": percentile(eot, 50),
                                "cut": sum(bool(t.get("cut")) for t in complete if t["concurrency"] == c),
                                "chain": {m: percentile([t[m] for t in ok if t.get(m) is not None], 50)
                                          for m in CHAIN}}
        paused = [t for t in ts if t.get("kind") == "paused"]
        if paused:
            row["paused_n"] = len(paused)
            row["paused_cuts"] = sum(bool(t.get("cut")) for t in paused)
            row["cut_texts"] = [t["text"] for t in paused if t.get("cut")]
        out.append(row)
    return out


def mode_markdown(turns: list[dict]) -> list[str]:
    rows = mode_summary(turns)
    if len(rows) == 1 and rows[0]["mode"] == "default" and "paused_n" not in rows[0]:
        return []
    lines = ["## turn detection modes", "",
             "Complete questions: voice-to-voice ms from the true end of speech (p50 / p90; p95 at c > 1) and the",
             "server's end_of_turn_delay p50. Paused set: utterances with a 600-900 ms thinking pause inside an",
             "unfinished phrase; a cut = `response.created` before the caller's true end of speech.", "",
             "| mode | concurrency | turns | e2e p50 / p90 | e2e p95 | end_of_turn p50 | paused-set cuts |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cuts = f"{r['paused_cuts']}/{r['paused_n']} ({r['paused_cuts'] / r['paused_n']:.0%})" if "paused_n" in r \
            else "–"
        for i, (c, lv) in enumerate(r["levels"].items()):
            lines.append(f"| {r['mode']} | {c} | {lv['n']} | {_fmt(lv['e2e_p50'], 'e2e_ms')} / "
                         f"{_fmt(lv['e2e_p90'], 'e2e_ms')} | {_fmt(lv['e2e_p95'], 'e2e_ms') if c > 1 else '–'} | "
                         f"{_fmt(lv['eot_p50'], 'e2e_ms')} | {cuts if i == 0 else ''} |")
        if not r["levels"]:
            lines.append(f"| {r['mode']} | – | 0 | – | – | – | {cuts} |")
    lines += ["", "The reply chain (server-reported, p50 ms, complete questions): silence heard when the turn was",
              "decided, the end-of-turn model, check -> transcript, LLM first token, first token -> first phrase to",
              "TTS, TTS first audio, check -> first TTS audio (server_vad: the chain starts at 160 ms of silence).", "",
              "| mode | c | " + " | ".join(m.removesuffix("_ms") for m in CHAIN) + " |",
              "|---|---|" + "---|" * len(CHAIN)]
    for r in rows:
        for c, lv in r["levels"].items():
            lines.append(f"| {r['mode']} | {c} | " + " | ".join(_fmt(lv["chain"][m], "e2e_ms") for m in CHAIN) + " |")
    lines.append("")
    for r in rows:
        if r.get("cut_texts"):
            lines.append(f"- {r['mode']} cut: " + "; ".join(f"\"{t}\"" for t in r["cut_texts"]))
    return lines + [""]


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
    lines += mode_markdown(turns)
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
