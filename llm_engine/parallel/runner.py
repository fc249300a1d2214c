"""The model runner of each rank. Rank 0 runs the engine's own runner class (ModelRunner or GpuModelRunner) with
three hooks (`leader_runner_class`): its constructor arguments, every eager step's inputs and every decode-graph
replay are broadcast to the workers first. A worker (`serve_steps`) builds the same runner class from those
arguments — so the same KV pool, the same CUDA-graph buckets, captured in the same order — and replays each step
on its shard; the collectives inside the model (llm_engine/parallel/sharding.py) keep the ranks in lockstep.
Only rank 0 samples; the scheduler and the block manager exist only there."""

from __future__ import annotations

import contextlib
import importlib
import weakref

import numpy as np
import torch

from llm_engine.attn_metadata import AttnMetadata
from llm_engine.parallel import steps


def leader_runner_class(base: type, leader) -> type:
    """`base` with the broadcasts; `leader.publish(bytes)` sends to every worker."""

    class LeaderRunner(base):
        def __init__(self, model, model_cfg, **kwargs):
            self._tp, self._made = leader, {}
            leader.runner = weakref.ref(self)  # TensorParallel.close() releases its CUDA graphs first
            leader.publish(steps.encode(steps.INIT, {"cls": base, "kwargs": {k: v for k, v in kwargs.items()
                                                                          if k != "device"}}))
            super().__init__(model, model_cfg, **kwargs)
            if getattr(self, "graphs", None) is not None:
                self.graphs = _PublishingGraphs(self.graphs, self)

        def _upload(self, host: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            dev = super()._upload(host)
            for name, t in dev.items():
                self._made[id(t)] = host[name]
            return dev

        def prepare_inputs(self, batch):
            self._made = {}
            inp = super().prepare_inputs(batch)
            self._tp.publish(steps.encode(steps.EAGER, steps.pack_inputs(inp, self._made)))
            self._made = {}
            return inp

    LeaderRunner.__name__ = LeaderRunner.__qualname__ = f"Leader{base.__name__}"
    return LeaderRunner


class _PublishingGraphs:
    """Rank 0's DecodeGraphs: a replay first sends the step's staging rows (written by GpuModelRunner)."""

    def __init__(self, inner, runner):
        self._inner, self._runner = inner, runner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def replay(self, b: int) -> None:
        from llm_engine.cuda_graphs import COL_SEQ_LEN, STAGING_COLS

        r = self._runner
        st = r._n_st[:b]  # [b, 7 + max_blocks] int64, this step's rows (padding rows have seq_len 0)
        width = STAGING_COLS + -(-int(st[:, COL_SEQ_LEN].max()) // r.block_size)
        r._tp.publish(steps.encode_graph(b, st[:, :width]))
        self._inner.replay(b)


def resolve(fn: str):
    mod, name = fn.split(":")
    return getattr(importlib.import_module(mod), name)


@torch.inference_mode()
def serve_steps(model, model_cfg, device: torch.device, receive) -> None:
    """A worker's loop: `receive()` -> the next message (bytes); returns on STOP. On the way out (STOP or an
    error) the runner is closed: its CUDA graphs must go before the NCCL communicator they captured
    (launch.worker_main destroys it next)."""
    runner, worker = None, _GraphSteps()
    try:
        while True:
            kind, obj = steps.decode(receive())
            if kind == steps.STOP:
                return
            if kind == steps.INIT:
                runner = obj["cls"](model, model_cfg, device=device, **obj["kwargs"])
            elif kind == steps.GRAPH:
                worker.replay(runner, *obj)
            elif kind == steps.EAGER:
                inp = steps.unpack_inputs(obj, runner._tensor)
                hidden = runner.forward(inp)
                if inp.sample_rows:
                    runner.compute_logits(hidden, inp)  # the lm_head's all-gather needs every rank
            elif kind == steps.CALL:
                resolve(obj["fn"])(runner, *obj["args"])
            else:
                raise RuntimeError(f"unknown step message kind {kind}")
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):  # (after a CUDA error the graphs go with the process)
                runner.close()


class _GraphSteps:
    """A worker's decode-graph step: rank 0's staging rows into this runner's pinned staging buffer, one copy to
    the device, replay. The pinned buffer is reused only after the previous copy out of it finished."""

    def __init__(self):
        self.copied = None  # CUDA event of the last host-to-device staging copy

    def replay(self, runner, b: int, rows: np.ndarray) -> None:
        if self.copied is not None:
            self.copied.synchronize()
        runner._n_st[:b, :rows.shape[1]] = rows
        g = runner.graphs
        g.staging[:b].copy_(runner._h_st[:b], non_blocking=True)
        if g.staging.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()
        g.replay(b)


@torch.inference_mode()
def prompt_logits(runner, token_ids: list[int]) -> torch.Tensor:
    """Checks and benchmarks: logits [n, vocab] float32 of every position of one prompt, run eagerly through the
    runner's model with the LAST blocks of its KV pool as scratch (call it on an idle engine whose prefix cache
    is off). Called on every rank at once (`TensorParallel.call`) under tensor parallelism."""
    n, bs = len(token_ids), runner.block_size
    nb = -(-n // bs)
    if nb > runner.num_kv_blocks:
        raise ValueError(f"a {n}-token prompt needs {nb} KV blocks, the pool has {runner.num_kv_blocks}")
    table = np.arange(runner.num_kv_blocks - nb, runner.num_kv_blocks, dtype=np.int32)[None, :]  # [1, nb]
    pos = np.arange(n, dtype=np.int64)
    slots = table[0].astype(np.int64)[pos // bs] * bs + pos % bs
    t = runner._tensor
    meta = AttnMetadata(query_start_loc=t(np.array([0, n], np.int32)), seq_lens=t(np.array([n], np.int32)),
                        block_tables=t(table), slot_mapping=t(slots), max_query_len=n, max_seq_len=n,
                        is_decode=n == 1, query_lens_cpu=[n], seq_lens_cpu=[n])
    hidden = runner.model(t(np.asarray(token_ids, np.int64)), t(pos), runner.kv_caches, meta)  # [n, H]
    return runner.model.compute_logits(hidden)  # [n, V]
