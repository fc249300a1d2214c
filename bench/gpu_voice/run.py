"""The voice stack on this host at 1..64 callers (issue 14): start `voicefast serve` once (the embedded models, or
the GLM-4-9B-shaped random checkpoint), drive `voicefast bench voice --url` once per caller level (client and server
on the same host, real-time-paced callers), sample CPU / GPU / engine all along, and write per level voice-to-voice
p50/p90/p95, each stage's p50/p95, engine batch size and step time, GPU and CPU utilisation, plus the stage plot and
the latency-vs-callers plot. Everything lands in --out as 5 files named after --tag (a device call returns at most
8 files): <tag>.json (raw: meta, host, every turn, every sample, per-level summaries), <tag>.md, <tag>_server.log,
<tag>_stages.png, <tag>_latency.png. The JSON and the summary are rewritten after every level, so a call that runs
out of time keeps the levels it finished; a level that would not fit in --budget-s is skipped and recorded.

    python3 -m bench.gpu_voice.run --model embedded --levels 1,8,32,64 --out $OUT --tag emb
    python3 -m bench.gpu_voice.run --model glm4-9b --levels 1,8 --out $OUT --tag glm_a

With the turn-taking work merged (`bench voice --turn-modes`), the callers ask for --turn-mode (default
semantic_vad:auto, the mode the latency target is for); otherwise they use the server's default and say so."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from bench.gpu_voice.sampler import Sampler, window_summary
from bench.voice.stats import percentile

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("embedded", "glm4-9b")
STAGE_METRICS = ("end_of_turn_delay_ms", "asr_final_ms", "llm_ttft_ms", "tts_first_audio_ms", "server_other_ms",
                 "e2e_server_ms", "network_client_ms")
FIRST_CYCLE_S = {"embedded": 12.0, "glm4-9b": 14.0}  # a caller's turn (speak, wait, hear the reply, pause): a guess
NOISE_NOTE = ("GLM-4-9B-0414 shape with RANDOM bf16 weights and a synthetic tokenizer: its words are noise, its "
              "timing is real (replies capped at {n} tokens)")


def turns_per_caller(callers: int, turns_per_level: int, min_per_caller: int = 2) -> int:
    """Enough turns per caller for `turns_per_level` turns at this level, and at least `min_per_caller` (a caller's
    first turn starts with every other caller's; later ones are spread out)."""
    if callers < 1 or turns_per_level < 1 or min_per_caller < 1:
        raise ValueError("callers, turns_per_level and min_per_caller must be >= 1")
    return max(min_per_caller, math.ceil(turns_per_level / callers))


def level_summary(turns: list[dict]) -> dict:
    """Per-level figures from bench voice turn records: voice-to-voice p50/p90/p95/p99 (all turns, and the
    steady ones after each caller's first), each stage's p50/p95, reply length and pacing checks."""
    ok = [t for t in turns if t.get("status") == "ok" and t.get("e2e_ms") is not None]

    def q(name: str, rows: list[dict], qs=(50, 95)) -> dict:
        vals = [t[name] for t in rows if t.get(name) is not None]
        return {f"p{x}": _r(percentile(vals, x)) for x in qs} | {"n": len(vals)}

    statuses: dict[str, int] = {}
    for t in turns:
        key = t.get("status", "?") if t.get("status") == "ok" else t.get("status", "?").split(":")[0]
        statuses[key] = statuses.get(key, 0) + 1
    wers = [t["wer"] for t in ok if t.get("wer") is not None]
    return {"turns": len(turns), "ok": len(ok), "statuses": statuses,
            "e2e_ms": q("e2e_ms", ok, (50, 90, 95, 99)),
            "e2e_ms_steady": q("e2e_ms", [t for t in ok if t.get("turn", 0) > 0], (50, 90, 95)),
            "stages": {m: q(m, ok) for m in STAGE_METRICS},
            "reply_tok_s_p50": _r(percentile([t["tokens_per_s"] for t in ok if t.get("tokens_per_s")], 50)),
            "reply_tokens_p50": _r(percentile([t["llm_tokens"] for t in ok if t.get("llm_tokens") is not None], 50)),
            "reply_audio_ms_p50": _r(percentile([t["reply_audio_ms"] for t in ok if t.get("reply_audio_ms")], 50)),
            "wer_mean": round(sum(wers) / len(wers), 4) if wers else None,
            "anchor_lag_ms_p95": _r(percentile([t["anchor_lag_ms"] for t in ok if t.get("anchor_lag_ms") is not None],
                                               95)),
            "early_audio": sum(bool(t.get("early_audio")) for t in turns)}


def _r(x, nd: int = 1):
    return None if x is None else round(float(x), nd)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`voicefast serve` in its own process group, ready once /readyz answers 200; log in `log_path`."""

    def __init__(self, args: list[str], log_path: Path, env: dict, cmd_template: str | None = None):
        self.port = _free_port()
        if cmd_template:  # another server (tests: tests/fake_replica.py), started the same way
            self.cmd = [sys.executable, *shlex.split(cmd_template.format(port=self.port))]
        else:
            self.cmd = [sys.executable, "-m", "voicefast", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        *args]
        self.log_path, self.env = log_path, env
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
                                     start_new_session=True)
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`voicefast serve` exited with {self.proc.returncode}:\n{self.log_tail(3000)}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"`voicefast serve` not ready after {timeout_s:.0f} s:\n{self.log_tail(3000)}")

    def log_tail(self, n: int) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def startup_report(log_text: str) -> dict:
    """The server's start-up lines: each stage's model and the host line (voicefast.host.HostReport.describe)."""
    out = {}
    for line in log_text.splitlines():
        m = re.match(r"\s+(VAD|TURN|ASR|LLM|TTS)\s+(.*)", line)
        if m:
            out[m.group(1).lower()] = m.group(2).strip()
        elif line.strip().startswith("host: "):
            out["host"] = line.strip()[6:]
    return out


def _machine() -> str:
    from bench.voice.runner import _machine as cpu_machine

    gpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    return cpu_machine() + (f"; GPU {gpu}" if gpu else "")


def _commit(given: str | None) -> str | None:
    from bench.voice.runner import _git_commit

    return given or _git_commit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_voice.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="embedded")
    ap.add_argument("--levels", default="1,8,32,64", help="comma-separated concurrent callers, one run each")
    ap.add_argument("--turns-per-level", type=int, default=10, help="at least this many turns per level")
    ap.add_argument("--min-turns-per-caller", type=int, default=2)
    ap.add_argument("--turn-mode", default="auto", help="bench voice --turn-modes value (semantic_vad:auto, "
                    "server_vad:500, ...); auto: semantic_vad:auto where supported, else the server's default")
    ap.add_argument("--paused", action="store_true", help="also run the paused-speech set once (1 caller) where "
                    "bench voice has it")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True, help="file-name stem of the outputs (letters, digits, _ and -)")
    ap.add_argument("--commit")
    ap.add_argument("--ckpt-dir", default="/tmp/vf_glm4_9b", help="glm4-9b: where the random checkpoint lives")
    ap.add_argument("--reply-tokens", type=int, default=12, help="glm4-9b: --max-output-tokens. A random token of "
                    "the synthetic vocabulary decodes to ~0.46 s of speech (long pseudo-words), so 12 tokens give "
                    "~5.5 s of reply audio: a real one-sentence reply (~20-24 GLM tokens), as the persona asks")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--serve-args", default="", help="extra `voicefast serve` arguments")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting levels past this (device calls "
                    "end at 600 s)")
    ap.add_argument("--turn-timeout-s", type=float, default=30.0)
    ap.add_argument("--server-cmd", help=argparse.SUPPRESS)  # tests: python arguments of another server, {port}
    return ap


class Run:
    def __init__(self, a: argparse.Namespace):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", a.tag):
            raise ValueError(f"--tag must be letters, digits, '_' and '-', got {a.tag!r}")
        self.a = a
        self.t_start = time.monotonic()
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f"vf_{a.tag}_"))
        self.levels = [int(x) for x in a.levels.split(",") if x.strip()]
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"--levels must be positive integers, got {a.levels!r}")
        from bench.voice.runner import build_parser as bench_parser
        from voicefast.serve import build_parser as serve_parser

        self.bench_flags, self.serve_flags = option_strings(bench_parser()), option_strings(serve_parser())
        if a.turn_mode == "auto":
            self.turn_mode = "semantic_vad:auto" if "--turn-modes" in self.bench_flags else None
        else:
            if "--turn-modes" not in self.bench_flags:
                raise ValueError("--turn-mode needs `voicefast bench voice --turn-modes` (the turn-taking work)")
            self.turn_mode = a.turn_mode
        self.doc: dict = {"meta": {
            "what": "voicefast on a GPU host: `voicefast bench voice --url` per caller level against one "
                    "`voicefast serve`, client and server on the same host (bench/gpu_voice/run.py)",
            "command": shlex.join([sys.executable, "-m", "bench.gpu_voice.run", *sys.argv[1:]]),
            "commit": _commit(a.commit), "machine": _machine(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "model": a.model, "tag": a.tag,
            "turn_mode": self.turn_mode or "server default (server_vad, silence_duration_ms 500)",
            "levels": self.levels, "turns_per_level": a.turns_per_level,
            "note": NOISE_NOTE.format(n=a.reply_tokens) if a.model == "glm4-9b" else
            "embedded models: Silero VAD, Whisper tiny.en (CTranslate2), SmolLM2-135M-Instruct, Piper joe-medium"},
            "levels": [], "turns": [], "samples": [], "skipped": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def serve_args(self, host_max_sessions: int | None = None) -> list[str]:
        """The server's flags. Its thread counts and pools stay the host's defaults (what is measured); only where
        this host's default max_sessions is below the largest level are sessions and sequences raised to it."""
        a = self.a
        args = ["--max-model-len", str(a.max_model_len), "--drain-timeout-s", "5"]
        if a.model == "glm4-9b":
            args += ["--llm-model", a.ckpt_dir, "--max-output-tokens", str(a.reply_tokens)]
        extra = shlex.split(a.serve_args)
        if "--connect-rate-per-address-per-min" in self.serve_flags and "--connect-rate-per-address-per-min" \
                not in extra:  # every caller connects from 127.0.0.1: the abuse limit would refuse a 64-caller level
            args += ["--connect-rate-per-address-per-min", "0"]
        need = max(self.levels)
        if host_max_sessions is not None and host_max_sessions < need and "--max-sessions" not in extra:
            args += ["--max-sessions", str(need), "--max-num-seqs", str(need)]
            self.doc["meta"]["raised_limits"] = f"host default max_sessions {host_max_sessions} < {need} callers"
        return args + extra

    def prepare_model(self) -> None:
        if self.a.model != "glm4-9b":
            return
        from bench.gpu_voice.random_llm import ensure_checkpoint

        t0 = time.monotonic()
        import torch

        m = ensure_checkpoint(self.a.ckpt_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        self.doc["meta"]["checkpoint"] = {k: v for k, v in m.items() if k != "config"} | {
            "seconds": round(time.monotonic() - t0, 1)}
        print(f"[gpu_voice] checkpoint {self.a.ckpt_dir}: {self.doc['meta']['checkpoint']}", flush=True)

    def client_cmd(self, url: str, callers: int, turns: int, out_dir: Path, *, paused: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "voicefast", "bench", "voice", "--url", url, "--levels", str(callers),
               "--turns", str(turns), "--out", str(out_dir), "--no-plots", "--quiet",
               "--turn-timeout-s", str(self.a.turn_timeout_s)]
        if self.turn_mode:
            cmd += ["--turn-modes", self.turn_mode]
        if paused:
            cmd.append("--paused")
        return cmd

    def run_client(self, sampler: Sampler, url: str, callers: int, turns: int, label: str, *,
                   paused: bool = False) -> list[dict] | None:
        d = self.work / f"level_{label}"
        cmd = self.client_cmd(url, callers, turns, d, paused=paused)
        limit = max(10.0, self.a.budget_s - self.elapsed())
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sampler.client_pid = p.pid
        try:
            log, _ = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            log, _ = p.communicate()
            self.doc["skipped"].append({"level": label, "why": f"client killed at the budget ({limit:.0f} s)"})
            print(f"[gpu_voice] level {label}: killed at the budget", flush=True)
            return None
        finally:
            sampler.client_pid = None
        t1 = time.monotonic()
        turns_file = d / "turns.json"
        if not turns_file.exists():
            self.doc["skipped"].append({"level": label, "why": f"client failed ({p.returncode}): "
                                        + log.decode(errors="replace")[-1500:]})
            print(f"[gpu_voice] level {label}: client failed\n{log.decode(errors='replace')[-1500:]}", flush=True)
            return None
        rows = json.loads(turns_file.read_text())["turns"]
        for r in rows:
            r["callers"], r["level_label"] = callers, label
        util = window_summary(sampler.samples, t0, t1, sampler.clk_tck)
        summary = {"callers": callers, "label": label, "turns_per_caller": turns, "t0": round(t0, 3),
                   "t1": round(t1, 3), **level_summary(rows), "util": util}
        self.doc["levels"].append(summary)
        self.doc["turns"] += rows
        e, st = summary["e2e_ms"], summary["stages"]
        print(f"[gpu_voice] {label}: {summary['ok']}/{summary['turns']} ok, e2e p50/p90/p95 {e['p50']}/{e['p90']}/"
              f"{e['p95']} ms, asr p95 {st['asr_final_ms']['p95']}, ttft p95 {st['llm_ttft_ms']['p95']}, "
              f"tts p95 {st['tts_first_audio_ms']['p95']}; batch {util['engine'].get('batch_mean')}, step "
              f"{util['engine'].get('step_ms_mean')} ms, GPU {util['gpu_util_pct']['mean']} %, CPU "
              f"{util['cpu_host_pct']['mean']} %, server {util['server_cores']['mean']} cores, top thread "
              f"{util['server_top_thread_pct']['p95']} % ({t1 - t0:.0f} s)", flush=True)
        return rows

    def write(self, sampler: Sampler | None, server: Server | None) -> None:
        from bench.gpu_voice.report import run_markdown

        if sampler is not None:
            self.doc["samples"] = list(sampler.samples)
        self.doc["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.doc["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        tag = self.a.tag
        (self.out / f"{tag}.json").write_text(json.dumps(self.doc, indent=None, separators=(",", ":")))
        (self.out / f"{tag}.md").write_text(run_markdown(self.doc))
        if server is not None:
            (self.out / f"{tag}_server.log").write_text(server.log_tail(1 << 20))

    def plots(self) -> None:
        ok = [t for t in self.doc["turns"] if t.get("status") == "ok" and t.get("e2e_ms") is not None]
        if not ok:
            return
        from bench.voice.plots import write_plots

        turns = [dict(t, level=str(t["callers"]), concurrency=t["callers"]) for t in self.doc["turns"]
                 if t.get("level_label") != "paused"]
        d = self.work / "plots"
        d.mkdir(exist_ok=True)
        write_plots(turns, d)
        shutil.copyfile(d / "stage_breakdown.png", self.out / f"{self.a.tag}_stages.png")
        shutil.copyfile(d / "latency_vs_concurrency.png", self.out / f"{self.a.tag}_latency.png")

    def main(self) -> int:
        a = self.a
        missing = [m for m in ("faster_whisper", "ctranslate2", "piper", "websockets", "gguf")
                   if importlib.util.find_spec(m) is None]
        if missing and not a.server_cmd:
            raise RuntimeError(f"{', '.join(missing)} not importable: on a GPU machine, stage and install first "
                               f"(docs/gpu.md); a machine that was given back has lost /tmp/site")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.prepare_model()
        from voicefast.host import detect_host, resolve_host

        _, host = resolve_host({}, detect_host())
        server = Server(self.serve_args(host.values["max_sessions"]), self.work / "server.log", self.env,
                        a.server_cmd)
        sampler = None
        try:
            ready_s = server.start(timeout_s=max(60.0, a.budget_s - self.elapsed() - 60))
            self.doc["meta"]["server"] = {"command": shlex.join(server.cmd[1:]), "ready_s": round(ready_s, 1),
                                          **startup_report(server.log_tail(1 << 16))}
            print(f"[gpu_voice] server ready in {ready_s:.0f} s: {self.doc['meta']['server']}", flush=True)
            sampler = Sampler(server.proc.pid, server.base + "/metrics")
            sampler.start()
            url = f"ws://127.0.0.1:{server.port}/v1/realtime"
            cycle_s = FIRST_CYCLE_S[a.model]
            for c in self.levels:
                n = turns_per_caller(c, a.turns_per_level, a.min_turns_per_caller)
                need = n * cycle_s * 1.3 + 20
                if self.elapsed() + need > a.budget_s:
                    self.doc["skipped"].append({"level": str(c), "why": f"needs ~{need:.0f} s, "
                                                f"{a.budget_s - self.elapsed():.0f} s left in --budget-s"})
                    print(f"[gpu_voice] level {c}: skipped (needs ~{need:.0f} s)", flush=True)
                    continue
                t0 = time.monotonic()
                rows = self.run_client(sampler, url, c, n, str(c))
                if rows:
                    cycle_s = max(cycle_s * 0.5, (time.monotonic() - t0 - 8) / n)
                self.write(sampler, server)
            if a.paused:
                if "--paused" not in self.bench_flags:
                    self.doc["skipped"].append({"level": "paused", "why": "bench voice has no --paused here"})
                else:
                    self.run_client(sampler, url, 1, 1, "paused", paused=True)
        finally:
            if sampler is not None:
                sampler.stop()
            rc = server.stop()
            self.doc["meta"]["server_exit"] = rc
            self.write(sampler, server)
        self.plots()
        print(f"[gpu_voice] wrote {self.out}/{a.tag}.* in {self.elapsed():.0f} s", flush=True)
        return 0 if self.doc["levels"] else 1


def glue_serve_args(argv: list[str]) -> list[str]:
    """`--serve-args '--engine-process'`: argparse takes a lone value that starts with "--" for an option (only one
    with a space, '--asr-device cuda', passes), so the value is glued on: `--serve-args=--engine-process`."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--serve-args" and i + 1 < len(argv):
            out.append(f"--serve-args={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(glue_serve_args(sys.argv[1:] if argv is None else argv))
    try:
        return Run(a).main()
    except (RuntimeError, ValueError, OSError) as e:
        print(f"[gpu_voice] FAILED: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
