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
from bench.voice.prompts import PAUSED, PROMPTS, SPEAKING_RATES, pause_ms
from bench.voice.utterances import Utterance, load_wav_dir, paused, synthesize
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
    ap.add_argument("--turn-modes", help="comma-separated turn detections to compare, each run separately: "
                    "server_vad:<silence_ms> or semantic_vad:<eagerness>, e.g. "
                    "server_vad:500,semantic_vad:auto,semantic_vad:high,semantic_vad:low (default: the server's own)")
    ap.add_argument("--paused", action="store_true", help="also run the paused set (a thinking pause inside an "
                    "unfinished phrase; one caller per mode) and report the premature-cut rate")
    ap.add_argument("--rates", default="1", help="Piper speaking rates of the complete questions, e.g. 1,0.8,1.2")
    ap.add_argument("--turns-per-level", type=int, help="turns per concurrency level, split over its callers "
                    "(overrides --turns; at least 1 per caller)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def parse_modes(spec: str | None) -> list[tuple[str, dict | None]]:
    """"server_vad:500,semantic_vad:auto" -> [(label, turn_detection), ...]; None -> the server's default."""
    if not spec:
        return [("default", None)]
    out = []
    for item in spec.split(","):
        kind, _, arg = item.strip().partition(":")
        if kind == "server_vad":
            ms = int(arg or 500)
            out.append((f"server_vad {ms}", {"type": "server_vad", "silence_duration_ms": ms}))
        elif kind == "semantic_vad":
            e = arg or "auto"
            if e not in ("low", "medium", "high", "auto"):
                raise ValueError(f"--turn-modes: unknown eagerness {e!r}")
            out.append((f"semantic_vad {e}", {"type": "semantic_vad", "eagerness": e}))
        else:
            raise ValueError(f"--turn-modes: {item!r} is not server_vad:<ms> or semantic_vad:<eagerness>")
    return out


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


def make_caller(cfgs: dict[str, CallerConfig], transport: str, session_id: int, params: dict | None = None,
                first_utterance: int | None = None):
    if transport == "twilio":
        from bench.voice.twilio_caller import TwilioCaller

        return TwilioCaller(cfgs["twilio"], session_id, params)
    return Caller(cfgs["realtime"], session_id, first_utterance)


def level_label(c: int | str, transport: str, cfgs: dict) -> str:
    """Levels carry the transport when a run measures both (e.g. '2 twilio')."""
    return str(c) if len(cfgs) == 1 else f"{c} {transport}"


async def run_closed(cfgs: dict[str, CallerConfig], utts: list[Utterance], levels: list[int], turns: int, progress,
                     wer, params: dict | None = None, *, label: str = "", turns_per_level: int | None = None,
                     first_id: int = 0) -> list[dict]:
    out: list[dict] = []
    next_id = first_id
    for c in levels:
        n = max(1, -(-turns_per_level // c)) if turns_per_level else turns
        base = next_id - first_id
        for transport in cfgs:  # both transports at each level, back to back: same server, same load
            callers = [make_caller(cfgs, transport, next_id + i, params, base + i) for i in range(c)]
            next_id += c
            results = await asyncio.gather(*(cl.run(utts, n, lambda c=c: c, progress.update, wer)
                                             for cl in callers), return_exceptions=True)
            for cl, r in zip(callers, results, strict=True):
                out += _records(cl, r, n, c, label + level_label(c, transport, cfgs), utts, transport)
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
        extra = shlex.split(extra_args)
        if "--connect-rate-per-address-per-min" not in extra:  # every simulated caller connects from 127.0.0.1:
            extra += ["--connect-rate-per-address-per-min", "0"]  # the per-address abuse limit would refuse them
        self.cmd = [sys.executable, "-m", "voicefast", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    *extra]
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
    if args.wav_dir:
        return load_wav_dir(args.wav_dir)
    rates = [float(x) for x in args.rates.split(",")]
    by_rate = [synthesize(PROMPTS, speaking_rate=r) for r in rates]
    # Turn i speaks prompt i (mod n) at rate i + i // n (mod rates): any n consecutive turns hear every prompt,
    # the rates take turns, and len(rates) * n turns hear every prompt at every rate.
    n = len(PROMPTS)
    return [by_rate[(i + i // n) % len(rates)][i % n] for i in range(n * len(rates))]


def load_paused() -> list[Utterance]:
    """The paused set (bench/voice/prompts.py), cycling through the speaking rates."""
    return [paused(a, b, pause_ms(i), speaking_rate=SPEAKING_RATES[i % len(SPEAKING_RATES)])
            for i, (a, b) in enumerate(PAUSED)]


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Runs the benchmark described by `args`; returns the turns.json document (also written into --out)."""
    validate(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    utts = load_utterances(args)
    modes = parse_modes(args.turn_modes)
    paused_utts = load_paused() if args.paused else []
    levels = [int(x) for x in args.levels.split(",")] if args.levels else sweep_levels(args.sessions)
    per_level = [max(1, -(-args.turns_per_level // c)) * c if args.turns_per_level else c * args.turns
                 for c in levels]
    total = (sum(per_level) if args.mode == "closed" else args.sessions * args.turns) * len(modes) \
        + len(paused_utts) * len(modes)
    meta = {"command": shlex.join(["voicefast", "bench", "voice", *argv]), "url": args.url,
            "commit": _git_commit(), "machine": _machine(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": args.mode, "levels": levels if args.mode == "closed" else None,
            "rate_per_s": args.rate if args.mode == "open" else None, "turns_per_session": args.turns,
            "utterances": "wav-dir " + args.wav_dir if args.wav_dir else
            f"piper prompts (bench/voice/prompts.py) at speaking rates {args.rates}",
            "turn_modes": [m for m, _ in modes], "paused": len(paused_utts),
            "turns_per_level": args.turns_per_level}

    transports = ["realtime", "twilio"] if args.transport == "both" else [args.transport]
    if "twilio" in transports and [m for m, _ in modes] != ["default"]:
        raise ValueError("--turn-modes applies to the realtime transport only: a Twilio call cannot send "
                         "session.update (its turn detection is the server's default)")
    total *= len(transports)
    meta["transports"] = transports
    params = {"secret": args.twilio_secret} if args.twilio_secret else None

    def go(url: str, twilio_url: str) -> list[dict]:
        urls = {"realtime": url, "twilio": twilio_url}
        progress = _Progress(total, args.quiet)
        out: list[dict] = []
        try:
            for k, (label, td) in enumerate(modes):
                cfgs = {t: CallerConfig(url=urls[t], api_key=args.api_key, turn_timeout_s=args.turn_timeout_s,
                                        think_ms=args.think_ms, turn_detection=td, mode=label) for t in transports}
                prefix = "" if label == "default" else f"{label}, c="
                first = 1000 * k
                if args.mode == "closed":
                    out += asyncio.run(run_closed(cfgs, utts, levels, args.turns, progress, wer_fn(), params,
                                                  label=prefix, turns_per_level=args.turns_per_level,
                                                  first_id=first))
                else:
                    out += asyncio.run(run_open(cfgs, utts, args.sessions, args.rate, args.turns, progress,
                                                wer_fn(), args.seed, params))
                if paused_utts:
                    out += asyncio.run(run_closed(cfgs, paused_utts, [1], len(paused_utts), progress, wer_fn(),
                                                  params, label=f"{label}, paused ", first_id=first + 999))
            return out
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
