"""Whole-step CUDA graphs for decode: embedding -> layers -> final norm -> lm_head -> sampling, one graph per
batch-size bucket (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... up to max_num_seqs; a batch pads up to the
next bucket, so no size falls off the fast path).

Everything a step reads comes from one static int64 staging buffer [max_bs, 7 + max_blocks_per_seq] that the
host refreshes with ONE pinned host-to-device copy of its first b rows before a replay; the graph itself
unpacks it (columns: token id, position, slot, seed, step, seq_len, temperature as float64 bits, then the
block table) into the typed static buffers the model reads. Padded rows have seq_len 0 and slot -1: they
attend to nothing and write no KV. The graph writes the sampled tokens into `tokens` and back into the
staging buffer's token column (so a device-side loop can run step after step with no host round trip)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm_engine.attn_metadata import AttnMetadata
from llm_engine.kernels import sampling as SA

COL_ID, COL_POS, COL_SLOT, COL_SEED, COL_STEP, COL_SEQ_LEN, COL_TEMP = range(7)
STAGING_COLS = 7


def batch_buckets(max_num_seqs: int) -> list[int]:
    out, b = [], 1
    while b < 16 and b < max_num_seqs:
        out.append(b)
        b *= 2
    b = 16
    while b < max_num_seqs:
        out.append(b)
        b += 8 if b < 32 else 16 if b < 64 else 32 if b < 128 else 64
    out.append(max_num_seqs)
    return sorted(set(out))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_num_seqs)
        B, mb = self.buckets[-1], max_blocks_per_seq
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(B, **i64)  # [B]
        self.positions = torch.zeros(B, **i64)  # [B]
        self.slot_mapping = torch.full((B,), -1, **i64)  # [B]
        self.seq_lens = torch.zeros(B, **i32)  # [B]
        self.block_tables = torch.zeros((B, mb), **i32)  # [B, max_blocks]
        self.query_start_loc = torch.arange(B + 1, **i32)  # [B+1]: one query per sequence
        self.temperature = torch.zeros(B, dtype=torch.float32, device=device)  # [B]
        self.seeds = torch.zeros(B, **i64)  # [B]
        self.steps = torch.zeros(B, **i64)  # [B]
        self.tokens = torch.zeros(B, **i64)  # [B] output
        self.staging = torch.zeros((B, STAGING_COLS + mb), **i64)  # [B, 7 + max_blocks] host-refreshed input
        self.staging[:, COL_SLOT] = -1
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [b, V] float32 graph output
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def meta(self, b: int) -> AttnMetadata:
        return AttnMetadata(query_start_loc=self.query_start_loc[:b + 1], seq_lens=self.seq_lens[:b],
                            block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
                            max_query_len=1, max_seq_len=self.max_model_len, is_decode=True,
                            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_model_len] * b)

    def _unpack(self, b: int) -> None:
        st = self.staging[:b]
        self.input_ids[:b].copy_(st[:, COL_ID])
        self.positions[:b].copy_(st[:, COL_POS])
        self.slot_mapping[:b].copy_(st[:, COL_SLOT])
        self.seeds[:b].copy_(st[:, COL_SEED])
        self.steps[:b].copy_(st[:, COL_STEP])
        self.seq_lens[:b].copy_(st[:, COL_SEQ_LEN])
        self.temperature[:b].copy_(st[:, COL_TEMP].view(torch.float64))
        self.block_tables[:b].copy_(st[:, STAGING_COLS:])

    def _step(self, b: int) -> torch.Tensor:
        self._unpack(b)
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self.meta(b))  # [b, H]
        logits = self.model.compute_logits(hidden)  # [b, V] float32
        tok = SA.gumbel_argmax(logits, self.temperature[:b], self.seeds[:b], self.steps[:b])  # [b]
        self.tokens[:b].copy_(tok)
        self.staging[:b, COL_ID].copy_(tok)  # next step's input, written on the device
        return logits

    @torch.inference_mode()
    def capture(self, log: Callable[[str], None] | None = None) -> None:
        """Warm every bucket eagerly (compiles kernels, tunes quant tiles), then capture, largest first so
        smaller graphs reuse its memory pool. Static buffers hold padding (seq_len 0, slot -1): no KV is
        written and nothing is read past block 0."""
        self.staging.zero_()
        self.staging[:, COL_SLOT] = -1
        for b in reversed(self.buckets):
            self._step(b)
        torch.cuda.synchronize(self.device)
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, stream=stream):
                self.logits[b] = self._step(b)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)
        if log:
            log(f"captured decode CUDA graphs for batch buckets {self.buckets}")

    def replay(self, b: int) -> None:
        self.graphs[b].replay()

    def release(self) -> None:
        """Destroy the captured graphs (no replay after this). Under tensor parallelism this must happen before the
        NCCL communicator is destroyed: NCCL's destroy waits until every graph that captured its collectives is
        gone (it would wait forever on a graph still held)."""
        torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self.logits.clear()
        self.pool = None
