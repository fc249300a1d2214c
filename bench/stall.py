"""`voicefast bench stall`: how long other sessions wait while one client sends the biggest appends allowed.

One session (the pinger) asks the server something trivial every 10 ms and records each round trip; another
sends `--appends` appends of the largest size max_message_bytes allows (2 MiB: ~33 s of 24 kHz PCM16, or ~3 min
of G.711 with --format pcmu) of low-level noise. The pinger's round trips while the appends are processed,
against those while idle, show the worst stall one client's audio causes everyone else. Without --url it starts
`voicefast serve` twice in the same run: as configured (appends sliced into inline_audio_ms pieces), and with
slicing off (--inline-audio-ms 10^9) as the baseline."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.probe import Pinger, summary
from bench.voice.runner import LocalServer, _git_commit, _machine

FORMATS = {"pcm": ({"type": "audio/pcm", "rate": 24000}, 24000, 2), "pcmu": ({"type": "audio/pcmu"}, 8000, 1)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="voicefast bench stall", description=__doc__)
    ap.add_argument("--url", help="ws://.../v1/realtime of a running server (default: start `voicefast serve`)")
    ap.add_argument("--appends", type=int, default=4, help="big appends to send")
    ap.add_argument("--format", choices=sorted(FORMATS), default="pcm")
    ap.add_argument("--message-bytes", type=int, default=2 << 20, help="the server's max_message_bytes")
    ap.add_argument("--idle-s", type=float, default=5.0, help="pinger-only time before the appends")
    ap.add_argument("--serve-args", default="", help="extra `voicefast serve` arguments")
    ap.add_argument("--no-baseline", action="store_true", help="skip the slicing-off server")
    ap.add_argument("--out", default="bench/out/stall")
    return ap


def big_append(fmt: str, message_bytes: int, seed: int) -> tuple[str, float]:
    """The largest append frame that fits message_bytes, and the seconds of audio it carries."""
    spec, rate, width = FORMATS[fmt]
    raw_bytes = (message_bytes - 200) * 3 // 4 // width * width
    x = (0.02 * np.random.default_rng(seed).standard_normal(raw_bytes // width)).astype(np.float32)
    if fmt == "pcm":
        raw = (x * 32767).astype("<i2").tobytes()
    else:
        from audio import codecs

        raw = codecs.ulaw_encode(x)
    frame = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(raw).decode()})
    assert len(frame) <= message_bytes, len(frame)
    return frame, raw_bytes / width / rate


async def measure(url: str, args: argparse.Namespace) -> dict:
    from websockets.asyncio.client import connect

    pinger = Pinger(url)
    stop = asyncio.Event()
    ping_task = asyncio.create_task(pinger.run(stop))
    await asyncio.sleep(args.idle_s)
    t_idle_end = time.time()
    frames = [big_append(args.format, args.message_bytes, i) for i in range(args.appends)]
    async with connect(url, subprotocols=["realtime"], max_size=None, compression=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"format": FORMATS[args.format][0], "turn_detection": {
                "type": "server_vad"}}}}}))
        t0 = time.time()
        for frame, _ in frames:
            await ws.send(frame)
        # The server handles one connection's messages in order: this answer means every append was processed.
        await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "marker"}))
        async with asyncio.timeout(600):
            while True:
                ev = json.loads(await ws.recv())
                if ev["type"] == "error" and "marker" in ev["error"].get("message", ""):
                    break
        t1 = time.time()
    await asyncio.sleep(1.0)
    stop.set()
    await ping_task
    idle = [ms for t, ms in pinger.rtts_ms if t <= t_idle_end]
    during = pinger.between(t0, t1)
    return {"audio_s_per_append": round(frames[0][1], 1), "append_bytes": len(frames[0][0]),
            "processing_s": round(t1 - t0, 2), "idle_rtt_ms": summary(idle), "during_rtt_ms": summary(during),
            "worst_stall_ms": max(during) if during else None}


def run_server(out: Path, name: str, serve_args: str, args: argparse.Namespace) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    with LocalServer(d, serve_args) as srv:
        return asyncio.run(measure(srv.url, args)) | {"serve_args": serve_args}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.url:
        results["server"] = asyncio.run(measure(args.url, args))
    else:
        results["sliced"] = run_server(out, "sliced", args.serve_args, args)
        if not args.no_baseline:
            results["unsliced"] = run_server(out, "unsliced", f"{args.serve_args} --inline-audio-ms 1000000000",
                                             args)
    meta = {"command": "voicefast bench stall " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": _git_commit(), "machine": _machine(), "cpus": os.cpu_count(), "format": args.format,
            "appends": args.appends}
    (out / "stall.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# Event-loop stall from big appends ({args.format})", "", f"`{meta['command']}` at {meta['commit']} on "
             f"{meta['machine']}", "", "| server | audio per append | processing | ping p50 idle | ping p50 during | "
             "ping p99 during | worst stall |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['audio_s_per_append']} s | {r['processing_s']} s | "
                     f"{_ms(r['idle_rtt_ms']['p50'])} | {_ms(r['during_rtt_ms']['p50'])} | "
                     f"{_ms(r['during_rtt_ms']['p99'])} | {_ms(r['worst_stall_ms'])} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
