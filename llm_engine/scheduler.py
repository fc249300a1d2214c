"""Continuous-batching scheduler (pure Python, no torch).

Each step: every running decode first (decode priority), then prefill chunks of running sequences, then new
admissions, all under a per-step token budget (chunked prefill), so a long prompt never freezes the running
streams. When KV blocks run out, the newest running sequence is preempted (blocks freed, recomputed later).
Last, with a SpecPolicy, decodes get speculative drafts (llm_engine.spec_decode) from what is left of the token
budget, the row cap and the free blocks only, so speculation never preempts or delays real work; the slots of
rejected drafts are released in postprocess."""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from llm_engine.block_manager import BlockManager
from llm_engine.sequence import Sequence, SequenceStatus
from llm_engine.spec_decode import SpecPolicy, accept


def max_completion_tokens(params) -> int:
    """The most tokens a request can ever generate: max_tokens, or a forced grammar's own budget, or (lazy
    grammar) max_tokens before its trigger plus its budget after."""
    g = params.grammar
    if g is None or g.max_tokens is None:
        return params.max_tokens
    return params.max_tokens + g.max_tokens if g.triggers else g.max_tokens


def check_request_fits(request_id: str, num_prompt_tokens: int, params, max_model_len: int,
                       kv_capacity_tokens: int) -> None:
    """ValueError if a request of this prompt length and these SamplingParams could never run: empty, longer than
    max_model_len, or more than the whole KV cache holds (pure: ProcessLLMEngine checks it outside the engine)."""
    n = num_prompt_tokens
    if n == 0:
        raise ValueError(f"request {request_id!r}: empty prompt")
    max_tokens = max_completion_tokens(params)
    need = n + max_tokens
    if need > max_model_len:
        raise ValueError(f"request {request_id!r}: prompt ({n} tokens) + max_tokens "
                         f"({max_tokens}) = {need} exceeds max_model_len={max_model_len}")
    if need > kv_capacity_tokens:
        raise ValueError(f"request {request_id!r}: prompt ({n} tokens) + max_tokens "
                         f"({max_tokens}) = {need} exceeds the KV cache capacity of {kv_capacity_tokens} tokens")


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; the caller should shed load or retry later."""


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed for each seq this step (drafts included)
    num_decodes: int = 0  # seqs[:num_decodes] are decodes: the last token (plus its drafts when speculating)
    drafts: list[list[int]] = field(default_factory=list)  # per seq: speculative draft tokens ([] = none)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Does seq i reach the end of its tokens this step (so a new token is sampled)?"""
        s = self.seqs[i]
        return s.num_computed_tokens + self.num_tokens[i] == len(s) + len(self.drafts[i])

    def tokens_of(self, i: int) -> list[int]:
        """The input token ids of seq i this step (its uncomputed tokens, then its drafts)."""
        s = self.seqs[i]
        start = s.num_computed_tokens
        d = self.drafts[i]
        return s.token_ids[start:start + self.num_tokens[i] - len(d)] + d

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting: int, max_model_len: int, spec: SpecPolicy | None = None, spec_max_rows: int = 0):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first, newest preempted first
        self.num_preemptions = 0
        self.spec = spec  # None: no speculative decoding
        self.spec_max_rows = spec_max_rows  # drafts only while the decode rows (tokens) of a step stay <= this

    # ---- requests --------------------------------------------------------------------------------
    def check_fits(self, seq: Sequence) -> None:
        """ValueError if the request could never run (read-only, safe from any thread)."""
        check_request_fits(seq.request_id, len(seq), seq.params, self.max_model_len,
                           self.bm.num_blocks * self.bm.block_size)

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
            batch.drafts.append([])
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
            batch.drafts.append([])
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
            batch.drafts.append([])
            scheduled.add(id(seq))
            budget -= n

        # 4. Speculative drafts for the decodes, from leftovers only (budget, row cap, free blocks).
        if self.spec is not None:
            self._add_drafts(batch, budget)
        return batch

    def _add_drafts(self, batch: ScheduledBatch, budget: int) -> None:
        """Drafts for every sequence whose step reaches its last token: decodes, and final prefill chunks (a
        prompt that repeats itself can emit several tokens in its first step). Decode rows are also capped by
        spec_max_rows (the largest batch the GPU runs through CUDA graphs)."""
        rows = batch.num_decodes
        for i, seq in enumerate(batch.seqs):
            if budget <= 0:
                return
            if not batch.samples(i):
                continue
            room = min(budget, self.spec_max_rows - rows) if i < batch.num_decodes else budget
            # positions p+1..p+k must stay < max_model_len; the step emits up to k+1 tokens
            limit = min(room, self.max_model_len - len(seq), seq.max_tokens - seq.num_completion_tokens - 1)
            d = self.spec.propose(seq, limit)
            free_slots = (len(seq.block_table) + self.bm.num_free_blocks) * self.bm.block_size - len(seq)
            d = d[:max(0, free_slots)]
            if not d:
                continue
            self.bm.append_slot(seq, len(seq) + len(d))
            batch.drafts[i] = d
            batch.num_tokens[i] += len(d)
            budget -= len(d)
            if i < batch.num_decodes:
                rows += len(d)

    def postprocess(self, batch: ScheduledBatch, sampled: list[list[int]]) -> list[tuple[Sequence, list[int]]]:
        """Advance each scheduled sequence by the tokens it computed; append its sampled tokens (for a drafted
        decode, the accepted drafts + the target's next token); finish on stop ids / length, mid-list if need be.
        sampled[i]: seq i's tokens, one per sampled row ([] mid-prefill). Returns (seq, new tokens) per sequence
        that got any (finished ones included)."""
        out: list[tuple[Sequence, list[int]]] = []
        for seq, n, drafts, toks in zip(batch.seqs, batch.num_tokens, batch.drafts, sampled, strict=True):
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            if drafts:
                toks = accept(drafts, toks)
                self.spec.record(seq, len(drafts), len(toks) - 1)
            new: list[int] = []
            reason = None
            for tok in toks:
                seq.token_ids.append(tok)
                new.append(tok)
                if tok in seq.stop_token_ids:
                    reason = "stop"
                elif seq.num_completion_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
                    reason = "length"
                if reason:
                    break
            # KV is valid for the step's tokens, but with drafts only up to the input of the last emitted token
            seq.num_computed_tokens += n - len(drafts) + len(new) - 1 if drafts else n
            self.bm.commit(seq)  # after the append: the committed blocks' tokens are all in token_ids
            if reason:
                self.finish(seq, reason)
            elif drafts:
                self.bm.trim(seq, len(seq))  # release the slots of rejected drafts
            if new:
                out.append((seq, new))
        return out
