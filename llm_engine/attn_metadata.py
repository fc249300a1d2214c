"""Attention metadata for one engine step, passed explicitly to every attention layer (no global context).

A step is a varlen batch: sequence i contributes query_len_i new tokens (1 for decode, a chunk for
prefill) and attends to seq_len_i keys in total (cached prefix + earlier chunks + these tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttnMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative query lengths; tokens of seq i are [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # [B] int32: keys seq i attends to, this step's tokens included
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32: physical KV block ids, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) per new token; -1 = skip
    max_query_len: int
    max_seq_len: int
    is_decode: bool  # every query_len == 1 (the CUDA-graph fast path)
    query_lens_cpu: list[int]  # host copies, so CPU reference paths need no device sync
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
