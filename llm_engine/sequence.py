"""Sequence: one request's tokens and bookkeeping (pure Python, no torch)."""

from __future__ import annotations

import enum
import time
from typing import Any

from llm_engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def checked_prompt(prompt_token_ids, vocab_size: int) -> list[int]:
    """The prompt as a list of ints; ValueError naming the first ids outside [0, vocab_size)."""
    ids = [int(t) for t in prompt_token_ids]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids


class Sequence:
    """token_ids = prompt + generated. KV exists for token_ids[:num_computed_tokens]; a step computes the
    next chunk of uncomputed tokens and, once all are computed, samples one new token."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 stop_token_ids: frozenset[int] = frozenset(), arrival_s: float | None = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.stop_token_ids = stop_token_ids  # eos ids (unless ignore_eos) + params.stop_token_ids
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []  # physical block ids, logical order
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.last_block_hash: int | None = None  # hash of block_table[num_hashed_blocks - 1]
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first admission)
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.arrival_s = time.perf_counter() if arrival_s is None else arrival_s
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.num_preemptions = 0
        self.generator: Any = None  # runner-owned per-request sampling state (torch.Generator)
        self.spec: Any = None  # scheduler-owned drafting state (llm_engine.spec_decode.SpecState), lazily
        self.grammar: Any = None  # engine-owned constraint state (llm_engine.grammar.GrammarState), if any
        self.max_tokens = params.max_tokens  # completion budget; a grammar that activates may set its own
        self.user: Any = None  # engine-owned per-request state (detokenizer, ...)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
