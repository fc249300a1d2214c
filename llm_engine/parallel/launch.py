"""Starting tensor parallelism from the engine: rank 0 is the engine's own process (its engine thread), and it
spawns one worker process per further rank (multiprocessing "spawn"); rank r runs on cuda:r (gloo on CPU).
Every rank loads its own shard of the checkpoint (`load_rank_model`), so nothing large crosses processes.

    rank 0 (engine)                               rank r (worker_main)
    TPGroup.init (NCCL / gloo) <----------------> TPGroup.init
    enable_custom_all_reduce   <----------------> enable_custom_all_reduce        (CUDA)
    load_rank_model                               load_rank_model -> "ready" on the status queue
    wait for every worker's "ready" (or its error)
    runner = leader_runner_class(...)  --INIT-->  runner = same class, same arguments
      (both capture the same CUDA graphs, collectives in lockstep)
    engine steps                       --steps--> serve_steps
    close(): STOP, drop CUDA graphs,   --STOP-->  drop CUDA graphs, leave the group (at the same time:
             leave the group                      collective), exit

NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set in rank 0's environment before the workers
are spawned (they inherit it) and again in each worker before NCCL starts."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_engine.parallel.channel import ChannelClosed, StepChannel
from llm_engine.parallel.group import TPGroup, no_multicast_env
from llm_engine.parallel.random_checkpoint import RandomCheckpoint
from llm_engine.parallel.runner import leader_runner_class, serve_steps
from llm_engine.parallel.steps import CALL, STOP, encode

log = logging.getLogger("llm_engine")


def load_rank_model(cfg, group: TPGroup, dtype: torch.dtype, *, tokenizer: bool):
    """This rank's shard of cfg.model (a checkpoint path, None = the embedded model, or a RandomCheckpoint),
    quantized per cfg.quantize, wrapped for tensor parallelism: (model, tokenizer or None)."""
    from llm_engine.layers.linear import use_half_gemv
    from llm_engine.loader import load_checkpoint
    from llm_engine.models import build_model, load_weights
    from llm_engine.parallel.sharding import ShardedCheckpoint, parallelize, shard_config
    from llm_engine.quant.swap import quantize_model

    tok = None
    if isinstance(cfg.model, RandomCheckpoint):
        full, tensors = cfg.model.config, cfg.model.tensors(group.device, dtype)
        if tokenizer and cfg.model.tokenizer is not None:
            from llm_engine.tokenizer import Tokenizer

            tok = Tokenizer.from_path(cfg.model.tokenizer)
    else:
        path = cfg.model_path()
        full, tensors = load_checkpoint(path)
        if tokenizer:
            from llm_engine.tokenizer import Tokenizer

            tok = Tokenizer.from_path(path)
    model = build_model(shard_config(full, group.world), group.device, dtype)
    load_weights(model, ShardedCheckpoint(tensors, full, group.rank, group.world))
    del tensors
    if group.device.type == "cpu" and dtype == torch.float32:
        use_half_gemv(model)  # as llm_engine.loader.load_model does on CPU
    if cfg.quantize:
        quantize_model(model, cfg.quantize, include_lm_head=cfg.quantize_lm_head)
    if group.world > 1:
        parallelize(model, group, full)
    return model, tok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


@dataclass
class WorkerSpec:
    rank: int
    world: int
    init_method: str
    channel: dict
    engine_config: object  # EngineConfig
    device_type: str
    dtype: torch.dtype
    parent_pid: int


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` (or a watchdog, bench/tp_gpu.py) prints every thread's Python stack to stderr: a hung
    rank explains itself."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def worker_main(spec: WorkerSpec, status) -> None:
    """A worker rank's process: join the group, load the shard, then run the steps rank 0 sends until STOP.
    Shutdown mirrors rank 0's TensorParallel.close(): on STOP both leave the process group at the same time
    (destroying an NCCL communicator is collective); when rank 0 is gone, the worker just exits."""
    no_multicast_env()
    dump_stacks_on_sigusr1()
    device = rank_device(torch.device(spec.device_type), spec.rank)
    if device.type == "cpu":
        torch.set_num_threads(spec.engine_config.cpu_threads)
    group = channel = None
    leader_gone, left = False, True
    try:
        group = TPGroup.init(spec.rank, spec.world, device, spec.init_method)
        if spec.engine_config.tp_one_shot_max_bytes:  # collective: the same verdict as rank 0's, never raises
            group.enable_custom_all_reduce(spec.engine_config.tp_one_shot_max_bytes)
        model, _ = load_rank_model(spec.engine_config, group, spec.dtype, tokenizer=False)
        channel = StepChannel.attach(**spec.channel)
        status.put((spec.rank, "ready"))
        serve_steps(model, model.config, device, lambda: channel.receive(spec.rank - 1, spec.parent_pid))
    except ChannelClosed:
        leader_gone = True
    except BaseException:
        status.put((spec.rank, traceback.format_exc()))
        raise
    finally:
        if channel is not None:
            channel.close()
        if group is not None:
            left = group.close(destroy=not leader_gone)
        if not left:  # a communicator that could not be destroyed can hang the interpreter's exit: leave now
            status.close()
            status.join_thread()
            os._exit(1)


class TensorParallel:
    """Rank 0's side: spawns and joins the workers, holds the group, the step channel and this rank's model."""

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, ready_timeout_s: float = 1800.0):
        tp = cfg.tensor_parallel
        if device.type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel={tp} needs {tp} GPUs, {torch.cuda.device_count()} visible")
        no_multicast_env()  # inherited by the workers
        self.device = rank_device(device, 0)
        self.channel = StepChannel.create(readers=tp - 1)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.status = ctx.Queue()
        self.procs = [ctx.Process(target=worker_main, name=f"llm-tp-rank{r}", daemon=True, args=(
            WorkerSpec(r, tp, init_method, self.channel.spec(), cfg, device.type, dtype, os.getpid()), self.status))
            for r in range(1, tp)]
        for p in self.procs:
            p.start()
        self._closed = False
        self.runner = None  # weakref to rank 0's runner (set by it: leader_runner_class)
        atexit.register(self.close)
        try:
            self.group = TPGroup.init(0, tp, self.device, init_method)
            if cfg.tp_one_shot_max_bytes:  # collective (the same config on every rank), never raises
                self.group.enable_custom_all_reduce(cfg.tp_one_shot_max_bytes)
            else:
                self.group.custom_reason = "off by configuration (tp_one_shot_max_bytes=0)"
            self.model, self.tokenizer = load_rank_model(cfg, self.group, dtype, tokenizer=True)
            self._wait_ready(tp - 1, ready_timeout_s)
        except BaseException:
            self.close()
            raise
        log.info("tensor parallel: %d ranks (%s), one-shot all-reduce %s", tp, self.device.type,
                 "on" if self.group.custom is not None else f"off ({self.group.custom_reason})")

    def _wait_ready(self, n: int, timeout_s: float) -> None:
        import queue
        import time

        deadline = time.monotonic() + timeout_s
        ready = 0
        while ready < n:
            try:
                rank, msg = self.status.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel worker(s) {dead or 'timed out'} did not start") from None
                continue
            if msg != "ready":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{msg}")
            ready += 1

    def runner_class(self, base: type) -> type:
        return leader_runner_class(base, self)

    def publish(self, payload: bytes) -> None:
        self.channel.publish(payload)

    def call(self, runner, fn: str, *args):
        """Run `fn(runner, *args)` ("module:function") on every rank at once; returns rank 0's result."""
        from llm_engine.parallel.runner import resolve

        self.publish(encode(CALL, {"fn": fn, "args": args}))
        return resolve(fn)(runner, *args)

    def close(self) -> None:
        """Stop the workers: STOP through the channel; destroy rank 0's CUDA graphs (NCCL's destroy waits until no
        graph that captured its collectives is left: a graph still held makes it wait forever); leave the process
        group at the same time as the workers do (collective for NCCL, bounded); join them (terminated if they do
        not exit). Rank 0's runner does decode steps eagerly afterwards (nothing should step a closed engine)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ChannelClosed, ValueError, OSError):
            self.channel.publish(encode(STOP), timeout_s=5.0)
        runner = self.runner() if self.runner is not None else None
        if runner is not None:  # NCCL's destroy waits for every CUDA graph that captured its collectives to go
            runner.close()
        gc.collect()
        group = getattr(self, "group", None)
        if group is not None:
            alive = all(p.is_alive() for p in self.procs)
            group.close(destroy_timeout_s=20.0 if alive else 5.0)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                log.warning("tensor-parallel worker %s did not exit: terminating it", p.name)
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.channel.close()


def is_local_path(model) -> bool:
    return model is None or isinstance(model, (str, Path))
