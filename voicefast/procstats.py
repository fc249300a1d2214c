"""This process's resource counters, for /metrics and the soak benchmark: RSS, open fds, threads, event-loop tasks
and glibc malloc's view of the heap (mallinfo2: bytes in use vs. held free in arenas, which tells a leak from
allocator fragmentation). Linux; counters that cannot be read are omitted."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import threading


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _libc_mallinfo2()


def malloc_stats() -> dict[str, int]:
    """glibc heap: `in_use` (allocated), `free` (held by malloc, not returned to the OS), `mmapped` (large blocks)."""
    if _MALLINFO2 is None:
        return {}
    m = _MALLINFO2()
    return {"in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd, "arena": m.arena}


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
