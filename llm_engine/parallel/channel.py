"""StepChannel: rank 0 broadcasts each step's metadata to the worker ranks of the same host through a shared-
memory ring (one writer, R readers) — a few µs per step, where a gloo or pickle-over-pipe broadcast costs
50-200 µs. Single writer: rank 0's engine thread.

Layout (one memory-mapped file, in /dev/shm where there is one, else the temp directory): readers' acknowledgements
int64 [R] (the last sequence number each consumed), then `slots` slots of [seq int64, nbytes int64, payload
`slot_bytes`]. The writer fills a slot's payload, then stores its sequence number; a reader polls the next slot's
sequence number, then reads the payload, then acks. The writer reuses a slot only after every reader acked the
message that was in it. Stores and loads go through numpy in this order; x86-64's store ordering (TSO) makes
the payload visible before the sequence number.

Readers spin for `spin_s` after each message (decode steps follow each other within milliseconds), then back off
to 0.2 ms naps (1 ms once idle for a second: the first step after a pause waits at most that), and give up with
ChannelClosed once the writer's process is gone (`parent_pid`)."""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import time

import numpy as np

_HDR = 16  # seq, nbytes


class ChannelClosed(RuntimeError):
    pass


class StepChannel:
    def __init__(self, path: str, readers: int, slots: int, slot_bytes: int, owner: bool):
        self.path, self.readers, self.slots, self.slot_bytes, self.owner = path, readers, slots, slot_bytes, owner
        size = self.size_for(readers, slots, slot_bytes)
        with open(path, "r+b") as f:
            self.mm = mmap.mmap(f.fileno(), size)  # shared with every process that maps the file
        buf = memoryview(self.mm)
        self._buf = buf
        self.acks = np.ndarray((readers,), np.int64, buf, 0)  # [R]
        base = 8 * readers
        self.stride = _HDR + slot_bytes
        self.seqs = [np.ndarray((2,), np.int64, buf, base + i * self.stride) for i in range(slots)]  # [seq, nbytes]
        self.payloads = [np.ndarray((slot_bytes,), np.uint8, buf, base + i * self.stride + _HDR) for i in range(slots)]
        self.next_seq = 1  # writer: the next message; reader: the next message it expects

    @staticmethod
    def size_for(readers: int, slots: int, slot_bytes: int) -> int:
        return 8 * readers + slots * (_HDR + slot_bytes)

    @classmethod
    def create(cls, readers: int, slots: int = 4, slot_bytes: int = 2 << 20) -> StepChannel:
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="voicefast-tp-", dir=shm_dir)
        try:
            os.ftruncate(fd, cls.size_for(readers, slots, slot_bytes))  # zero-filled
        finally:
            os.close(fd)
        return cls(path, readers, slots, slot_bytes, owner=True)

    @classmethod
    def attach(cls, path: str, readers: int, slots: int = 4, slot_bytes: int = 2 << 20) -> StepChannel:
        return cls(path, readers, slots, slot_bytes, owner=False)

    def spec(self) -> dict:
        """What a reader process needs to attach."""
        return {"path": self.path, "readers": self.readers, "slots": self.slots, "slot_bytes": self.slot_bytes}

    # -- writer ----------------------------------------------------------------------------------------
    def publish(self, payload: bytes | memoryview | np.ndarray, timeout_s: float = 600.0) -> None:
        data = np.frombuffer(payload, np.uint8) if not isinstance(payload, np.ndarray) else payload.view(np.uint8)
        n = data.size
        if n > self.slot_bytes:
            raise ValueError(f"step message of {n} B exceeds the channel's {self.slot_bytes} B slots")
        seq = self.next_seq
        slot = seq % self.slots
        if seq > self.slots:  # the slot held message seq - slots: wait until every reader consumed it
            deadline = time.monotonic() + timeout_s
            while int(self.acks.min()) < seq - self.slots:
                if time.monotonic() > deadline:
                    raise ChannelClosed("tensor-parallel workers stopped reading step messages")
                time.sleep(0)
        self.payloads[slot][:n] = data
        hdr = self.seqs[slot]
        hdr[1] = n
        hdr[0] = seq  # last: readers poll this
        self.next_seq = seq + 1

    # -- reader ----------------------------------------------------------------------------------------
    def receive(self, reader: int, parent_pid: int | None = None, spin_s: float = 0.05) -> memoryview:
        """The next message's payload (valid until the next receive). Blocks."""
        seq = self.next_seq
        slot = seq % self.slots
        hdr = self.seqs[slot]
        last = time.monotonic()
        check_at = last + 0.5
        while int(hdr[0]) != seq:
            now = time.monotonic()
            idle = now - last
            if idle > spin_s:  # between bursts: short naps, longer once idle for a while (~1k wake-ups/s at most)
                time.sleep(0.0002 if idle < 1.0 else 0.001)
            if now > check_at:
                check_at = now + 0.5
                if parent_pid is not None and os.getppid() != parent_pid:
                    raise ChannelClosed("the engine process is gone")
        n = int(hdr[1])
        out = self.payloads[slot][:n].tobytes()
        self.acks[reader] = seq
        self.next_seq = seq + 1
        return memoryview(out)

    def close(self) -> None:
        if self.mm is None:
            return
        self.acks = self.seqs = self.payloads = None
        self._buf.release()
        self.mm.close()
        self.mm = None
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
