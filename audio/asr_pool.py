"""A small priority worker pool for ASR decodes shared by every session.

Finals outrank partials; a worker that takes a final also takes the other finals already queued (up to
`max_batch`) and decodes them in one batched call, so one busy session never stalls the others behind a queue
of partials. Jobs are concurrent.futures.Future objects: cancelling one that has not started removes it."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

log = logging.getLogger("voicefast.audio")

PRIORITY_FINAL = 0
PRIORITY_PARTIAL = 1

BatchFn = Callable[[list[np.ndarray]], list[str]]


class DecodePool:
    def __init__(self, decode_batch: BatchFn, *, workers: int = 1, max_batch: int = 4, name: str = "asr"):
        if workers < 1 or max_batch < 1:
            raise ValueError(f"workers and max_batch must be >= 1, got {workers}, {max_batch}")
        self._decode_batch = decode_batch
        self.max_batch = max_batch
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, audio: np.ndarray, priority: int = PRIORITY_FINAL) -> Future:
        if self._closed:
            raise RuntimeError("DecodePool is shut down")
        fut: Future = Future()
        self._q.put((priority, next(self._seq), audio, fut))
        return fut

    def pending(self) -> int:
        return self._q.qsize()

    def _take_batch(self, first) -> list:
        batch = [first]
        if first[0] != PRIORITY_FINAL:
            return batch
        held = []
        while len(batch) < self.max_batch:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item[3] is None or item[0] != PRIORITY_FINAL:
                held.append(item)  # shutdown marker or a partial: put back
                break
            batch.append(item)
        for item in held:
            self._q.put(item)
        return batch

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item[3] is None:  # shutdown marker
                return
            batch = [it for it in self._take_batch(item) if it[3].set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                texts = self._decode_batch([it[2] for it in batch])
            except BaseException as e:  # noqa: BLE001 - every waiter must hear about the failure
                log.error("ASR decode failed", exc_info=True)
                for it in batch:
                    it[3].set_exception(e)
                continue
            for it, text in zip(batch, texts, strict=True):
                it[3].set_result(text)

    def shutdown(self) -> None:
        """Stop the workers after the queued jobs (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._q.put((99, next(self._seq), None, None))
        for t in self._threads:
            t.join(timeout=30)
