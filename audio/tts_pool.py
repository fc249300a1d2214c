"""The TTS worker pool shared by every session, earliest deadline first.

A phrase's deadline is when its listener will need its audio: a response's first phrase is needed now (the caller
is waiting in silence), a later phrase only when the audio synthesized before it has played out. A FIFO pool lets a
new turn's first phrase wait behind other responses' later phrases, which their listeners will not hear for
seconds (at 32 callers on a 16-core host, TTS first audio p95 was 624 ms); this pool serves the earliest deadline
first and, among equal deadlines, the earliest submitted. Jobs are concurrent.futures.Future objects: cancelling
one that has not started drops it. Pure threading: no asyncio (SpeechOutput wraps the futures)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger("voicefast.audio")


class _Queue:
    """What the workers share: the heap and its condition. The workers hold this, never the pool, so a pool nobody
    references is collected and its workers end (as concurrent.futures' pools do)."""

    def __init__(self):
        self.heap: list[tuple[float, int, Future, Callable, tuple]] = []  # (deadline_s, seq, fut, fn, args)
        self.cv = threading.Condition()
        self.closed = False

    def close(self, cancel_futures: bool = False) -> None:
        with self.cv:
            self.closed = True
            if cancel_futures:
                for _, _, fut, _, _ in self.heap:
                    fut.cancel()
                self.heap.clear()
            self.cv.notify_all()


def _work(q: _Queue) -> None:
    while True:
        with q.cv:
            while not q.heap and not q.closed:
                q.cv.wait()
            if not q.heap:  # closed and drained
                return
            _, _, fut, fn, args = heapq.heappop(q.heap)
        if not fut.set_running_or_notify_cancel():
            continue  # cancelled while queued
        result = None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - delivered to whoever waits on the future
            fut.set_exception(e)
        else:
            fut.set_result(result)
        fut = fn = args = result = None  # drop the finished job's references while waiting for the next


class DeadlinePool:
    def __init__(self, workers: int = 1, *, name: str = "voicefast-tts"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._q = _Queue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=_work, args=(self._q,), name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        weakref.finalize(self, self._q.close)  # unreferenced: the workers finish what is queued and end

    @property
    def workers(self) -> int:
        return len(self._threads)

    def submit_by(self, deadline_s: float, fn: Callable, *args) -> Future:
        """Run fn(*args) on a worker; earlier deadline_s (any monotonic clock, e.g. time.monotonic()) first."""
        fut: Future = Future()
        q = self._q
        with q.cv:
            if q.closed:
                raise RuntimeError("DeadlinePool is shut down")
            heapq.heappush(q.heap, (float(deadline_s), next(self._seq), fut, fn, args))
            q.cv.notify()
        return fut

    def submit(self, fn: Callable, *args) -> Future:
        """Executor-compatible submit (loop.run_in_executor): no deadline, i.e. behind every dated job."""
        return self.submit_by(float("inf"), fn, *args)

    def queued(self) -> int:
        with self._q.cv:
            return len(self._q.heap)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; queued jobs still run unless cancel_futures (then they are cancelled)."""
        self._q.close(cancel_futures)
        if wait:
            for t in self._threads:
                t.join()
