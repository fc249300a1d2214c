"""This process's resource counters, for /metrics and the soak benchmark: RSS, open fds, threads, event-loop tasks
and glibc malloc's view of the heap (mallinfo2: bytes in use vs. held free in arenas, which tells a leak from
allocator fragmentation). Linux; counters that cannot be read are omitted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading

from audio.heap import malloc_stats


def snapshot() -> dict[str, int]:
    out: dict[str, int] = {"threads": threading.active_count()}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
        out["open_fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    with contextlib.suppress(RuntimeError):  # no running loop in this thread
        out["event_loop_tasks"] = len(asyncio.all_tasks())
    out.update({f"malloc_{k}_bytes": v for k, v in malloc_stats().items()})
    return out
