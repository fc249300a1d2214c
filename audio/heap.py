"""glibc malloc's view of the heap, and giving its free memory back to the OS. Native stages (onnxruntime without
its arena, CTranslate2) allocate and free large tensors through malloc; glibc keeps freed memory for reuse, and
after a few long Piper phrases that pool held 150-230 MiB. trim_if_free_over() releases it when it grows past a
threshold (malloc_trim costs ~8 ms and a round of page faults, so not after every call). No-ops off glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None


_LIBC = _libc()
_TRIM_LOCK = threading.Lock()


def malloc_stats() -> dict[str, int]:
    """`in_use` (allocated), `free` (held by malloc for reuse), `mmapped` (large blocks), `arena` (heap size)."""
    if _LIBC is None:
        return {}
    m = _LIBC.mallinfo2()
    return {"in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd, "arena": m.arena}


def trim_if_free_over(threshold_bytes: int) -> bool:
    """malloc_trim(0) when malloc holds more than threshold_bytes of free memory; True if it trimmed."""
    if _LIBC is None:
        return False
    with _TRIM_LOCK:
        if _LIBC.mallinfo2().fordblks <= threshold_bytes:
            return False
        _LIBC.malloc_trim(0)
        return True
