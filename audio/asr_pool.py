"""A small priority worker pool for ASR decodes shared by every session, fair across sessions.

Each job belongs to an `owner` (a session; None = a lane of its own). Jobs wait in per-owner FIFO lanes, at most
`max_queued_per_owner` per owner and priority (more raises PoolBusy), and lanes are served round-robin: a worker
takes the first job of the lane served longest ago, so one busy session never starves the others, however much
it submits. Finals outrank partials; a worker that takes a final also takes the first final of other lanes (up to
`max_batch`, one per owner) and decodes them in one batched call. `replace=KEY` first cancels the owner's queued
jobs of that priority submitted with the same key (a newer partial, or a newer check's final of the same utterance,
supersedes the older one; `replace=True` is one key like any other; False/None: never replaced). Jobs are
concurrent.futures.Future objects: cancelling one that has not started drops it (and its audio)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

log = logging.getLogger("voicefast.audio")

PRIORITY_FINAL = 0
PRIORITY_PARTIAL = 1

BatchFn = Callable[[list], list[str]]


class PoolBusy(RuntimeError):
    """An owner already has max_queued_per_owner jobs of that priority waiting."""


@dataclass(slots=True, eq=False)
class _Job:
    payload: object  # what decode_batch gets (an audio array, or whatever the caller's batch function takes)
    fut: Future
    key: object  # the replace key it was submitted with (None: not replaceable)


class DecodePool:
    def __init__(self, decode_batch: BatchFn, *, workers: int = 1, max_batch: int = 4, max_queued_per_owner: int = 4,
                 name: str = "asr"):
        if workers < 1 or max_batch < 1 or max_queued_per_owner < 1:
            raise ValueError(f"workers, max_batch and max_queued_per_owner must be >= 1, got {workers}, "
                             f"{max_batch}, {max_queued_per_owner}")
        self._decode_batch = decode_batch
        self.max_batch = max_batch
        self.max_queued_per_owner = max_queued_per_owner
        # priority -> owner -> lane; OrderedDict order = round-robin order (front: served longest ago)
        self._lanes: dict[int, OrderedDict[object, deque[_Job]]] = {PRIORITY_FINAL: OrderedDict(),
                                                                   PRIORITY_PARTIAL: OrderedDict()}
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, payload, priority: int = PRIORITY_FINAL, *, owner: object = None,
               replace: object = False) -> Future:
        """Queue a job; raises PoolBusy if `owner` already has max_queued_per_owner jobs of this priority waiting."""
        if priority not in self._lanes:
            raise ValueError(f"priority must be PRIORITY_FINAL or PRIORITY_PARTIAL, got {priority}")
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("DecodePool is shut down")
            lane_key = object() if owner is None else owner
            key = None if replace is None or replace is False else replace
            lanes = self._lanes[priority]
            lane = lanes.get(lane_key)
            if lane is not None:
                for job in list(lane):
                    if job.fut.cancelled() or (key is not None and job.key == key and job.fut.cancel()):
                        lane.remove(job)
                if len(lane) >= self.max_queued_per_owner:
                    raise PoolBusy(f"{len(lane)} decodes of this owner are already waiting")
            else:
                lane = lanes[lane_key] = deque()
            lane.append(_Job(payload, fut, key))
            self._cv.notify()
        return fut

    def pending(self, owner: object = None) -> int:
        """Jobs waiting (not started, not cancelled): all of them, or one owner's."""
        with self._cv:
            return sum(not j.fut.cancelled() for lanes in self._lanes.values() for k, lane in lanes.items()
                       if owner is None or k == owner for j in lane)

    def owners_waiting(self) -> int:
        """Lanes held (bounded by the owners with work waiting: empty lanes are dropped)."""
        with self._cv:
            return sum(len(lanes) for lanes in self._lanes.values())

    def _take_batch(self) -> list[_Job]:
        """Under the lock: the next jobs to run, round-robin over lanes, finals first (one per owner)."""
        for priority, lanes in self._lanes.items():
            batch: list[_Job] = []
            for key in list(lanes):
                lane = lanes[key]
                while lane and lane[0].fut.cancelled():
                    lane.popleft()
                if not lane:
                    del lanes[key]
                    continue
                batch.append(lane.popleft())
                if lane:
                    lanes.move_to_end(key)  # served: to the back of the round
                else:
                    del lanes[key]
                if priority != PRIORITY_FINAL or len(batch) >= self.max_batch:
                    break
            if batch:
                return batch
        return []

    def _work(self) -> None:
        while True:
            with self._cv:
                batch = self._take_batch()
                while not batch:
                    if self._closed:
                        return
                    self._cv.wait()
                    batch = self._take_batch()
            batch = [job for job in batch if job.fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                texts = self._decode_batch([job.payload for job in batch])
            except BaseException as e:  # noqa: BLE001 - every waiter must hear about the failure
                log.error("ASR decode failed", exc_info=True)
                for job in batch:
                    job.fut.set_exception(e)
                continue
            for job, text in zip(batch, texts, strict=True):
                job.fut.set_result(text)

    def shutdown(self) -> None:
        """Stop the workers after the queued jobs (idempotent)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
