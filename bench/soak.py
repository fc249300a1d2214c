"""`voicefast bench soak --minutes N`: sessions in a loop against one server for N minutes -- spoken turns,
barge-ins, clients vanishing mid-response, manual commits, bad input -- while the server's RSS, fds, threads,
event-loop tasks, malloc heap and engine free KV blocks are sampled every --sample-s (30 s). Afterwards the traffic
stops and the counters are read once more. Writes soak.json, summary.md and soak.png into --out.

Verdict: after --warmup-min, RSS stays within +-5% of its post-warm-up mean and its fitted slope is small; every
other counter is back at its idle baseline at the end. Without --url it starts `voicefast serve` itself (its
/proc entry is read too); --env KEY=VALUE sets the server's environment (e.g. MALLOC_ARENA_MAX=2)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

from bench.probe import http_url, sample
from bench.soak_traffic import SCENARIOS, run_worker
from bench.voice.prompts import PROMPTS
from bench.voice.runner import LocalServer, _git_commit, _machine
from bench.voice.utterances import synthesize

FLAT_BAND = 0.05  # RSS after warm-up within +-5% of its mean


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="voicefast bench soak", description=__doc__)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2, help="sessions in flight at once")
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--warmup-min", type=float, default=None, help="default: a third of --minutes, at most 5")
    ap.add_argument("--url", help="ws://.../v1/realtime of a running server (default: start `voicefast serve`)")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, to read /proc as well")
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    ap.add_argument("--out", default="bench/out/soak")
    ap.add_argument("--no-plot", action="store_true")
    return ap


async def soak(url: str, pid: int | None, args: argparse.Namespace, utts) -> dict:
    base = http_url(url)
    loop = asyncio.get_running_loop()
    idle0 = await loop.run_in_executor(None, sample, base, pid)
    samples = [idle0 | {"phase": "idle"}]
    deadline = time.monotonic() + args.minutes * 60
    tally: dict[str, int] = {}
    workers = [asyncio.create_task(run_worker(url, w, utts, deadline, tally)) for w in range(args.workers)]
    t_start = time.time()
    while time.monotonic() < deadline:
        await asyncio.sleep(min(args.sample_s, max(0.0, deadline - time.monotonic())))
        s = await loop.run_in_executor(None, sample, base, pid)
        samples.append(s | {"phase": "traffic", "minute": round((s["t"] - t_start) / 60, 2), "outcomes": dict(tally)})
        print(f"[soak] {samples[-1]['minute']:5.1f} min  rss {s.get('rss_bytes', 0) / 2**20:7.1f} MiB  "
              f"tasks {s.get('tasks')}  fds {s.get('open_fds')}  threads {s.get('threads')}  "
              f"free blocks {s.get('free_blocks')}  {sum(tally.values())} scenarios", flush=True)
    await asyncio.gather(*workers, return_exceptions=True)
    for _ in range(60):  # the server tears the last sessions down after the clients left
        s = await loop.run_in_executor(None, sample, base, pid)
        if not s.get("sessions") and not s.get("engine_running") and s.get("free_blocks") == s.get("total_blocks"):
            break
        await asyncio.sleep(1)
    await asyncio.sleep(3)
    end = await loop.run_in_executor(None, sample, base, pid)
    samples.append(end | {"phase": "end", "minute": round((end["t"] - t_start) / 60, 2), "outcomes": dict(tally)})
    return {"samples": samples, "outcomes": tally}


def analyse(samples: list[dict], warmup_min: float) -> dict:
    idle, end = samples[0], samples[-1]
    post = [s for s in samples if s["phase"] == "traffic" and s["minute"] >= warmup_min and "rss_bytes" in s]
    out: dict = {"warmup_min": warmup_min, "post_warmup_samples": len(post)}
    if len(post) >= 2:
        xs = [s["minute"] for s in post]
        ys = [s["rss_bytes"] / 2**20 for s in post]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(
            1e-9, sum((x - mx) ** 2 for x in xs))
        out |= {"rss_mean_mib": round(my, 1), "rss_min_mib": round(min(ys), 1), "rss_max_mib": round(max(ys), 1),
                "rss_max_deviation_pct": round(100 * max(abs(y - my) for y in ys) / my, 2),
                "rss_slope_mib_per_min": round(slope, 3)}
        out["rss_flat"] = out["rss_max_deviation_pct"] <= 100 * FLAT_BAND
    back = {}
    for k in ("open_fds", "threads", "tasks", "sessions", "engine_running", "engine_waiting"):
        if k in idle and k in end:
            back[k] = {"idle": idle[k], "end": end[k], "ok": end[k] <= idle[k]}
    if "free_blocks" in end:
        back["free_blocks"] = {"idle": idle.get("free_blocks"), "end": end["free_blocks"],
                               "ok": end["free_blocks"] == end.get("total_blocks")}
    out["back_to_baseline"] = back
    return out


def write_plot(samples: list[dict], warmup_min: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [s for s in samples if "minute" in s]
    mins = [s["minute"] for s in pts]
    idle = samples[0]
    panels = [("change since idle (MiB)", [("rss_bytes", "RSS"), ("malloc_in_use_bytes", "malloc in use"),
                                           ("malloc_free_bytes", "malloc free"),
                                           ("malloc_mmapped_bytes", "malloc mmapped")], 2**20),
              ("open fds", [("open_fds", "fds")], 1), ("threads", [("threads", "threads")], 1),
              ("event-loop tasks", [("tasks", "tasks")], 1), ("engine free KV blocks", [("free_blocks", "free")], 1),
              ("scenarios done", [("_done", "scenarios")], 1)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, series, div) in zip(axes.flat, panels, strict=True):
        for key, label in series:
            if key == "_done":
                ys = [sum(s.get("outcomes", {}).values()) for s in pts]
            elif div == 2**20:  # memory: change since the idle sample, so a few MiB show on a 2.5 GiB process
                ys = [(s.get(key, float("nan")) - idle.get(key, float("nan"))) / div for s in pts]
            else:
                ys = [s.get(key, float("nan")) / div for s in pts]
            ax.plot(mins, ys, marker=".", label=label)
        ax.axvline(warmup_min, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("minutes")
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    warmup = args.warmup_min if args.warmup_min is not None else min(5.0, args.minutes / 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kv in args.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    commit = _git_commit()  # what the server runs: read before the run, not after it
    utts = synthesize(PROMPTS)
    if args.url:
        res = asyncio.run(soak(args.url, args.pid, args, utts))
        cmd = None
    else:
        with LocalServer(out, args.serve_args) as srv:
            res = asyncio.run(soak(srv.url, srv.proc.pid, args, utts))
            cmd = shlex.join(srv.cmd[1:])
    meta = {"command": shlex.join(["voicefast", "bench", "soak", *argv]), "server": cmd or args.url,
            "env": args.env, "commit": commit, "machine": _machine(), "cpus": os.cpu_count(),
            "workers": args.workers, "scenarios": [name for name, _ in SCENARIOS]}
    verdict = analyse(res["samples"], warmup)
    (out / "soak.json").write_text(json.dumps({"meta": meta, "verdict": verdict, **res}, indent=1))
    if not args.no_plot:
        write_plot(res["samples"], warmup, out / "soak.png")
    lines = [f"# Soak: {args.minutes:g} min, {args.workers} sessions at a time", "",
             f"`{meta['command']}` at {meta['commit']} on {meta['machine']}", "",
             f"scenarios: {res['outcomes']}", "",
             f"RSS after {warmup:g} min warm-up: mean {verdict.get('rss_mean_mib')} MiB, range "
             f"{verdict.get('rss_min_mib')}-{verdict.get('rss_max_mib')} MiB, max deviation "
             f"{verdict.get('rss_max_deviation_pct')}% (target <= {100 * FLAT_BAND:g}%), slope "
             f"{verdict.get('rss_slope_mib_per_min')} MiB/min", "",
             "| counter | idle before | after the traffic | back to baseline |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['idle']} | {v['end']} | {'yes' if v['ok'] else 'NO'} |"
              for k, v in verdict["back_to_baseline"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = verdict.get("rss_flat", False) and all(v["ok"] for v in verdict["back_to_baseline"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
