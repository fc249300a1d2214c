"""Tables and plots of bench/gpu_voice/run.py results: `run_markdown(doc)` for one run (written by the run itself)
and, over the JSON of several runs (device calls), one summary per (model, turn mode) with the latency-vs-callers
and stage plots, the 32-caller target verdict and the caller count at which p95 crosses 1 s:

    python3 -m bench.gpu_voice.report bench/results/gpu/*.json --out bench/results/gpu"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

TARGET = {"callers": 32, "p50_ms": 300, "p95_ms": 500}  # issue 14, semantic_vad with the embedded models
STAGES = (("end_of_turn_delay_ms", "end of turn"), ("asr_final_ms", "ASR final"), ("llm_ttft_ms", "LLM TTFT"),
          ("tts_first_audio_ms", "TTS first audio"))


def _f(v, nd: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{nd}f}"


def _pp(d: dict | None, a: str = "p50", b: str = "p95", nd: int = 0) -> str:
    d = d or {}
    return f"{_f(d.get(a), nd)} / {_f(d.get(b), nd)}"


def latency_table(levels: list[dict]) -> list[str]:
    head = ("| callers | turns ok | **v2v p50 / p90 / p95** | p99 | steady p50 / p95 | end of turn p50 / p95 | "
            "ASR final p50 / p95 | LLM TTFT p50 / p95 | TTS first audio p50 / p95 | server other p50 | "
            "net+client p50 | reply tokens p50 | tok/s p50 | WER |")
    rows = [head, "|" + "---|" * 14]
    for lv in sorted(levels, key=lambda x: x["callers"]):
        e, st = lv["e2e_ms"], lv["stages"]
        rows.append(
            f"| {lv['callers']} | {lv['ok']}/{lv['turns']} | **{_f(e.get('p50'))} / {_f(e.get('p90'))} / "
            f"{_f(e.get('p95'))}** | {_f(e.get('p99'))} | {_pp(lv.get('e2e_ms_steady'))} | "
            f"{_pp(st['end_of_turn_delay_ms'])} | {_pp(st['asr_final_ms'])} | {_pp(st['llm_ttft_ms'])} | "
            f"{_pp(st['tts_first_audio_ms'])} | {_f(st['server_other_ms'].get('p50'))} | "
            f"{_f(st['network_client_ms'].get('p50'))} | {_f(lv.get('reply_tokens_p50'))} | "
            f"{_f(lv.get('reply_tok_s_p50'), 1)} | {_f(lv.get('wer_mean'), 3)} |")
    return rows


def util_table(levels: list[dict]) -> list[str]:
    head = ("| callers | engine batch mean (p95) | step ms mean (p95) | engine busy % | GPU % mean / p95 | "
            "GPU MiB max | host CPU % mean / p95 | server cores mean / p95 | busiest server thread % p95 | "
            "client cores mean | caller pacing lag p95 ms |")
    rows = [head, "|" + "---|" * 11]
    for lv in sorted(levels, key=lambda x: x["callers"]):
        u = lv["util"]
        eng = u["engine"]
        rows.append(
            f"| {lv['callers']} | {_f(eng.get('batch_mean'), 1)} ({_f(eng.get('batch_p95'), 1)}) | "
            f"{_f(eng.get('step_ms_mean'), 2)} ({_f(eng.get('step_ms_p95'), 2)}) | {_f(eng.get('busy_pct'))} | "
            f"{_pp(u['gpu_util_pct'], 'mean', 'p95')} | {_f(u.get('gpu_mem_mib_max'))} | "
            f"{_pp(u['cpu_host_pct'], 'mean', 'p95')} | {_pp(u['server_cores'], 'mean', 'p95', 1)} | "
            f"{_f(u['server_top_thread_pct'].get('p95'))} | {_f(u['client_cores'].get('mean'), 1)} | "
            f"{_f(lv.get('anchor_lag_ms_p95'), 1)} |")
    return rows


def run_markdown(doc: dict) -> str:
    m = doc["meta"]
    srv = m.get("server", {})
    lines = [f"# voicefast on a GPU host: {m['model']} ({m['tag']})", "",
             f"- what: {m['what']}", f"- command: `{m['command']}`", f"- commit: {m.get('commit')}",
             f"- machine: {m.get('machine')}", f"- started {m.get('started')}, finished {m.get('finished')} "
             f"({m.get('elapsed_s')} s)", f"- turn detection: {m.get('turn_mode')}", f"- models: {m['note']}"]
    if srv:
        lines += [f"- server: `{srv.get('command')}`, ready in {srv.get('ready_s')} s",
                  f"- host: {srv.get('host', '(not reported)')}"]
        lines += [f"- {k.upper()}: {srv[k]}" for k in ("vad", "turn", "asr", "llm", "tts") if k in srv]
    if m.get("checkpoint"):
        lines.append(f"- checkpoint: {m['checkpoint']}")
    lines += ["", "Voice to voice (v2v) = the caller's true end of speech -> first reply audio byte, ms. Stages are "
              "the server's `voicefast_timings`; they overlap when the server starts speculatively. steady = turns "
              "after each caller's first (the first turns of a level start together).", "",
              *latency_table(doc["levels"]), "", "## Utilisation (per-level window; engine figures from /metrics "
              "step counters)", "", *util_table(doc["levels"]), ""]
    if doc.get("skipped"):
        lines += ["## Skipped", ""] + [f"- level {s['level']}: {s['why'][:500]}" for s in doc["skipped"]] + [""]
    bad = [t for t in doc["turns"] if t.get("status") != "ok"]
    if bad:
        lines += ["## Failed turns", ""] + [f"- callers {t.get('callers')} session {t.get('session')} turn "
                                             f"{t.get('turn')}: {t.get('status')}" for t in bad[:50]] + [""]
    return "\n".join(lines)


def crossing(levels: list[dict], ms: float = 1000.0) -> int | None:
    """The smallest measured caller count whose v2v p95 exceeds `ms` (None: none did)."""
    over = [lv["callers"] for lv in levels if (lv["e2e_ms"].get("p95") or 0) > ms]
    return min(over) if over else None


def merge(docs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(model, turn mode) -> levels of every run, later runs replacing earlier ones at the same caller count."""
    groups: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for d in sorted(docs, key=lambda d: d["meta"].get("started") or ""):
        key = (d["meta"]["model"], d["meta"].get("turn_mode") or "?")
        for lv in d["levels"]:
            if lv.get("label") == "paused":
                continue
            groups[key][lv["callers"]] = lv | {"tag": d["meta"]["tag"], "commit": d["meta"].get("commit")}
    return {k: [v[c] for c in sorted(v)] for k, v in groups.items()}


def summary_markdown(docs: list[dict]) -> str:
    groups = merge(docs)
    lines = ["# voicefast on a GPU host: summary", "", "Merged from: " + ", ".join(
        f"`{d['meta']['tag']}` ({d['meta']['model']}, commit {d['meta'].get('commit')}, {d['meta'].get('started')})"
        for d in docs), ""]
    if docs:
        lines += [f"Machine: {docs[0]['meta'].get('machine')}", ""]
    for (model, mode), levels in groups.items():
        note = next(d["meta"]["note"] for d in docs if d["meta"]["model"] == model)
        lines += [f"## {model}, turn detection {mode}", "", f"{note}.", ""]
        host = next((d["meta"].get("server", {}).get("host") for d in docs if d["meta"]["model"] == model), None)
        if host:
            lines += [f"Server: {host}", ""]
        lines += latency_table(levels) + [""] + util_table(levels) + [""]
        c = crossing(levels)
        lines.append(f"- v2v p95 crosses 1 s at: {c} callers" if c else
                     f"- v2v p95 stays under 1 s up to {max(lv['callers'] for lv in levels)} callers")
        at = next((lv for lv in levels if lv["callers"] == TARGET["callers"]), None)
        if model == "embedded" and at is not None:
            p50, p95 = at["e2e_ms"].get("p50"), at["e2e_ms"].get("p95")
            met = p50 is not None and p95 is not None and p50 <= TARGET["p50_ms"] and p95 <= TARGET["p95_ms"]
            judged = mode.startswith("semantic_vad")
            lines.append(f"- target at {TARGET['callers']} callers (p50 <= {TARGET['p50_ms']} ms, p95 <= "
                         f"{TARGET['p95_ms']} ms{', semantic_vad only' if not judged else ''}): p50 {_f(p50)}, "
                         f"p95 {_f(p95)} -> " + (("**met**" if met else "**not met**") if judged else
                                                 "reported, not judged"))
        lines.append("")
    return "\n".join(lines)


def plot(docs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = merge(docs)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for (model, mode), levels in groups.items():
        xs = [lv["callers"] for lv in levels]
        for q, style in (("p50", "o-"), ("p95", "s--")):
            ax.plot(xs, [lv["e2e_ms"].get(q) for lv in levels], style, label=f"{model}, {mode}: {q}")
    ax.axhline(1000, color="grey", lw=0.8, ls=":")
    ax.axhline(TARGET["p50_ms"], color="green", lw=0.8, ls=":")
    ax.axhline(TARGET["p95_ms"], color="orange", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="concurrent callers", ylabel="voice-to-voice latency (ms)",
           title="voice to voice vs callers (targets: p50 300 / p95 500 ms at 32 callers; 1 s line)")
    ax.set_xticks(sorted({lv["callers"] for ls in groups.values() for lv in ls}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "latency_vs_callers.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, ((model, mode), levels) in zip(axes[0], groups.items(), strict=False):
        xs = list(range(len(levels)))
        width = 0.8 / len(STAGES)
        for j, (key, label) in enumerate(STAGES):
            ax.bar([x + (j - 1.5) * width for x in xs], [lv["stages"][key].get("p50") or 0 for lv in levels], width,
                   label=f"{label} p50")
        ax.plot(xs, [lv["e2e_ms"].get("p50") for lv in levels], "k_", markersize=28, markeredgewidth=2,
                label="v2v p50")
        ax.set_xticks(xs, [str(lv["callers"]) for lv in levels])
        ax.set(xlabel="concurrent callers", ylabel="ms", title=f"{model} ({mode}): stages")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "stages_vs_callers.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_voice.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="<tag>.json files written by bench.gpu_voice.run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    docs = []
    for p in a.runs:
        d = json.loads(Path(p).read_text())
        if "levels" not in d or "meta" not in d:
            print(f"skipping {p}: not a bench.gpu_voice.run result", file=sys.stderr)
            continue
        docs.append(d)
    if not docs:
        print("no run results given", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary_markdown(docs))
    paths = plot(docs, out)
    print(f"wrote {out / 'summary.md'}, " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
