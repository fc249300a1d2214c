"""Continuous-batching scheduler (pure Python, no torch).

Each step: every running decode first (decode priority), then prefill chunks of running sequences, then new
admissions, all under a per-step token budget (chunked prefill), so a long prompt never freezes the running
streams. When KV blocks run out, the newest running sequence is preempted (blocks freed, recomputed later)."""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from llm_engine.block_manager import BlockManager
from llm_engine.sequence import Sequence, SequenceStatus


def max_completion_tokens(params) -> int:
    """The most tokens a request can ever generate: max_tokens, or a forced grammar's own budget, or (lazy
    grammar) max_tokens before its trigger plus its budget after."""
    g = params.grammar
    if g is None or g.max_tokens is None:
        return params.max_tokens
    return params.max_tokens + g.max_tokens if g.triggers else g.max_tokens


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; the caller should shed load or retry later."""


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed for each seq this step
    num_decodes: int = 0  # seqs[:num_decodes] are single-token decodes

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Does seq i reach the end of its tokens this step (so a new token is sampled)?"""
        s = self.seqs[i]
        return s.num_computed_tokens + self.num_tokens[i] == len(s)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting: int, max_model_len: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first, newest preempted first
        self.num_preemptions = 0

    # ---- requests --------------------------------------------------------------------------------
    def check_fits(self, seq: Sequence) -> None:
        """ValueError if the request could never run (read-only, safe from any thread)."""
        n = len(seq)
        if n == 0:
            raise ValueError(f"request {seq.request_id!r}: empty prompt")
        max_tokens = max_completion_tokens(seq.params)
        need = n + max_tokens
        if need > self.max_model_len:
            raise ValueError(f"request {seq.request_id!r}: prompt ({n} tokens) + max_tokens "
                             f"({max_tokens}) = {need} exceeds max_model_len={self.max_model_len}")
        capacity = self.bm.num_blocks * self.bm.block_size
        if need > capacity:
            raise ValueError(f"request {seq.request_id!r}: prompt ({n} tokens) + max_tokens "
                             f"({max_tokens}) = {need} exceeds the KV cache capacity of {capacity} tokens")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"engine overloaded: {len(self.waiting)} requests waiting "
                                   f"(max_waiting={self.max_waiting})")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence wherever it is and free its blocks at once (abort, stop, error)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        if seq.block_table:
            self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- one step --------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        # 1. Decodes (one token each), oldest first. Out of blocks -> preempt the newest unscheduled.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.num_uncomputed_tokens != 1 or seq.status is not SequenceStatus.RUNNING:
                continue
            while not self.bm.can_append(seq):
                victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
                if not victims:
                    break
                self._preempt(victims[-1])
            if not self.bm.can_append(seq):
                self._preempt(seq)
                continue
            self.bm.append_slot(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(1)
            scheduled.add(id(seq))
            budget -= 1
        batch.num_decodes = len(batch.seqs)

        # 2. Prefill chunks of running sequences (blocks already allocated at admission).
        for seq in self.running:
            if budget == 0:
                break
            if id(seq) in scheduled or seq.num_uncomputed_tokens <= 1:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n

        # 3. Admit waiting sequences, FIFO, while blocks, seats and budget remain.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance each scheduled sequence; append sampled tokens; finish on stop ids / length.
        Returns the sequences that got a new token (finished ones included)."""
        out: list[Sequence] = []
        for seq, n, tok in zip(batch.seqs, batch.num_tokens, sampled, strict=True):
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            seq.num_computed_tokens += n
            self.bm.commit(seq)
            if tok is None:
                continue
            seq.token_ids.append(tok)
            out.append(seq)
            if tok in seq.stop_token_ids:
                self.finish(seq, "stop")
            elif seq.num_completion_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
                self.finish(seq, "length")
        return out
