"""Setting up the one-shot all-reduce (llm_engine/parallel/one_shot.py) so that tensor parallelism always runs:
every step is collective and every rank reaches the same verdict; any failure — a missing precondition, CUDA IPC
refusing a handle, a peer's writes not showing up, a wrong sum, a wait that times out — leaves the ranks on NCCL
for every size, with the reason logged, instead of killing the engine.

    1. preconditions (local, gathered): triton, 2..8 ranks, peer access and peer atomics between every pair of GPUs
    2. open the regions (PeerRegions: allocate, export, exchange, map; fails on every rank together)
    3. self-test: each rank writes a nonce into its region, every rank reads every rank's nonce back through
       its mapping; then all-reduces of fixed inputs (eager; on CUDA also replayed from a CUDA graph) must equal
       the rank-order float32 sum exactly and agree with the backend's (NCCL's) all-reduce, with no timed-out
       wait. The self-test's waits are bounded short (seconds), so a broken mapping cannot hang it.

`open_regions` is injectable: the CPU tests run all of this with gloo, Triton's interpreter and shared memory
standing in for CUDA IPC."""

from __future__ import annotations

import logging
import random
import time

import torch
import torch.distributed as dist

log = logging.getLogger("llm_engine")
SPIN_SELF_TEST = 1 << 22  # polls before a self-test call gives up on a peer (~a second; the ranks start together)
SPIN_COMPILING = 1 << 25  # the same where a call may first compile the kernel (seconds apart between ranks)
# (numel, dtype) of the self-test's calls: a batch-1 hidden vector, an odd size, the largest message
_CALLS = ((4096, torch.bfloat16), (1000, torch.float32))


def _first(gathered: list) -> str:
    return next((e for e in gathered if e), "")


def _preconditions(group) -> str:
    """'' or why this rank cannot take part (local checks; the caller gathers them)."""
    try:
        from llm_engine.parallel.one_shot import triton
    except ImportError as e:
        return f"rank {group.rank}: {e}"
    if triton is None:
        return f"rank {group.rank}: triton is not installed"
    if not 2 <= group.world <= 8:
        return f"{group.world} ranks (the kernel supports 2..8)"
    return ""


def _peer_checks(group, ordinals: list[int]) -> str:
    if group.device.type != "cuda":
        return ""
    from llm_engine.parallel.cuda_ipc import CudaDriver

    me = group.device.index
    try:
        drv = CudaDriver()
        for j in ordinals:  # the kernel reads peers' buffers and raises flags in their memory with atomics
            if j == me:
                continue
            if not torch.cuda.can_device_access_peer(me, j):
                return f"no peer-to-peer access from GPU {me} to GPU {j}"
            if not drv.p2p_atomics(me, j):
                return f"no peer-to-peer atomics from GPU {me} to GPU {j} (no NVLink?)"
    except (RuntimeError, OSError) as e:
        return f"rank {group.rank}: {e}"
    return ""


def _inputs(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s self-test input (CPU; every rank can make every rank's)."""
    g = torch.Generator().manual_seed(1000 * rank + numel)
    return torch.randn(numel, generator=g).to(dtype)  # [numel]


def _check_sums(group, ar, calls) -> str:
    """Eager calls of the one-shot kernel vs the exact rank-order sum and the backend's all-reduce. Every rank
    makes every call whatever happens to it (a rank that stopped early would leave its peers waiting, and the
    backend's collectives out of step): the backend's all-reduces first, then all the one-shot calls."""
    dev = group.device
    inputs = [[_inputs(r, numel, dtype) for r in range(group.world)] for numel, dtype in calls]
    refs = []
    for xs in inputs:
        ref = xs[group.rank].to(dev, copy=True)  # (all_reduce sums in place)
        dist.all_reduce(ref, group=group.pg)  # NCCL (gloo on CPU)
        refs.append(ref.cpu())
    err = ""
    for (numel, dtype), xs, ref in zip(calls, inputs, refs, strict=True):
        got = ar(xs[group.rank].to(dev)).cpu()
        if err:
            continue
        exact = sum(x.float() for x in xs).to(dtype)  # [numel]: rank order, float32 accumulate, one rounding
        if group.device.type == "cuda":
            wrong = got != exact  # a GPU rounds the float32 sum to nearest, as torch does: bit-identical
        else:  # Triton's interpreter (CPU tests) rounds float32 -> 16-bit toward zero: one unit in the last place
            ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(dtype, 0.0)
            wrong = (got.float() - exact.float()).abs() > ulp * exact.float().abs() + 1e-6
        tol = 2.0 ** -6 if dtype != torch.float32 else 1e-5  # the backend may add in another order
        if bool(wrong.any()):
            err = (f"rank {group.rank}: one-shot sum of {numel} {dtype} differs from the exact sum in "
                   f"{int(wrong.sum())} values")
        elif not torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol):
            diff = float((got.float() - ref.float()).abs().max())
            err = f"rank {group.rank}: one-shot and {dist.get_backend(group.pg)} all-reduce differ by {diff:.3g}"
    return err


def _check_graph(group, ar) -> str:
    """Two chained calls captured in a CUDA graph, replayed three times: the replays must give the eager result
    (every replay runs on every rank, as in _check_sums)."""
    numel, dtype = _CALLS[0]
    x = _inputs(group.rank, numel, dtype).to(group.device)
    want = ar(ar(x)).cpu()  # eager, same chain
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ar(ar(x))
    err = ""
    for i in range(3):
        g.replay()
        torch.cuda.synchronize(group.device)
        if not err and not torch.equal(y.cpu(), want):
            err = f"rank {group.rank}: replay {i} of a captured one-shot all-reduce differs from the eager call"
    return err


def self_test(group, ar) -> str:
    """Collective. '' when the one-shot all-reduce works between every pair of ranks, else the first reason."""
    cuda = group.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(group.device)) if cuda else (lambda: None)
    from llm_engine.parallel.one_shot import PROBE_OFF

    nonce, err = (1 << 40) + 2 * random.getrandbits(30) + 1, ""  # nonzero (the region starts zeroed), int64
    try:
        ar.write_probe(nonce)
        sync()
    except RuntimeError as e:
        err = f"rank {group.rank}: writing the probe word: {e}"
    gathered = group.all_gather_object((nonce, err))
    err = _first([e for _, e in gathered])
    if err:
        return err
    try:
        seen = ar.read_words(PROBE_OFF)
        want = [n for n, _ in gathered]
        if seen != want:
            bad = [r for r in range(group.world) if seen[r] != want[r]]
            err = f"rank {group.rank} does not see rank(s) {bad}'s writes through CUDA IPC"
    except RuntimeError as e:
        err = f"rank {group.rank}: reading the peers' probe words: {e}"
    err = _first(group.all_gather_object(err))
    if err:
        return err
    calls = _CALLS + ((ar.buf_bytes // 2, torch.bfloat16),)
    steady, ar.max_spin = ar.max_spin, SPIN_SELF_TEST
    try:
        precompiled = True
        try:
            for numel, dtype in calls:  # compile first, so that no rank's first call waits out another's compile
                precompiled &= ar.compile_for(torch.empty(numel, dtype=dtype, device=group.device))
        except Exception as e:  # noqa: BLE001 - no compile-only path here: the first calls compile
            log.info("one-shot self-test: compiling ahead failed (%s: %s); the first call compiles",
                     type(e).__name__, e)
            precompiled = False
        if not all(group.all_gather_object(precompiled)):  # (also the start line of the calls below)
            ar.max_spin = SPIN_COMPILING  # a peer's first call may wait out this rank's compile
        try:
            err = _check_sums(group, ar, calls)
            if not err and cuda:
                err = _check_graph(group, ar)
            sync()
            if not err and ar.timeouts():
                err = f"rank {group.rank}: a one-shot call timed out waiting for a peer's flag"
        except Exception as e:  # noqa: BLE001 - a launch/capture failure of any kind: NCCL instead
            err = f"rank {group.rank}: {type(e).__name__}: {e}"
            try:
                sync()  # nothing of this rank may still run on the buffers when the verdict frees them
            except Exception as e2:  # noqa: BLE001 - a broken context: reported with the first error
                err += f"; then {type(e2).__name__}: {e2}"
        return _first(group.all_gather_object(err))
    finally:
        ar.max_spin = steady


def setup_one_shot(group, max_bytes: int, open_regions=None):
    """Collective: (OneShotAllReduce, regions, '') when it passed its self-test, else (None, None, reason)."""
    t0 = time.monotonic()
    reason = _first(group.all_gather_object(_preconditions(group)))
    if not reason:
        ordinals = group.all_gather_object(group.device.index)
        reason = _first(group.all_gather_object(_peer_checks(group, ordinals)))
    if reason:
        return None, None, reason
    from llm_engine.parallel.one_shot import OneShotAllReduce, region_bytes

    if open_regions is None:
        from llm_engine.parallel.cuda_ipc import PeerRegions as open_regions
    try:
        regions = open_regions(group.rank, group.world, group.device, region_bytes(max_bytes),
                               group.all_gather_object)
    except RuntimeError as e:  # raised on every rank together
        return None, None, f"CUDA IPC: {e}"
    ar = OneShotAllReduce(regions.ptrs, group.rank, group.world, max_bytes)
    reason = self_test(group, ar)
    if reason:
        if group.device.type == "cuda":
            torch.cuda.synchronize(group.device)
        regions.close()
        return None, None, f"self-test: {reason}"
    log.info("one-shot all-reduce on: %d ranks, messages up to %d KiB (set up and self-tested in %.1f s)",
             group.world, max_bytes >> 10, time.monotonic() - t0)
    return ar, regions, ""
