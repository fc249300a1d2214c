"""ModelRunner: the only owner of tensors. run(batch) = prepare_inputs -> forward -> compute_logits -> sample ->
to_host; each stage is a method so the GPU runner (llm_engine.gpu_runner) can override it (CUDA graphs,
on-device sampling, async token copy). Step inputs are written into preallocated host buffers (no per-step
tensor churn); on CPU the torch tensors are zero-copy views of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llm_engine.attn_metadata import AttnMetadata
from llm_engine.grammar_mask import MaskBuffer, active_rows, apply_bitmask
from llm_engine.kv_cache import KVCache, allocate_kv_cache
from llm_engine.model_config import ModelConfig
from llm_engine.sampler import sample
from llm_engine.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttnMetadata
    logits_indices: torch.Tensor  # [S] int64: rows of hidden whose next token is sampled
    sample_rows: list[int]  # batch index of each sampled row (a speculative verify samples 1 + drafts rows)
    temperature: torch.Tensor  # [S] float32
    top_k: torch.Tensor  # [S] int64
    top_p: torch.Tensor  # [S] float32
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    seeds: list[int] | None = None  # per sampled row (GpuModelRunner: the Philox key of its sampler)
    seed_tensor: torch.Tensor | None = None  # [S] int64 the same seeds on the device (GpuModelRunner)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig, *, num_kv_blocks: int, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, enforce_eager: bool = True, max_decode_rows: int = 0):
        # enforce_eager: the eager runner always is; GpuModelRunner captures graphs unless set.
        # max_decode_rows: speculative decode steps may carry up to this many rows (GpuModelRunner captures them)
        self.model = model
        self.max_decode_rows = max(max_num_seqs, max_decode_rows)
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.kv_caches: list[KVCache] = allocate_kv_cache(model_cfg, num_kv_blocks, block_size, self.device, dtype)
        self.default_generator = torch.Generator(self.device).manual_seed(seed)
        T, B = max_num_batched_tokens, max_num_seqs
        self.max_blocks_per_seq = (max_model_len + block_size - 1) // block_size
        # Host staging buffers, reused every step.
        self._ids = np.zeros(T, np.int64)  # [T]
        self._pos = np.zeros(T, np.int64)  # [T]
        self._slots = np.zeros(T, np.int64)  # [T]
        self._qsl = np.zeros(B + 1, np.int32)  # [B+1]
        self._seq_lens = np.zeros(B, np.int32)  # [B]
        self._tables = np.zeros((B, self.max_blocks_per_seq), np.int32)  # [B, max_blocks]
        # Sampled rows: one per sequence that reaches its end, one more per speculative draft (<= T in all).
        self._logit_idx = np.zeros(T, np.int64)  # [T]
        self._temp = np.zeros(T, np.float32)  # [T]
        self._top_k = np.zeros(T, np.int64)  # [T]
        self._top_p = np.ones(T, np.float32)  # [T]
        self._masks: MaskBuffer | None = None  # grammar bitmasks, made on the first constrained step

    # ---- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[list[int]]:
        """Compute the batch's tokens; returns per scheduled seq its sampled tokens: [] mid-prefill, one token
        when it reaches its end, 1 + len(drafts) tokens (one per row) for a speculative verify."""
        inp = self.prepare_inputs(batch)
        hidden = self.forward(inp)  # [T, H]
        if not inp.sample_rows:
            return [[] for _ in range(len(batch))]
        logits = self.compute_logits(hidden, inp)  # [S, V]
        self.apply_grammar(batch, inp.sample_rows, logits)
        tokens = self.sample(inp, logits)  # [S]
        return self.to_host(batch, inp, tokens)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def prepare_inputs(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        ids, pos, slots, tables = self._ids, self._pos, self._slots, self._tables
        B = len(batch)
        t = 0
        qlens, slens, width = [], [], 1
        sample_rows: list[int] = []
        gens: list[torch.Generator | None] = []
        self._qsl[0] = 0
        for i, (seq, n, drafts) in enumerate(zip(batch.seqs, batch.num_tokens, batch.drafts, strict=True)):
            start = seq.num_computed_tokens
            end = start + n
            if n == 1:
                ids[t] = seq.token_ids[start]
                pos[t] = start
                slots[t] = seq.block_table[start // bs] * bs + start % bs
            else:
                ids[t:t + n] = batch.tokens_of(i) if drafts else seq.token_ids[start:end]
                p = np.arange(start, end)
                pos[t:t + n] = p
                slots[t:t + n] = np.asarray(seq.block_table, np.int64)[p // bs] * bs + p % bs
            t += n
            self._qsl[i + 1] = t
            self._seq_lens[i] = end
            nb = len(seq.block_table)
            tables[i, :nb] = seq.block_table
            width = max(width, nb)
            qlens.append(n)
            slens.append(end)
            if end == len(seq) + len(drafts):  # reaches its end: sample the last row (+ one per draft)
                sp = seq.params
                if sp.seed is not None and seq.generator is None:
                    seq.generator = torch.Generator(self.device).manual_seed(sp.seed)
                for r in range(t - 1 - len(drafts), t):
                    j = len(sample_rows)
                    self._logit_idx[j] = r
                    self._temp[j] = sp.temperature
                    self._top_k[j] = sp.top_k
                    self._top_p[j] = sp.top_p
                    gens.append(seq.generator)
                    sample_rows.append(i)
        for i, seq in enumerate(batch.seqs):  # zero stale entries past each table (padding = block 0)
            tables[i, len(seq.block_table):width] = 0
        S = len(sample_rows)
        temps = self._temp[:S]
        host = {"qsl": self._qsl[:B + 1], "seq_lens": self._seq_lens[:B], "tables": tables[:B, :width],
                "slots": slots[:t], "ids": ids[:t], "pos": pos[:t], "logit_idx": self._logit_idx[:S],
                "temp": temps, "top_k": self._top_k[:S], "top_p": self._top_p[:S]}
        host.update(self._extra_host_inputs(batch, sample_rows))
        dev = self._upload(host)
        meta = AttnMetadata(
            query_start_loc=dev["qsl"], seq_lens=dev["seq_lens"], block_tables=dev["tables"],
            slot_mapping=dev["slots"],
            max_query_len=max(qlens), max_seq_len=max(slens), is_decode=max(qlens) == 1,
            query_lens_cpu=qlens, seq_lens_cpu=slens)
        return StepInputs(
            input_ids=dev["ids"], positions=dev["pos"], meta=meta,
            logits_indices=dev["logit_idx"], sample_rows=sample_rows,
            temperature=dev["temp"], top_k=dev["top_k"],
            top_p=dev["top_p"], generators=gens,
            all_greedy=bool((temps == 0).all()), any_top_k=bool((self._top_k[:S] > 0).any()),
            any_top_p=bool((self._top_p[:S] < 1).any()), seed_tensor=dev.get("seeds"))

    def _extra_host_inputs(self, batch: ScheduledBatch, sample_rows: list[int]) -> dict[str, np.ndarray]:
        """More host arrays a subclass wants on the device with the step's inputs (GpuModelRunner: the seeds)."""
        return {}

    def _upload(self, host: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The step's host arrays as tensors on self.device: zero-copy views on CPU; GpuModelRunner packs them
        into one pinned buffer and copies once."""
        return {k: self._tensor(a) for k, a in host.items()}

    def forward(self, inp: StepInputs) -> torch.Tensor:
        return self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)  # [T, H]

    def compute_logits(self, hidden: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        if hidden.shape[0] == len(inp.sample_rows):  # pure decode: every row samples, no gather
            return self.model.compute_logits(hidden)  # [S, V]
        return self.model.compute_logits(hidden.index_select(0, inp.logits_indices))  # [S, V]

    def apply_grammar(self, batch: ScheduledBatch, sample_rows: list[int], logits: torch.Tensor) -> bool:
        """Mask the logits of constrained rows (llm_engine.grammar). On CUDA the host fills the masks while the
        queued forward runs. Returns whether any row was masked."""
        states, rows = active_rows(batch.seqs, sample_rows)
        if not states:
            return False
        if self._masks is None:
            self._masks = MaskBuffer(len(self._temp), states[0].compiler.words, self.device)
        apply_bitmask(logits, rows, self._masks.masks_for(states[0].compiler, states))
        return True

    def sample(self, inp: StepInputs, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, inp.temperature, inp.top_k, inp.top_p, inp.generators, self.default_generator,
                      all_greedy=inp.all_greedy, any_top_k=inp.any_top_k, any_top_p=inp.any_top_p)  # [S]

    def close(self) -> None:
        """Release what pins other resources (GpuModelRunner: its CUDA graphs, which pin the NCCL communicator under
        tensor parallelism). The eager runner holds nothing of the kind."""

    def to_host(self, batch: ScheduledBatch, inp: StepInputs, tokens: torch.Tensor) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(len(batch))]
        for row, tok in zip(inp.sample_rows, tokens.tolist(), strict=True):  # the step's only host sync
            out[row].append(tok)
        return out
