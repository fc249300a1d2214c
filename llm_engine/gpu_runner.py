"""GpuModelRunner: the CUDA model runner. Pure-decode steps (every sequence adds one token and samples) replay
a whole-step CUDA graph (llm_engine.cuda_graphs) after refreshing its inputs with one pinned host-to-device copy;
sampling happens inside the graph (Gumbel-max, no host sync); the sampled tokens come back through a pinned
buffer and a CUDA event — the step's one wait. Prefill / mixed steps run eagerly through the same Triton
kernels (llm_engine.ops dispatches CUDA tensors to them)."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from llm_engine.cuda_graphs import (
    COL_ID,
    COL_POS,
    COL_SEED,
    COL_SEQ_LEN,
    COL_SLOT,
    COL_STEP,
    COL_TEMP,
    STAGING_COLS,
    DecodeGraphs,
)
from llm_engine.kernels import sampling as SA
from llm_engine.model_runner import ModelRunner
from llm_engine.scheduler import ScheduledBatch

log = logging.getLogger("llm_engine")
_SEED_MASK = (1 << 62) - 1


class GpuModelRunner(ModelRunner):
    def __init__(self, *args, enforce_eager: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != "cuda":
            raise ValueError("GpuModelRunner needs a CUDA device")
        self.enforce_eager = enforce_eager or os.environ.get("VOICEFAST_ENFORCE_EAGER", "") == "1"
        self.seed_base = int(kwargs.get("seed", 0))
        self.graphs: DecodeGraphs | None = None
        B, mb = max(1, kwargs["max_num_seqs"]), self.max_blocks_per_seq
        # Pinned host staging of the graph inputs (layout: llm_engine.cuda_graphs), numpy views for cheap writes.
        self._h_st = torch.zeros((B, STAGING_COLS + mb), dtype=torch.int64, pin_memory=True)  # [B, 7 + max_blocks]
        self._h_tok = torch.zeros(B, dtype=torch.int64, pin_memory=True)  # [B] sampled tokens back
        self._n_st = self._h_st.numpy()
        self._n_st_f = self._n_st.view(np.float64)
        self._done = torch.cuda.Event()
        if not self.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, B, mb, self.max_blocks_per_seq * self.block_size,
                                       self.device)
            self.graphs.capture(log.info)

    # ---- decode through the graphs ------------------------------------------------------------------
    def _graph_ok(self, batch: ScheduledBatch) -> bool:
        if self.graphs is None or len(batch) == 0 or len(batch) > self.graphs.buckets[-1]:
            return False
        return all(n == 1 for n in batch.num_tokens) and all(batch.samples(i) for i in range(len(batch)))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        if not self._graph_ok(batch):
            return super().run(batch)
        return self._run_graph(batch)

    def _seed_of(self, seq) -> int:
        if seq.params.seed is not None:
            return int(seq.params.seed) & _SEED_MASK
        return hash((self.seed_base, seq.request_id)) & _SEED_MASK  # fixed per request within this process

    def _run_graph(self, batch: ScheduledBatch) -> list[int | None]:
        g = self.graphs
        B = len(batch)
        b = g.bucket_for(B)
        bs = self.block_size
        st, st_f = self._n_st, self._n_st_f
        needs_filter = False
        for i, seq in enumerate(batch.seqs):
            p = len(seq) - 1
            row = st[i]
            row[COL_ID] = seq.token_ids[p]
            row[COL_POS] = p
            row[COL_SLOT] = seq.block_table[p // bs] * bs + p % bs
            row[COL_SEED] = self._seed_of(seq)
            row[COL_STEP] = p  # distinct per token of the sequence: fresh noise every step, reproducible per seed
            row[COL_SEQ_LEN] = p + 1
            sp = seq.params
            st_f[i, COL_TEMP] = sp.temperature
            row[STAGING_COLS:STAGING_COLS + len(seq.block_table)] = seq.block_table
            needs_filter |= sp.temperature > 0 and (sp.top_k > 0 or sp.top_p < 1.0)
        if b > B:  # padding rows: attend to nothing, store nothing
            st[B:b, :STAGING_COLS] = 0
            st[B:b, COL_SLOT] = -1
        g.staging[:b].copy_(self._h_st[:b], non_blocking=True)  # the step's one host-to-device copy
        g.replay(b)
        # Constrained rows: the host fills their masks while the graph runs, then every row is re-sampled from the
        # masked logits outside the graph (same seeds and steps: unconstrained rows draw the same token again).
        masked = self.apply_grammar(batch, list(range(B)), g.logits[b])
        if needs_filter or masked:  # top-k / top-p rows: re-sample the graph's logits with the sorting sampler
            top_k = torch.tensor([s.params.top_k for s in batch.seqs] + [0] * (b - B), device=self.device)
            top_p = torch.tensor([s.params.top_p for s in batch.seqs] + [1.0] * (b - B), device=self.device)
            tok = SA.sample(g.logits[b], g.temperature[:b], top_k, top_p, g.seeds[:b], g.steps[:b], needs_filter)
            g.tokens[:b].copy_(tok)
        self._h_tok[:B].copy_(g.tokens[:B], non_blocking=True)
        self._done.record()
        self._done.synchronize()  # the step's only wait: the sampled ids, 8 bytes per sequence
        return self._h_tok[:B].tolist()
