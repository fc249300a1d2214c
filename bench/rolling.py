"""`voicefast bench rolling`: failed calls across a rolling restart. Two local replicas behind HAProxy
(deploy/haproxy.cfg), N simulated callers (bench/voice/caller.py: real-time speech, one call = a few turns, then
hang up and call again) through HAProxy the whole time, while replica r1 (or each of --restart) is restarted the
way deploy/rolling-restart.sh does it: SIGTERM (drain) -> exit -> start -> ready -> back in HAProxy's rotation.

A call FAILED if the caller saw any `error` event, a turn without a completed reply, a timeout, or any close other
than the documented drain close (1001 after a completed response; counted apart as `drain_closed`).

    voicefast bench rolling --callers 4 --turns 3 --fake --out bench/out/rolling       # replicas with fake models
    voicefast bench rolling --callers 4 --turns 3 --out bench/out/rolling              # real `voicefast serve`

--fake runs tests/fake_replica.py (the real server and drain, fake ASR/LLM/TTS): two replicas of the real models
do not fit a 2-core machine. Writes rolling.json and prints a summary; exit code 1 if any call failed."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bench.lb import LoadBalancer, Replica, fake_replica_cmd, free_port, real_replica_cmd
from bench.voice.caller import Caller, CallerConfig
from bench.voice.prompts import PROMPTS
from bench.voice.runner import _git_commit, _machine

DRAIN_CLOSE = re.compile(r"closed by the server \(1001\b")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="voicefast bench rolling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--callers", type=int, default=4, help="simulated callers, each calling again after hanging up")
    ap.add_argument("--turns", type=int, default=3, help="turns per call")
    ap.add_argument("--fake", action="store_true", help="replicas with the test fakes for the models")
    ap.add_argument("--restart", default="r1", help="replicas to restart one after the other: r1, r2 or r1,r2")
    ap.add_argument("--warmup-s", type=float, default=8.0, help="calls before the first restart")
    ap.add_argument("--settle-s", type=float, default=8.0, help="calls after the last replica is back")
    ap.add_argument("--drain-timeout-s", type=float, default=120.0, help="the replicas' --drain-timeout-s")
    ap.add_argument("--serve-args", default="", help="extra `voicefast serve` arguments (real replicas)")
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    ap.add_argument("--turn-timeout-s", type=float, default=60.0)
    ap.add_argument("--out", default="bench/out/rolling")
    return ap


def classify(records: list, errors: list[str], exc: BaseException | None, turns: int) -> str:
    """ok | drain_closed | failed (see the module doc)."""
    if exc is not None or errors:
        return "failed"
    statuses = [r.status for r in records]
    if len(statuses) == turns and all(s == "ok" for s in statuses):
        return "ok"
    if statuses and DRAIN_CLOSE.search(statuses[-1]) and all(s == "ok" for s in statuses[:-1]):
        return "drain_closed"
    return "failed"


async def caller_loop(slot: int, cfg: CallerConfig, utts, turns: int, stop: asyncio.Event, calls: list[dict],
                      t0: float) -> None:
    n = 0
    while not stop.is_set():
        cl = Caller(cfg, slot * 1000 + n)
        n += 1
        start = time.monotonic() - t0
        records, exc = [], None
        try:
            records = await cl.run(utts, turns, lambda: 0, lambda rec: None, lambda a, b: 0.0)
        except Exception as e:  # noqa: BLE001 - a failed call (e.g. refused upgrade): recorded
            exc = e
        m = re.match(r"This is (\w+)\.", records[0].reply_text) if records else None
        calls.append({"caller": slot, "start_s": round(start, 2), "end_s": round(time.monotonic() - t0, 2),
                      "outcome": classify(records, cl.errors, exc, turns), "replica": m.group(1) if m else None,
                      "turn_status": [r.status for r in records], "errors": cl.errors[:3],
                      "exception": None if exc is None else f"{type(exc).__name__}: {exc}"[:300]})


def restart(rep: Replica, lb: LoadBalancer, ready_timeout_s: float, t0: float) -> dict:
    """SIGTERM -> drained exit -> start -> ready -> UP in HAProxy; returns the times (s since the run began)."""
    ev = {"replica": rep.name, "sigterm_s": round(time.monotonic() - t0, 2),
          "live_sessions": rep.readyz()[1].get("sessions")}
    rep.terminate()
    ev["exit_code"] = rep.wait(timeout_s=ready_timeout_s)
    ev["exited_s"] = round(time.monotonic() - t0, 2)
    rep.start(ready_timeout_s)
    ev["ready_s"] = round(time.monotonic() - t0, 2)
    lb.wait_status({rep.name: "UP"}, timeout_s=60)
    ev["up_in_haproxy_s"] = round(time.monotonic() - t0, 2)
    return ev


async def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from bench.voice.utterances import synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    utts = synthesize(PROMPTS)
    make_cmd = fake_replica_cmd if args.fake else real_replica_cmd
    extra = [] if args.fake else shlex.split(args.serve_args)
    replicas = {}
    for name in ("r1", "r2"):
        port = free_port()
        replicas[name] = Replica(name, port, make_cmd(name, port, args.drain_timeout_s, *extra), out / f"{name}.log")
    lb = None
    try:
        for r in replicas.values():  # one at a time: real replicas load their models
            await asyncio.to_thread(r.start, args.ready_timeout_s)
        lb = LoadBalancer([replicas["r1"].addr, replicas["r2"].addr], out / "haproxy.log").start()
        await asyncio.to_thread(lb.wait_status, {"r1": "UP", "r2": "UP"}, 60)
        cfg = CallerConfig(url=lb.ws_url, turn_timeout_s=args.turn_timeout_s)
        stop, calls, t0 = asyncio.Event(), [], time.monotonic()
        tasks = [asyncio.create_task(caller_loop(i, cfg, utts, args.turns, stop, calls, t0))
                 for i in range(args.callers)]
        await asyncio.sleep(args.warmup_s)
        events = []
        for name in args.restart.split(","):
            events.append(await asyncio.to_thread(restart, replicas[name], lb, args.ready_timeout_s, t0))
        await asyncio.sleep(args.settle_s)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        if lb is not None:
            lb.stop()
        for r in replicas.values():
            r.stop()
    outcomes = Counter(c["outcome"] for c in calls)
    doc = {"meta": {"command": shlex.join(["voicefast", "bench", "rolling", *argv]), "commit": _git_commit(),
                    "machine": _machine(), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                    "replicas": "fake models (tests/fake_replica.py)" if args.fake else "voicefast serve",
                    "callers": args.callers, "turns_per_call": args.turns},
           "restarts": events, "calls": calls,
           "summary": {"calls": len(calls), "ok": outcomes["ok"], "failed": outcomes["failed"],
                       "drain_closed": outcomes["drain_closed"],
                       "per_replica": dict(Counter(c["replica"] for c in calls if c["replica"]))}}
    (out / "rolling.json").write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.callers < 1 or args.turns < 1 or not set(args.restart.split(",")) <= {"r1", "r2"}:
        print("voicefast bench rolling: --callers and --turns must be >= 1, --restart r1, r2 or r1,r2",
              file=sys.stderr)
        return 2
    doc = asyncio.run(run(args, argv))
    s = doc["summary"]
    for ev in doc["restarts"]:
        print(f"{ev['replica']}: SIGTERM at {ev['sigterm_s']} s with {ev['live_sessions']} live call(s), drained and "
              f"exited ({ev['exit_code']}) at {ev['exited_s']} s, ready {ev['ready_s']} s, back in HAProxy "
              f"{ev['up_in_haproxy_s']} s")
    print(f"calls: {s['calls']}  ok: {s['ok']}  failed: {s['failed']}  drain-closed (1001): {s['drain_closed']}  "
          f"per replica: {s['per_replica']}")
    for c in doc["calls"]:
        if c["outcome"] == "failed":
            print(f"  FAILED call of caller {c['caller']} at {c['start_s']} s: {c['turn_status']} {c['errors']} "
                  f"{c['exception'] or ''}")
    print(f"wrote {Path(args.out) / 'rolling.json'}")
    return 1 if s["failed"] else 0
