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
from llm_engine.pinned_upload import PinnedUpload
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
        B, mb = max(1, self.max_decode_rows), self.max_blocks_per_seq  # rows: sequences + speculative drafts
        # Pinned host staging of the graph inputs (layout: llm_engine.cuda_graphs), numpy views for cheap writes.
        self._h_st = torch.zeros((B, STAGING_COLS + mb), dtype=torch.int64, pin_memory=True)  # [B, 7 + max_blocks]
        self._h_tok = torch.zeros(B, dtype=torch.int64, pin_memory=True)  # [B] sampled tokens back
        # per-row top-k / top-p of a graph step that re-samples with the filter, uploaded without a host wait
        self._h_top_k = torch.zeros(B, dtype=torch.int64, pin_memory=True)  # [B]
        self._h_top_p = torch.ones(B, dtype=torch.float32, pin_memory=True)  # [B]
        self._n_st = self._h_st.numpy()
        self._n_st_f = self._n_st.view(np.float64)
        self._done = torch.cuda.Event()
        self._uploader = PinnedUpload(self.device)  # eager steps' inputs: one pinned host-to-device copy
        self._step_seeds: list[int] = []
        self.num_graph_steps = 0  # decode steps replayed through a graph (a speculative verify included)
        self.num_graph_verify_steps = 0  # of which carried drafts
        if not self.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, B, mb, self.max_blocks_per_seq * self.block_size,
                                       self.device)
            self.graphs.capture(log.info)

    def close(self) -> None:
        """Destroy the decode graphs; later decode steps run eagerly."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    # ---- decode through the graphs ------------------------------------------------------------------
    def _graph_ok(self, batch: ScheduledBatch) -> bool:
        """Pure decode steps (a speculative verify included) whose rows fit the largest captured bucket."""
        if self.graphs is None or len(batch) == 0 or batch.num_decodes != len(batch):
            return False
        return batch.total_tokens <= self.graphs.buckets[-1]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[list[int]]:
        if not self._graph_ok(batch):
            return super().run(batch)
        return self._run_graph(batch)

    def sample(self, inp, logits: torch.Tensor) -> torch.Tensor:
        """Eager steps (prefill, mixed, eager mode) sample like the graph does: Gumbel-max keyed by (request seed,
        position), so a token's noise does not depend on which path computed it (a seeded request gives the
        same tokens whether its drafts were verified in a graph, in an eager step, or not drafted at all)."""
        if inp.all_greedy:
            return logits.argmax(dim=-1)
        steps = inp.positions.index_select(0, inp.logits_indices)  # [S] position of each sampled row
        seeds = inp.seed_tensor  # [S] uploaded with the step's inputs (a copy here would wait for the forward)
        if seeds is None:
            seeds = torch.tensor(inp.seeds, dtype=torch.int64).to(self.device)  # [S]
        return SA.sample(logits, inp.temperature, inp.top_k, inp.top_p, seeds, steps,
                         inp.any_top_k or inp.any_top_p)

    def prepare_inputs(self, batch: ScheduledBatch):
        inp = super().prepare_inputs(batch)
        inp.seeds = self._step_seeds
        return inp

    def _extra_host_inputs(self, batch: ScheduledBatch, sample_rows: list[int]) -> dict[str, np.ndarray]:
        self._step_seeds = [self._seed_of(batch.seqs[r]) for r in sample_rows]
        return {"seeds": np.array(self._step_seeds, dtype=np.int64)}  # [S]

    def _upload(self, host: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return self._uploader.upload(host)

    def _seed_of(self, seq) -> int:
        if seq.params.seed is not None:
            return int(seq.params.seed) & _SEED_MASK
        return hash((self.seed_base, seq.request_id)) & _SEED_MASK  # fixed per request within this process

    def _run_graph(self, batch: ScheduledBatch) -> list[list[int]]:
        """One graph row per token. A speculative verify of seq (last token + k drafts at positions p..p+k) is k+1
        decode rows sharing the sequence's block table, row j attending to p+j+1 keys: all k+1 KV entries are
        written before any row attends, so each row sees exactly its causal prefix. Row j samples with the noise
        plain decoding would use at position p+j (step = position), so a seeded request draws the same tokens
        with or without speculation (up to the numerics of a wider batch)."""
        g = self.graphs
        R = batch.total_tokens
        b = g.bucket_for(R)
        bs = self.block_size
        st, st_f = self._n_st, self._n_st_f
        needs_filter = False
        r = 0
        for seq, drafts in zip(batch.seqs, batch.drafts, strict=True):
            p0 = len(seq) - 1
            table = seq.block_table
            seed = self._seed_of(seq)
            sp = seq.params
            needs_filter |= sp.temperature > 0 and (sp.top_k > 0 or sp.top_p < 1.0)
            for j in range(1 + len(drafts)):
                p = p0 + j
                row = st[r]
                row[COL_ID] = seq.token_ids[p0] if j == 0 else drafts[j - 1]
                row[COL_POS] = p
                row[COL_SLOT] = table[p // bs] * bs + p % bs
                row[COL_SEED] = seed
                row[COL_STEP] = p  # distinct per position: fresh noise every token, reproducible per seed
                row[COL_SEQ_LEN] = p + 1
                st_f[r, COL_TEMP] = sp.temperature
                row[STAGING_COLS:STAGING_COLS + len(table)] = table
                r += 1
        if b > R:  # padding rows: attend to nothing, store nothing
            st[R:b, :STAGING_COLS] = 0
            st[R:b, COL_SLOT] = -1
        g.staging[:b].copy_(self._h_st[:b], non_blocking=True)  # the step's one host-to-device copy
        g.replay(b)
        self.num_graph_steps += 1
        self.num_graph_verify_steps += int(len(batch) < R)  # rows beyond one per sequence: drafts
        # Constrained rows (never drafted: one row each): the host fills their masks while the graph runs, then
        # every row is re-sampled from the masked logits outside the graph (same seeds and steps: unconstrained
        # rows, draft rows included, draw the same token again).
        sample_rows = [i for i, d in enumerate(batch.drafts) for _ in range(1 + len(d))]  # [R] batch index per row
        masked = self.apply_grammar(batch, sample_rows, g.logits[b])
        if needs_filter or masked:  # top-k / top-p rows: re-sample the graph's logits with the sorting sampler
            top_k = top_p = None  # (unused without the filter)
            if needs_filter:  # pinned + non_blocking: a torch.tensor(..., device=) here would wait for the replay
                rows = [batch.seqs[i] for i in sample_rows]
                nk, npp = self._h_top_k.numpy(), self._h_top_p.numpy()
                nk[:b], npp[:b] = 0, 1.0
                nk[:R] = [s.params.top_k for s in rows]
                npp[:R] = [s.params.top_p for s in rows]
                top_k = self._h_top_k[:b].to(self.device, non_blocking=True)
                top_p = self._h_top_p[:b].to(self.device, non_blocking=True)
            tok = SA.sample(g.logits[b], g.temperature[:b], top_k, top_p, g.seeds[:b], g.steps[:b], needs_filter)
            g.tokens[:b].copy_(tok)
        self._h_tok[:R].copy_(g.tokens[:R], non_blocking=True)
        self._done.record()
        self._done.synchronize()  # the step's only wait: the sampled ids, 8 bytes per row
        flat = self._h_tok[:R].tolist()
        out, r = [], 0
        for n in batch.num_tokens:
            out.append(flat[r:r + n])
            r += n
        return out
