"""Tensor-parallel plumbing in isolation, on the GPUs of one host, one clear line per step (rank 0 prints; any
rank's failure is printed with its rank) — the first thing a TP GPU run does, so that a failure names its layer:

    devices    GPU names, peer access and peer atomics between every pair
    nccl       process group up; NCCL all-reduce eager (8 KiB bf16: right sum?, µs) and inside a CUDA graph
               (all-reduce + all-gather chained, captured, replayed: right result?, µs per all-reduce)
    ipc        CUDA IPC alone: allocate, export, exchange, open every peer's region (llm_engine/parallel/cuda_ipc.py)
    one-shot   the engine's set-up with its self-test (llm_engine/parallel/one_shot_setup.py); then µs per call
               eager and in a graph at 8 KiB
    destroy    leaving the process group (collective for NCCL), timed

    python3 bench/tp_diag.py [--ranks 2]      (NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 forced)

Every step is caught: a failing step prints FAIL and the next ones still run where they can."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

from llm_engine.parallel.group import TPGroup, no_multicast_env  # noqa: E402
from llm_engine.parallel.launch import dump_stacks_on_sigusr1  # noqa: E402


def _say(rank: int, msg: str, every_rank: bool = False) -> None:
    if rank == 0 or every_rank:
        print(f"[diag rank {rank}] {msg}", flush=True)


def _step(rank: int, name: str, fn) -> object:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
        _say(rank, f"{name}: FAIL after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}", every_rank=True)
        traceback.print_exc()
        return None
    _say(rank, f"{name}: OK in {time.perf_counter() - t0:.2f} s{'' if out in (None, True) else f' ({out})'}")
    return out if out is not None else True


def _nccl_eager(group: TPGroup) -> str:
    x = torch.full((4096,), float(group.rank + 1), dtype=torch.bfloat16, device=group.device)  # [4096] = 8 KiB
    y = x.clone()
    dist.all_reduce(y)
    want = group.world * (group.world + 1) / 2
    if not bool((y == want).all()):
        raise RuntimeError(f"wrong sum {float(y[0])} (want {want})")
    for _ in range(20):
        dist.all_reduce(x.clone())
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(y)
    torch.cuda.synchronize()
    return f"right sum; {(time.perf_counter() - t0) / 200 * 1e6:.1f} us per 8 KiB all-reduce, eager"


def _nccl_graph(group: TPGroup) -> str:
    """The engine's in-graph pattern: all-reduces of a hidden vector and an all-gather of logit columns."""
    x = torch.full((4096,), 1.0, dtype=torch.bfloat16, device=group.device)  # [4096]
    cols = torch.full((1, 64), float(group.rank), dtype=torch.float32, device=group.device)  # [1, 64]

    def chain():
        y = x.clone()
        for _ in range(10):
            dist.all_reduce(y)
            y.mul_(1.0 / group.world)
        return y, group.all_gather_cols(cols)

    chain()  # eager warm-up on every rank before capture (NCCL connects lazily)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, gathered = chain()
    g.replay()
    torch.cuda.synchronize()
    if not bool((y == 1.0).all()):
        raise RuntimeError(f"in-graph all-reduce chain gave {float(y[0])}, want 1.0")
    want = torch.arange(group.world, device=group.device, dtype=torch.float32).repeat_interleave(64)
    if not torch.equal(gathered[0], want):
        raise RuntimeError("in-graph all-gather of columns is wrong")
    dist.barrier()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return f"right results; {s.elapsed_time(e) * 1e3 / (20 * 11):.1f} us per collective in a graph"


def _ipc_alone(group: TPGroup) -> str:
    from llm_engine.parallel.cuda_ipc import PeerRegions

    regions = PeerRegions(group.rank, group.world, group.device, 1 << 20, group.all_gather_object)
    addrs = [hex(a) for a in regions.addrs]
    torch.cuda.synchronize()
    regions.close()
    return f"opened every peer's region: {addrs}"


def _one_shot_speed(group: TPGroup) -> str:
    ar = group.custom
    x = torch.randn(4096, device=group.device).to(torch.bfloat16)
    for _ in range(20):
        ar(x)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(200):
        ar(x)
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / 200 * 1e6
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x
        for _ in range(50):
            y = ar(y)
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    if ar.timeouts():
        raise RuntimeError("a call timed out waiting for a peer")
    return f"8 KiB: {eager:.1f} us eager, {s.elapsed_time(e) * 1e3 / 500:.2f} us in a graph"


def _rank(rank: int, world: int, port: int) -> None:
    dump_stacks_on_sigusr1()
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    if rank == 0:
        ok = [[torch.cuda.can_device_access_peer(i, j) for j in range(world) if j != i] for i in range(world)]
        _say(rank, f"devices: {world} x {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL "
                   f"{torch.cuda.nccl.version()}, peer access {ok}")
    box = []
    if not _step(rank, "nccl init", lambda: box.append(TPGroup.init(rank, world, dev, f"tcp://127.0.0.1:{port}",
                                                                    timeout_s=120))):
        return
    group = box[0]
    if rank == 0:
        from llm_engine.parallel.cuda_ipc import CudaDriver

        _step(rank, "peer atomics", lambda: str([CudaDriver().p2p_atomics(0, j) for j in range(1, world)]))
    _step(rank, "nccl all-reduce eager", lambda: _nccl_eager(group))
    _step(rank, "nccl collectives in a CUDA graph", lambda: _nccl_graph(group))
    _step(rank, "cuda ipc open (alone)", lambda: _ipc_alone(group))
    t0 = time.perf_counter()
    on = group.enable_custom_all_reduce(512 * 1024)
    _say(rank, f"one-shot set-up + self-test: {'OK' if on else 'FAIL -> NCCL only: ' + group.custom_reason} "
               f"in {time.perf_counter() - t0:.2f} s", every_rank=not on)
    if on:
        _step(rank, "one-shot speed", lambda: _one_shot_speed(group))
    t0 = time.perf_counter()
    left = group.close(destroy_timeout_s=30)
    _say(rank, f"destroy process group: {'OK' if left else 'TIMED OUT'} in {time.perf_counter() - t0:.2f} s",
         every_rank=not left)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < args.ranks:
        print(f"needs {args.ranks} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    no_multicast_env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_rank, args=(args.ranks, port), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
