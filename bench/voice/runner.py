"""`voicefast bench voice`: closed-loop (concurrency sweep 1, 2, 4, ..., N) or open-loop (Poisson arrivals)
simulated callers against a Realtime server; writes turns.json, summary.md and PNG plots into --out."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from bench.voice.caller import Caller, CallerConfig, TurnRecord
from bench.voice.prompts import PROMPTS
from bench.voice.utterances import Utterance, load_wav_dir, synthesize
from bench.voice.wer import wer_fn

ROOT = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="voicefast bench voice", description=__doc__)
    ap.add_argument("--url", help="ws://host:port/v1/realtime of a running server; default: start `voicefast serve`")
    ap.add_argument("--transport", choices=("realtime", "twilio", "both"), default="realtime",
                    help="callers speak the Realtime API, Twilio Media Streams on /twilio (8 kHz mu-law, marks "
                         "acknowledged as a handset would), or both, level by level in the same run")
    ap.add_argument("--twilio-url", help="ws://host:port/twilio (default: /twilio on --url's host)")
    ap.add_argument("--twilio-secret", default=os.environ.get("VOICEFAST_TWILIO_SECRET"),
                    help="sent as customParameters.secret")
    ap.add_argument("--sessions", type=int, default=1, help="closed: max concurrency (sweeps 1,2,4..N); open: total")
    ap.add_argument("--turns", type=int, default=3, help="turns per conversation")
    ap.add_argument("--out", default="bench/out/voice", help="output directory")
    ap.add_argument("--mode", choices=("closed", "open"), default="closed")
    ap.add_argument("--rate", type=float, default=0.5, help="open loop: Poisson session arrivals per second")
    ap.add_argument("--levels", help="closed loop: comma-separated concurrency levels instead of 1,2,4..N")
    ap.add_argument("--wav-dir", help="folder of foo.wav + foo.txt (transcript) utterances instead of Piper prompts")
    ap.add_argument("--api-key", default=os.environ.get("VOICEFAST_API_KEY"), help="sent as Authorization: Bearer")
    ap.add_argument("--turn-timeout-s", type=float, default=60.0)
    ap.add_argument("--think-ms", type=int, default=300, help="caller's pause after the reply finished playing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra arguments for the `voicefast serve` it starts")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def sweep_levels(n: int) -> list[int]:
    levels, c = [], 1
    while c < n:
        levels.append(c)
        c *= 2
    return levels + [n]


def validate(args: argparse.Namespace) -> None:
    if args.sessions < 1 or args.turns < 1:
        raise ValueError("--sessions and --turns must be >= 1")
    if args.mode == "open" and args.rate <= 0:
        raise ValueError("--rate must be > 0 arrivals per second")
    for name in ("url", "twilio_url"):
        v = getattr(args, name, None)
        if v and not v.startswith(("ws://", "wss://")):
            raise ValueError(f"--{name.replace('_', '-')} must be a ws:// or wss:// URL, got {v!r}")


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="turn", desc="bench voice", file=sys.stderr)

    def update(self, rec: TurnRecord) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"c={rec.concurrency} e2e={rec.e2e_ms}ms {rec.status}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_caller(cfgs: dict[str, CallerConfig], transport: str, session_id: int, params: dict | None = None):
    if transport == "twilio":
        from bench.voice.twilio_caller import TwilioCaller

        return TwilioCaller(cfgs["twilio"], session_id, params)
    return Caller(cfgs["realtime"], session_id)


def level_label(c: int | str, transport: str, cfgs: dict) -> str:
    """Levels carry the transport when a run measures both (e.g. '2 twilio')."""
    return str(c) if len(cfgs) == 1 else f"{c} {transport}"


async def run_closed(cfgs: dict[str, CallerConfig], utts: list[Utterance], levels: list[int], turns: int, progress,
                     wer, params: dict | None = None) -> list[dict]:
    out: list[dict] = []
    next_id = 0
    for c in levels:
        for transport in cfgs:  # both transports at each level, back to back: same server, same load
            callers = [make_caller(cfgs, transport, next_id + i, params) for i in range(c)]
            next_id += c
            results = await asyncio.gather(*(cl.run(utts, turns, lambda c=c: c, progress.update, wer)
                                             for cl in callers), return_exceptions=True)
            for cl, r in zip(callers, results, strict=True):
                out += _records(cl, r, turns, c, level_label(c, transport, cfgs), utts, transport)
    return out


async def run_open(cfgs: dict[str, CallerConfig], utts: list[Utterance], n_sessions: int, rate: float, turns: int,
                   progress, wer, seed: int, params: dict | None = None) -> list[dict]:
    rng = random.Random(seed)
    active = 0
    level = f"open {rate:g}/s"

    async def one(i: int, delay_s: float):
        nonlocal active
        await asyncio.sleep(delay_s)
        active += 1
        transport = list(cfgs)[i % len(cfgs)]  # arrivals alternate between the transports
        cl = make_caller(cfgs, transport, i, params)
        try:
            r = await cl.run(utts, turns, lambda: active, progress.update, wer)
        except Exception as e:  # noqa: BLE001 - recorded as a failed session
            r = e
        finally:
            active -= 1
        return _records(cl, r, turns, None, level_label(level, transport, cfgs), utts, transport)

    t, arrivals = 0.0, []
    for _ in range(n_sessions):
        arrivals.append(t)
        t += rng.expovariate(rate)
    results = await asyncio.gather(*(one(i, d) for i, d in enumerate(arrivals)))
    return [r for rs in results for r in rs]


def _records(cl, r, turns: int, c: int | None, level: str, utts: list[Utterance], transport: str) -> list[dict]:
    if isinstance(r, BaseException):
        return [{"session": cl.session_id, "turn": 0, "concurrency": c, "level": level, "transport": transport,
                 "text": utts[cl.session_id % len(utts)].text, "e2e_ms": None,
                 "status": f"error: {type(r).__name__}: {r}"}]
    recs = []
    for rec in r:
        d = dataclasses.asdict(rec) | {"level": level, "transport": transport}
        if c is not None:
            d["concurrency"] = c
        if cl.errors:
            d["server_errors"] = cl.errors
        recs.append(d)
    return recs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`voicefast serve` on a free port, for runs without --url; stopped (and reaped) on exit."""

    def __init__(self, out_dir: Path, extra_args: str = "", start_timeout_s: float = 300.0):
        self.port = _free_port()
        self.log_path = out_dir / "server.log"
        self.cmd = [sys.executable, "-m", "voicefast", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    *shlex.split(extra_args)]
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def twilio_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/twilio"

    def __enter__(self) -> LocalServer:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"`{shlex.join(self.cmd)}` exited with {self.proc.returncode}; "
                                   f"see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"`voicefast serve` did not become healthy in {self.start_timeout_s:.0f} s; "
                           f"see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def twilio_url_for(url: str) -> str:
    """/twilio on the same host as a Realtime URL."""
    from urllib.parse import urlsplit

    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}/twilio"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} {platform.system()} {cpu}, {os.cpu_count()} CPUs"


def load_utterances(args: argparse.Namespace) -> list[Utterance]:
    return load_wav_dir(args.wav_dir) if args.wav_dir else synthesize(PROMPTS)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Runs the benchmark described by `args`; returns the turns.json document (also written into --out)."""
    validate(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    utts = load_utterances(args)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else sweep_levels(args.sessions)
    total = sum(levels) * args.turns if args.mode == "closed" else args.sessions * args.turns
    meta = {"command": shlex.join(["voicefast", "bench", "voice", *argv]), "url": args.url,
            "commit": _git_commit(), "machine": _machine(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": args.mode, "levels": levels if args.mode == "closed" else None,
            "rate_per_s": args.rate if args.mode == "open" else None, "turns_per_session": args.turns,
            "utterances": "wav-dir " + args.wav_dir if args.wav_dir else "piper prompts (bench/voice/prompts.py)"}

    transports = ["realtime", "twilio"] if args.transport == "both" else [args.transport]
    if args.mode == "closed":
        total *= len(transports)
    meta["transports"] = transports
    params = {"secret": args.twilio_secret} if args.twilio_secret else None

    def go(url: str, twilio_url: str) -> list[dict]:
        urls = {"realtime": url, "twilio": twilio_url}
        cfgs = {t: CallerConfig(url=urls[t], api_key=args.api_key, turn_timeout_s=args.turn_timeout_s,
                                think_ms=args.think_ms) for t in transports}
        progress = _Progress(total, args.quiet)
        try:
            if args.mode == "closed":
                return asyncio.run(run_closed(cfgs, utts, levels, args.turns, progress, wer_fn(), params))
            return asyncio.run(run_open(cfgs, utts, args.sessions, args.rate, args.turns, progress, wer_fn(),
                                        args.seed, params))
        finally:
            progress.close()

    if args.url:
        turns = go(args.url, args.twilio_url or twilio_url_for(args.url))
    else:
        with LocalServer(out_dir, args.serve_args) as srv:
            meta["url"] = srv.url + "  (started by the harness: " + shlex.join(srv.cmd[1:]) + ")"
            turns = go(srv.url, srv.twilio_url)
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc = {"meta": meta, "turns": turns}
    (out_dir / "turns.json").write_text(json.dumps(doc, indent=1))
    from bench.voice.stats import summary_markdown

    (out_dir / "summary.md").write_text(summary_markdown(meta, turns))
    if not args.no_plots:
        from bench.voice.plots import write_plots

        write_plots(turns, out_dir)
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        doc = run(args, argv)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        print(f"voicefast bench voice: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'turns.json'}, {out / 'summary.md'}" + ("" if args.no_plots else ", *.png"))
    bad = [t for t in doc["turns"] if t.get("status") != "ok"]
    return 1 if bad and len(bad) == len(doc["turns"]) else 0
