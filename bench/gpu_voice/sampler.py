"""Utilisation while a benchmark runs, sampled twice a second: the host's CPU (all cores, /proc/stat), the CPU time of
the server and of the bench client (/proc/<pid>/stat, whole processes; the server's with its child processes: the
engine's own process under --engine-process, tensor-parallel ranks) and the server's busiest threads, its children's
included (the event loop or the engine thread near 100 % means Python, not cores, is the limit), the GPU's
utilisation and memory (NVML, where present), and the server's engine counters (/metrics: running, waiting, decode
tok/s and the cumulative steps / step seconds / step sequences). Parsing and the window summary are pure functions."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import urllib.request
from pathlib import Path

ENGINE_PREFIX = "voicefast_engine_"


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat's first line (idle and iowait are not busy)."""
    fields = text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("not a /proc/stat text")
    vals = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(vals)
    return total - vals[3] - vals[4], total


def parse_pid_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat line."""
    rest = stat_text[stat_text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is rest[0]
    return int(rest[11]) + int(rest[12])


def parse_metrics(text: str) -> dict[str, float]:
    """{name without the voicefast_engine_ prefix: value} from a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line.startswith(ENGINE_PREFIX):
            name, _, value = line.partition(" ")
            try:
                out[name[len(ENGINE_PREFIX):]] = float(value)
            except ValueError:
                continue
    return out


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _process_ticks(pid: int | None) -> int | None:
    if pid is None:
        return None
    text = _read(f"/proc/{pid}/stat")
    return None if text is None else parse_pid_ticks(text)


def process_tree(pid: int | None) -> list[int]:
    """pid and its descendants (/proc/<pid>/task/<tid>/children), parents first; [] for None."""
    if pid is None:
        return []
    out, todo = [], [pid]
    while todo and len(out) < 256:
        p = todo.pop(0)
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            todo += [int(c) for c in (_read(f"/proc/{p}/task/{tid}/children") or "").split()]
    return out


def _tree_ticks(pid: int | None) -> int | None:
    """CPU ticks of pid and its live descendants (None if pid cannot be read)."""
    ticks = [_process_ticks(p) for p in process_tree(pid)]
    return None if not ticks or ticks[0] is None else sum(t for t in ticks if t is not None)


def _thread_ticks(pid: int | None) -> dict[int, int]:
    """Ticks per thread id of pid and its descendants (thread ids are unique on the host)."""
    out: dict[int, int] = {}
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            text = _read(f"/proc/{p}/task/{tid}/stat")
            if text:
                out[int(tid)] = parse_pid_ticks(text)
    return out


class _Gpu:
    """NVML where it is installed (nvidia-ml-py on the GPU image); otherwise no GPU figures."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML, no GPU, or no driver: GPU columns stay empty
            self.handle = None

    def read(self) -> tuple[float | None, float | None]:
        if self.handle is None:
            return None, None
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
            return float(util), round(mem, 1)
        except Exception:  # noqa: BLE001
            return None, None


class Sampler(threading.Thread):
    """`s = Sampler(server_pid, metrics_url); s.start(); ...; s.client_pid = p.pid; ...; s.stop()`; s.samples."""

    def __init__(self, server_pid: int | None, metrics_url: str | None, period_s: float = 0.5):
        super().__init__(name="gpu-voice-sampler", daemon=True)
        self.server_pid, self.metrics_url, self.period_s = server_pid, metrics_url, period_s
        self.client_pid: int | None = None
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._gpu = _Gpu()
        self._threads_prev: dict[int, int] = {}
        self._t_prev: float | None = None
        self.clk_tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self) -> dict:
        t = time.monotonic()
        stat = _read("/proc/stat")
        busy, total = parse_proc_stat(stat) if stat else (None, None)
        threads = _thread_ticks(self.server_pid)
        top: list[float] = []
        if self._t_prev is not None and threads:
            dt = max(t - self._t_prev, 1e-6)
            deltas = sorted(((v - self._threads_prev.get(k, v)) / self.clk_tck / dt * 100 for k, v in threads.items()),
                            reverse=True)
            top = [round(x, 1) for x in deltas[:3]]
        self._threads_prev, self._t_prev = threads, t
        gpu_util, gpu_mem = self._gpu.read()
        engine: dict[str, float] = {}
        if self.metrics_url:
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
                    engine = parse_metrics(r.read().decode())
            except OSError:
                engine = {}
        s = {"t": round(t, 3), "cpu_busy": busy, "cpu_total": total, "server_ticks": _tree_ticks(self.server_pid),
             "client_ticks": _process_ticks(self.client_pid), "client_pid": self.client_pid,
             "server_top_threads_pct": top, "gpu_util_pct": gpu_util, "gpu_mem_mib": gpu_mem, "engine": engine}
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            t0 = time.monotonic()
            with contextlib.suppress(Exception):  # a sampling hiccup must not end the benchmark
                self.sample()
            self._halt.wait(max(0.0, self.period_s - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def window_summary(samples: list[dict], t0: float, t1: float, clk_tck: int = 100) -> dict:
    """Utilisation over [t0, t1] from consecutive samples inside it: host CPU %, server / client cores, the
    server's busiest thread %, GPU %, and the engine's mean batch size, step time and busy fraction."""
    win = [s for s in samples if t0 <= s["t"] <= t1]
    cpu, srv, cli, top, gpu, batch, step_ms = [], [], [], [], [], [], []
    for a, b in zip(win, win[1:], strict=False):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        if None not in (a["cpu_busy"], b["cpu_busy"]) and b["cpu_total"] > a["cpu_total"]:
            cpu.append(100 * (b["cpu_busy"] - a["cpu_busy"]) / (b["cpu_total"] - a["cpu_total"]))
        if None not in (a["server_ticks"], b["server_ticks"]):
            srv.append((b["server_ticks"] - a["server_ticks"]) / clk_tck / dt)
        if None not in (a["client_ticks"], b["client_ticks"]) and a.get("client_pid") == b.get("client_pid"):
            cli.append((b["client_ticks"] - a["client_ticks"]) / clk_tck / dt)
        ea, eb = a.get("engine") or {}, b.get("engine") or {}
        if "steps" in ea and "steps" in eb and eb["steps"] > ea["steps"]:
            n = eb["steps"] - ea["steps"]
            batch.append((eb["step_seqs"] - ea["step_seqs"]) / n)
            step_ms.append(1000 * (eb["step_seconds"] - ea["step_seconds"]) / n)
    for s in win:
        if s["server_top_threads_pct"]:
            top.append(s["server_top_threads_pct"][0])
        if s["gpu_util_pct"] is not None:
            gpu.append(s["gpu_util_pct"])
    eng = [s.get("engine") or {} for s in win]
    first = next((e for e in eng if "steps" in e), None)
    last = next((e for e in reversed(eng) if "steps" in e), None)
    whole = {}
    if first and last and last["steps"] > first["steps"]:
        n = last["steps"] - first["steps"]
        span = max(t1 - t0, 1e-6)
        whole = {"steps": int(n), "batch_mean": _r((last["step_seqs"] - first["step_seqs"]) / n, 2),
                 "step_ms_mean": _r(1000 * (last["step_seconds"] - first["step_seconds"]) / n, 3),
                 "busy_pct": _r(100 * (last["step_seconds"] - first["step_seconds"]) / span)}
    return {
        "seconds": _r(t1 - t0), "samples": len(win),
        "cpu_host_pct": {"mean": _r(_mean(cpu)), "p95": _r(_pct(cpu, 95))},
        "server_cores": {"mean": _r(_mean(srv), 2), "p95": _r(_pct(srv, 95), 2)},
        "client_cores": {"mean": _r(_mean(cli), 2), "p95": _r(_pct(cli, 95), 2)},
        "server_top_thread_pct": {"mean": _r(_mean(top)), "p95": _r(_pct(top, 95))},
        "gpu_util_pct": {"mean": _r(_mean(gpu)), "p95": _r(_pct(gpu, 95))},
        "gpu_mem_mib_max": _r(max((s["gpu_mem_mib"] for s in win if s["gpu_mem_mib"] is not None), default=None)),
        "engine": whole | {"batch_p50": _r(_pct(batch, 50), 2), "batch_p95": _r(_pct(batch, 95), 2),
                           "step_ms_p50": _r(_pct(step_ms, 50), 3), "step_ms_p95": _r(_pct(step_ms, 95), 3),
                           "running_max": max((e.get("running", 0) for e in eng), default=None),
                           "waiting_max": max((e.get("waiting", 0) for e in eng), default=None),
                           "decode_tok_s_p50": _r(_pct([e["decode_tok_s"] for e in eng if "decode_tok_s" in e], 50))},
    }
