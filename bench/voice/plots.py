"""PNG plots of a run (matplotlib, Agg backend): latency CDF, latency vs concurrency, stage breakdown."""

from __future__ import annotations

from pathlib import Path

from bench.voice.caller import STAGES
from bench.voice.stats import _level_key, group_by_level, mode_summary, percentile

CLIENT_MARKS = ("speech_stopped_ms", "transcript_ms", "first_text_ms", "e2e_ms")


def write_plots(turns: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in turns if t.get("status") == "ok" and t.get("e2e_ms") is not None]
    groups = {k: [t for t in v if t in ok] for k, v in group_by_level(turns).items()}
    levels = sorted((k for k, v in groups.items() if v), key=_level_key)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for level in levels:
        xs = sorted(t["e2e_ms"] for t in groups[level])
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"concurrency {level}")
    ax.set(xlabel="voice-to-voice latency (ms, true end of speech -> first reply audio)", ylabel="fraction of turns",
           title="latency CDF", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q, style in ((50, "o-"), (90, "s--"), (99, "^:")):
        ax.plot(levels, [percentile([t["e2e_ms"] for t in groups[lv]], q) for lv in levels], style, label=f"p{q}")
    ax.set(xlabel="concurrent sessions", ylabel="voice-to-voice latency (ms)", title="latency vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "latency_vs_concurrency.png"))

    paths.append(_save(_stage_figure(plt, ok, groups, levels), out_dir / "stage_breakdown.png"))
    modes = [r for r in mode_summary(turns) if "paused_n" in r and 1 in r["levels"]]
    if modes:
        paths.append(_save(_latency_vs_cuts(plt, modes), out_dir / "latency_vs_cut_rate.png"))
    return paths


def _latency_vs_cuts(plt, modes: list[dict]):
    """One point per turn-detection mode: paused-set cut rate (x) against complete questions' p50 latency, with a
    bar up to p90 (one session)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in modes:
        lv = r["levels"][1]
        x = 100.0 * r["paused_cuts"] / r["paused_n"]
        if lv["e2e_p50"] is None:
            continue
        ax.errorbar([x], [lv["e2e_p50"]], yerr=[[0], [(lv["e2e_p90"] or lv["e2e_p50"]) - lv["e2e_p50"]]], fmt="o",
                    capsize=4, label=r["mode"])
        ax.annotate(r["mode"], (x, lv["e2e_p50"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set(xlabel="premature cuts on the paused set (%)",
           ylabel="voice-to-voice ms, complete questions (p50, bar to p90)",
           title="latency vs premature cuts per turn detection mode (1 session)")
    ax.set_xlim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _median(ts: list[dict], name: str) -> float | None:
    return percentile([t[name] for t in ts if t.get(name) is not None], 50)


def _stage_figure(plt, ok: list[dict], groups: dict[str, list[dict]], levels: list[str]):
    """Stacked medians. Sequential server stages (each starts when the previous ends) stack as reported, then
    the server's time between them, then network + client. When they overlap (a speculative server prepares the
    reply inside the silence window, so server_other_ms < 0) or aren't reported, the stack is the client-side
    timeline instead (speech_stopped -> transcript -> first text -> first audio), and overlapping server stages
    are drawn beside it as plain durations."""
    have_server = any(t.get(STAGES[0]) is not None for t in ok)
    overlapping = have_server and any((_median(groups[lv], "server_other_ms") or 0.0) < 0 for lv in levels)
    sequential = have_server and not overlapping
    fig, axes = plt.subplots(1, 2 if overlapping else 1, figsize=(12 if overlapping else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [*STAGES, "server_other_ms", "network_client_ms"] if sequential else list(CLIENT_MARKS)
    labels = {"server_other_ms": "server, between stages", "network_client_ms": "network + client",
              "speech_stopped_ms": "until speech_stopped", "transcript_ms": "-> final transcript",
              "first_text_ms": "-> first reply text", "e2e_ms": "-> first reply audio"}
    bottoms = [0.0] * len(levels)
    for name in names:
        heights = []
        for i, lv in enumerate(levels):
            med = _median(groups[lv], name)
            # client marks are cumulative times after the anchor: plot the increments
            heights.append(max(0.0, med or 0.0) if sequential else max(0.0, (med or bottoms[i]) - bottoms[i]))
        ax.bar(levels, heights, bottom=bottoms, label=labels.get(name, name.removesuffix("_ms")))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.plot(levels, [_median(groups[lv], "e2e_ms") for lv in levels], "k_", markersize=30, markeredgewidth=2,
            label="median e2e")
    ax.set(xlabel="concurrent sessions", ylabel="median ms after end of speech",
           title="where the time goes" + ("" if sequential else " (client-side timeline)"))
    ax.set_ylim(0, max([*bottoms, 1.0]) * 1.5)  # headroom for the legend
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    if overlapping:
        ax2 = axes[0][1]
        width = 0.8 / len(STAGES)
        for j, name in enumerate(STAGES):
            xs = [i + (j - (len(STAGES) - 1) / 2) * width for i in range(len(levels))]
            ax2.bar(xs, [_median(groups[lv], name) or 0.0 for lv in levels], width, label=name.removesuffix("_ms"))
        ax2.set_xticks(range(len(levels)), levels)
        ax2.set(xlabel="concurrent sessions", ylabel="median ms",
                title="server stages (overlapping: speculative start)")
        ax2.legend(fontsize=8)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
