"""GpuModelRunner: the CUDA model runner. Pure-decode steps (every sequence adds one token and samples) replay
a whole-step CUDA graph (llm_engine.cuda_graphs) after refreshing its static inputs from pinned host buffers;
sampling happens inside the graph (Gumbel-max, no host sync); the sampled tokens come back through a pinned
buffer and a CUDA event — the step's one wait. Prefill / mixed steps run eagerly through the same Triton
kernels (llm_engine.ops dispatches CUDA tensors to them)."""

from __future__ import annotations

import logging
import os

import torch

from llm_engine.cuda_graphs import DecodeGraphs
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
        pin = dict(pin_memory=True)
        # Pinned host staging for the graph inputs; numpy views for cheap element writes.
        self._h_i64 = torch.zeros((5, B), dtype=torch.int64, **pin)  # ids, pos, slots, seeds, steps
        self._h_seq = torch.zeros(B, dtype=torch.int32, **pin)  # [B]
        self._h_tab = torch.zeros((B, mb), dtype=torch.int32, **pin)  # [B, max_blocks]
        self._h_temp = torch.zeros(B, dtype=torch.float32, **pin)  # [B]
        self._h_tok = torch.zeros(B, dtype=torch.int64, **pin)  # [B] sampled tokens back
        self._n_i64, self._n_seq = self._h_i64.numpy(), self._h_seq.numpy()
        self._n_tab, self._n_temp = self._h_tab.numpy(), self._h_temp.numpy()
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
        ids, pos, slots, seeds, steps = self._n_i64
        width, needs_filter = 1, False
        for i, seq in enumerate(batch.seqs):
            p = len(seq) - 1
            ids[i] = seq.token_ids[p]
            pos[i] = p
            slots[i] = seq.block_table[p // bs] * bs + p % bs
            self._n_seq[i] = p + 1
            nb = len(seq.block_table)
            self._n_tab[i, :nb] = seq.block_table
            width = max(width, nb)
            sp = seq.params
            self._n_temp[i] = sp.temperature
            seeds[i] = self._seed_of(seq)
            steps[i] = p  # distinct per token of the sequence: fresh noise every step, reproducible per seed
            needs_filter |= sp.temperature > 0 and (sp.top_k > 0 or sp.top_p < 1.0)
        # padding rows: attend to nothing, store nothing
        ids[B:b], pos[B:b], slots[B:b], seeds[B:b], steps[B:b] = 0, 0, -1, 0, 0
        self._n_seq[B:b] = 0
        self._n_temp[B:b] = 0.0
        nb_ = True
        g.input_ids[:b].copy_(self._h_i64[0, :b], non_blocking=nb_)
        g.positions[:b].copy_(self._h_i64[1, :b], non_blocking=nb_)
        g.slot_mapping[:b].copy_(self._h_i64[2, :b], non_blocking=nb_)
        g.seeds[:b].copy_(self._h_i64[3, :b], non_blocking=nb_)
        g.steps[:b].copy_(self._h_i64[4, :b], non_blocking=nb_)
        g.seq_lens[:b].copy_(self._h_seq[:b], non_blocking=nb_)
        g.temperature[:b].copy_(self._h_temp[:b], non_blocking=nb_)
        g.block_tables[:B, :width].copy_(self._h_tab[:B, :width], non_blocking=nb_)
        g.replay(b)
        if needs_filter:  # top-k / top-p rows: re-sample the graph's logits with the sorting sampler
            top_k = torch.tensor([s.params.top_k for s in batch.seqs] + [0] * (b - B), device=self.device)
            top_p = torch.tensor([s.params.top_p for s in batch.seqs] + [1.0] * (b - B), device=self.device)
            g.steps[:b].sub_(1)
            tok = SA.sample(g.logits[b], g.temperature[:b], top_k, top_p, g.seeds[:b], g.steps[:b], True)
            g.steps[:b].add_(1)
            g.tokens[:b].copy_(tok)
        self._h_tok[:B].copy_(g.tokens[:B], non_blocking=True)
        self._done.record()
        self._done.synchronize()  # the step's only wait: the sampled ids, 8 bytes per sequence
        return self._h_tok[:B].tolist()
