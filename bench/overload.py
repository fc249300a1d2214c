"""`voicefast bench overload`: connection storms of 2 x max_sessions clients against a full server, while
`--running` callers keep talking. Reports how every storm connection ended (accepted, or the clean refusal: an
`error` session_limit_reached then close 1008; anything else is a failure) and the running callers' voice-to-voice
latency (bench/voice's caller: from the true end of speech to the first reply audio) before the storms and during
them, from the same run. Without --url it starts `voicefast serve --max-sessions N` with connection-rate limits
off (they would answer a storm with HTTP 429 first; tests/test_server_guards.py covers those)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from bench.probe import summary
from bench.voice.caller import Caller, CallerConfig
from bench.voice.prompts import PROMPTS
from bench.voice.runner import LocalServer, _git_commit, _machine
from bench.voice.utterances import synthesize
from bench.voice.wer import wer_fn


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="voicefast bench overload", description=__doc__)
    ap.add_argument("--url", help="ws://.../v1/realtime of a running server (its max_sessions given by --max-sessions)")
    ap.add_argument("--max-sessions", type=int, default=4)
    ap.add_argument("--running", type=int, default=2, help="callers talking through both phases")
    ap.add_argument("--turns", type=int, default=6, help="turns per caller in each phase (>= 10 in all per phase)")
    ap.add_argument("--storm-every-s", type=float, default=3.0)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--out", default="bench/out/overload")
    return ap


async def storm_client(url: str) -> str:
    """One storm connection: 'accepted' (held open by the caller), 'refused_clean', or what went wrong."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    try:
        ws = await connect(url, subprotocols=["realtime"], open_timeout=30)
    except InvalidStatus as e:
        return f"http_{e.response.status_code}"
    except (OSError, TimeoutError) as e:
        return f"connect_failed: {type(e).__name__}"
    try:
        async with asyncio.timeout(30):
            ev = json.loads(await ws.recv())
            if ev["type"] == "session.created":
                return "accepted"
            code = ev.get("error", {}).get("code")
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
            return "refused_clean" if code == "session_limit_reached" and ws.close_code == 1008 else \
                f"refused_other: {code} / {ws.close_code}"
    except (TimeoutError, ConnectionClosed) as e:
        return f"broken: {type(e).__name__}"
    finally:
        await ws.close()


async def storms(url: str, n: int, every_s: float, stop: asyncio.Event, outcomes: list[str]) -> None:
    while not stop.is_set():
        outcomes += await asyncio.gather(*(storm_client(url) for _ in range(n)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def phase(cfg: CallerConfig, utts, args, first_id: int) -> list[dict]:
    callers = [Caller(cfg, first_id + i) for i in range(args.running)]
    res = await asyncio.gather(*(c.run(utts, args.turns, lambda: args.running, lambda r: None, wer_fn())
                                 for c in callers), return_exceptions=True)
    turns = []
    for r in res:
        if isinstance(r, BaseException):
            turns.append({"status": f"error: {type(r).__name__}: {r}", "e2e_ms": None})
        else:
            turns += [dataclasses.asdict(t) for t in r]
    return turns


async def measure(url: str, args: argparse.Namespace, utts) -> dict:
    cfg = CallerConfig(url=url)
    before = await phase(cfg, utts, args, 0)
    stop, outcomes = asyncio.Event(), []
    storm = asyncio.create_task(storms(url, 2 * args.max_sessions, args.storm_every_s, stop, outcomes))
    t0 = time.time()
    during = await phase(cfg, utts, args, 100)
    stop.set()
    await storm
    tally = {k: outcomes.count(k) for k in sorted(set(outcomes))}

    def lat(turns):
        return summary([t["e2e_ms"] for t in turns if t.get("status") == "ok" and t.get("e2e_ms") is not None])

    return {"before_e2e_ms": lat(before), "during_e2e_ms": lat(during), "storm_outcomes": tally,
            "storm_connections": len(outcomes), "storm_phase_s": round(time.time() - t0, 1),
            "failed_turns": sum(t.get("status") != "ok" for t in before + during), "turns": before + during}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.running >= args.max_sessions:
        print("voicefast bench overload: --running must be < --max-sessions", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    utts = synthesize(PROMPTS)
    if args.url:
        res = asyncio.run(measure(args.url, args, utts))
    else:
        serve = f"--max-sessions {args.max_sessions} --connect-rate-per-address-per-min 0 {args.serve_args}"
        with LocalServer(out, serve) as srv:
            res = asyncio.run(measure(srv.url, args, utts))
    meta = {"command": shlex.join(["voicefast", "bench", "overload", *argv]), "commit": _git_commit(),
            "machine": _machine(), "cpus": os.cpu_count(), "max_sessions": args.max_sessions,
            "running": args.running}
    (out / "overload.json").write_text(json.dumps({"meta": meta, **res}, indent=1))
    b, d = res["before_e2e_ms"], res["during_e2e_ms"]
    clean = res["storm_outcomes"].get("refused_clean", 0) + res["storm_outcomes"].get("accepted", 0)
    lines = [f"# Overload: storms of {2 * args.max_sessions} connections at max_sessions={args.max_sessions}, "
             f"{args.running} callers talking", "", f"`{meta['command']}` at {meta['commit']} on {meta['machine']}",
             "", f"storm connections: {res['storm_connections']} -> {res['storm_outcomes']} "
                 f"({clean} clean of {res['storm_connections']})", "",
             "| phase | turns | e2e p50 | e2e p95 | e2e max |", "|---|---|---|---|---|",
             f"| before storms | {b['n']} | {_ms(b['p50'])} | {_ms(b['p95'])} | {_ms(b['max'])} |",
             f"| during storms | {d['n']} | {_ms(d['p50'])} | {_ms(d['p95'])} | {_ms(d['max'])} |",
             "", f"failed turns: {res['failed_turns']}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if clean == res["storm_connections"] and res["failed_turns"] == 0 else 1


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f} ms"


if __name__ == "__main__":
    sys.exit(main())
