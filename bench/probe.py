"""Shared pieces of the hardening benchmarks (stall, overload, soak): a server's resource counters read from its
/metrics (and /proc when it runs here), a pinger that measures how long another session waits for the event loop,
and small statistics helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from dataclasses import dataclass, field


def http_url(ws_url: str) -> str:
    """ws://host:port/v1/realtime -> http://host:port"""
    scheme, rest = ws_url.split("://", 1)
    return ("https" if scheme == "wss" else "http") + "://" + rest.split("/", 1)[0]


def read_metrics(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Unlabelled samples of GET /metrics (name -> value); labelled ones keep their labels in the name."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def proc_counters(pid: int) -> dict[str, float]:
    """RSS, threads and fds of a local process, from /proc (the server's own view may lag a scrape)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        import os

        out["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


SAMPLE_KEYS = {  # sample field -> /metrics name
    "rss_bytes": "voicefast_process_rss_bytes", "open_fds": "voicefast_process_open_fds",
    "threads": "voicefast_process_threads", "tasks": "voicefast_process_event_loop_tasks",
    "malloc_in_use_bytes": "voicefast_process_malloc_in_use_bytes",
    "malloc_free_bytes": "voicefast_process_malloc_free_bytes",
    "malloc_mmapped_bytes": "voicefast_process_malloc_mmapped_bytes",
    "free_blocks": "voicefast_engine_free_blocks", "total_blocks": "voicefast_engine_total_blocks",
    "engine_running": "voicefast_engine_running", "engine_waiting": "voicefast_engine_waiting",
    "sessions": "voicefast_active_sessions",
}


def sample(base_url: str, pid: int | None = None) -> dict[str, float]:
    """One reading of every counter the soak tracks (/proc wins over /metrics for RSS, threads and fds)."""
    m = read_metrics(base_url)
    s = {k: m[name] for k, name in SAMPLE_KEYS.items() if name in m}
    if pid is not None:
        s.update(proc_counters(pid))
    s["t"] = time.time()
    return s


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))]


def summary(values: list[float]) -> dict[str, float | None]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values) if values else None}


@dataclass
class Pinger:
    """Another session that asks the server something trivial every `interval_s` (conversation.item.retrieve of
    an id that does not exist: answered at once with an `error`) and records the round trips, i.e. how long a
    session waits while the event loop is busy elsewhere."""

    url: str
    interval_s: float = 0.01
    headers: dict | None = None
    rtts_ms: list[tuple[float, float]] = field(default_factory=list)  # (send time, round trip ms)

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        async with connect(self.url, subprotocols=["realtime"], additional_headers=self.headers,
                           max_size=None) as ws:
            await ws.recv()  # session.created
            n = 0
            while not stop.is_set():
                n += 1
                t0 = time.perf_counter()
                await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": f"ping_{n}"}))
                while True:
                    ev = json.loads(await ws.recv())
                    if ev["type"] == "error" and f"ping_{n}" in ev["error"].get("message", ""):
                        break
                self.rtts_ms.append((time.time(), (time.perf_counter() - t0) * 1000))
                await asyncio.sleep(self.interval_s)

    def between(self, t0: float, t1: float) -> list[float]:
        return [ms for t, ms in self.rtts_ms if t0 <= t <= t1]
