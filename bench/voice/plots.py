"""PNG plots of a run (matplotlib, Agg backend): latency CDF, latency vs concurrency, stage breakdown."""

from __future__ import annotations

from pathlib import Path

from bench.voice.caller import STAGES
from bench.voice.stats import _level_key, group_by_level, percentile

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

    # Stacked medians: the server's stages when reported (then what the server spent between them, then network
    # and client), else the client-side marks as consecutive segments.
    fig, ax = plt.subplots(figsize=(9, 4.5))
    have_server = any(t.get(STAGES[0]) is not None for t in ok)
    names = [*STAGES, "server_other_ms", "network_client_ms"] if have_server else list(CLIENT_MARKS)
    labels = {"server_other_ms": "server, between stages", "network_client_ms": "network + client"}
    bottoms = [0.0] * len(levels)
    for name in names:
        heights = []
        for i, lv in enumerate(levels):
            med = percentile([t[name] for t in groups[lv] if t.get(name) is not None], 50)
            # client marks are cumulative times after the anchor: plot the increments
            heights.append(max(0.0, med or 0.0) if have_server else max(0.0, (med or bottoms[i]) - bottoms[i]))
        ax.bar(levels, heights, bottom=bottoms, label=labels.get(name, name.removesuffix("_ms")))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.plot(levels, [percentile([t["e2e_ms"] for t in groups[lv]], 50) for lv in levels], "k_", markersize=30,
            markeredgewidth=2, label="median e2e")
    ax.set(xlabel="concurrent sessions", ylabel="median ms after end of speech",
           title="where the time goes (median of each part)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    paths.append(_save(fig, out_dir / "stage_breakdown.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
