"""Tensor-parallel set-up and shutdown without a GPU: the CUDA IPC handle through ctypes against a compiled stand-in
for libcuda (a 64-byte struct by value, NUL bytes included — the bug that made every open fail with "invalid
argument"), PeerRegions failing together on every rank, the one-shot set-up's self-test and its fall-back to the
backend's all-reduce (gloo, Triton's interpreter, shared memory standing in for CUDA IPC, 2 processes), the
kernel's bounded wait, and the stack dumps a hung piece prints before it is killed."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUF = 1 << 16  # one-shot buffer bytes in the CPU runs
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


# -- CUDA IPC through ctypes, against a compiled stand-in for libcuda ------------------------------------------
@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    out = tmp_path_factory.mktemp("libcuda") / "libfakecuda.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(ROOT / "tests" / "fake_libcuda.c")],
                   check=True)
    return str(out)


def _counter(lib_path: str, name: str):
    import ctypes

    return ctypes.c_int.in_dll(ctypes.CDLL(lib_path), name)


def test_ipc_handle_with_nul_bytes_goes_by_value_and_round_trips(fake_libcuda):
    from llm_engine.parallel.cuda_ipc import CudaDriver

    drv = CudaDriver(fake_libcuda)
    drv.require_context()
    p = drv.alloc_zeroed(256)
    h = drv.export(p)
    assert len(h) == 64 and h[0] == 0xAB and h[1] == 0  # opaque bytes: a NUL early on, data after it
    assert drv.open(pickle.loads(pickle.dumps(h))) == p  # through pickling (the process group's object gather)
    with pytest.raises(RuntimeError, match=r"cuIpcOpenMemHandle failed: CUDA error 1 \(invalid argument\)"):
        drv.open(h[:63] + bytes([h[63] ^ 1]))  # one byte off: the stand-in sees every byte
    with pytest.raises(ValueError, match="64 bytes"):
        drv.open(h[:1])
    drv.close(p)
    drv.free(p)
    assert drv.p2p_atomics(0, 1) and not drv.p2p_atomics(0, 0)


def _in_threads(world: int, make):
    """Run make(rank, all_gather_object) in `world` threads of this process; their results (or exceptions)."""
    barrier, slots, results = threading.Barrier(world, timeout=60), [None] * world, [None] * world

    def gather_for(rank):
        def all_gather_object(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()  # everyone read before anyone writes the next round
            return out
        return all_gather_object

    def run(rank):
        try:
            results[rank] = make(rank, gather_for(rank))
        except RuntimeError as e:
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_peer_regions_map_every_region_and_fail_together(fake_libcuda):
    from llm_engine.parallel.cuda_ipc import CudaDriver, PeerRegions

    live, mapped, fail = (_counter(fake_libcuda, n) for n in ("live_allocs", "open_mappings", "fail_open"))

    def make(rank, gather):
        return PeerRegions(rank, 2, torch.device("cpu"), 4096, gather, driver=CudaDriver(fake_libcuda))

    regions = _in_threads(2, make)
    assert all(isinstance(r, PeerRegions) for r in regions), regions
    assert regions[0].addrs == regions[1].addrs and len(set(regions[0].addrs)) == 2  # one process: same addresses
    assert regions[0].ptrs.tolist() == regions[0].addrs and (live.value, mapped.value) == (2, 2)
    for r in regions:
        r.close()
    assert (live.value, mapped.value) == (0, 0)

    fail.value = 1  # every open fails: both ranks raise the same (rank 0's) error, nothing stays allocated
    try:
        errors = _in_threads(2, make)
    finally:
        fail.value = 0
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError]
    assert str(errors[0]) == str(errors[1]) == "rank 0: cuIpcOpenMemHandle failed: CUDA error 1 (invalid argument)"
    assert (live.value, mapped.value) == (0, 0)


# -- the one-shot set-up over gloo, Triton's interpreter and shared memory (2 processes) --------------------------
class _ShmRegions:
    """CUDA IPC's stand-in: rank r's region is the shared-memory segment names[r]. blind_rank: that rank's view of
    its peers is a private zeroed buffer (a mapping that never shows the peer's writes)."""

    def __init__(self, names, rank, world, nbytes, all_gather_object, blind_rank):
        self.shms = [SharedMemory(n) for n in names]
        views = [torch.frombuffer(s.buf, dtype=torch.uint8)[:nbytes] for s in self.shms]
        if rank == blind_rank:
            views = [v if r == rank else torch.zeros(nbytes, dtype=torch.uint8) for r, v in enumerate(views)]
        self.views = views  # keeps the buffers alive
        self.addrs = [v.data_ptr() for v in views]
        self.ptrs = torch.tensor(self.addrs, dtype=torch.int64)  # [W]
        all_gather_object(None)

    def close_peers(self):
        self.views = []

    def close(self):
        self.close_peers()
        for s in self.shms:
            s.close()


def _setup_rank(rank, world, port, names, blind_rank, q):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this process
    sys.path.insert(0, str(ROOT))
    from llm_engine.parallel.group import TPGroup

    group = TPGroup.init(rank, world, "cpu", f"tcp://127.0.0.1:{port}")

    def open_regions(rank_, world_, device, nbytes, all_gather_object):
        return _ShmRegions(names, rank_, world_, nbytes, all_gather_object, blind_rank)

    on = group.enable_custom_all_reduce(BUF, open_regions=open_regions)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)  # [4096]
    y = group.all_reduce(x.clone())  # the one-shot kernel when on, gloo when not
    # numpy pickles by value; a torch tensor goes through the queue as a shared-memory fd that the parent fetches
    # from this process, which may have exited by then (CI: ConnectionResetError in rebuild_storage_fd)
    q.put((rank, on, group.custom_reason, y.float().numpy()))
    group.close()


def _run_setup(blind_rank):
    from llm_engine.parallel.one_shot import COUNTS_OFF, NPROG, region_bytes

    world = 2
    shms = [SharedMemory(create=True, size=region_bytes(BUF)) for _ in range(world)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_setup_rank, args=(r, world, port, [m.name for m in shms], blind_rank, q))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        got = {r: (on, reason, torch.from_numpy(y)) for r, on, reason, y in (q.get(timeout=300) for _ in procs)}
        for p in procs:
            p.join(60)
        # each program's generation on each rank: how many one-shot calls ran
        calls = [set(torch.frombuffer(bytearray(m.buf[COUNTS_OFF:COUNTS_OFF + 8 * NPROG]), dtype=torch.int64)
                     .tolist()) for m in shms]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for m in shms:
            m.close()
            m.unlink()
    assert [p.exitcode for p in procs] == [0, 0]
    xs = [torch.randn(4096, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16) for r in range(world)]
    exact = sum(x.float() for x in xs).to(torch.bfloat16).float()
    return got, exact, calls


@needs_triton
def test_one_shot_set_up_passes_its_self_test_and_serves_the_all_reduce():
    got, exact, calls = _run_setup(blind_rank=None)
    for r in (0, 1):
        on, reason, y = got[r]
        assert on and reason == ""
        # the interpreter rounds the float32 sum to bf16 toward zero (a GPU: to nearest, bit-equal to `exact`)
        assert ((y - exact).abs() <= 2 ** -7 * exact.abs()).all()
    assert torch.equal(got[0][2], got[1][2])  # the one-shot kernel: rank order, fp32 accumulate, bit-identical
    assert calls == [{4}, {4}]  # 3 self-test calls (8 KiB, an odd size, the largest message) + the one above


@needs_triton
def test_a_mapping_that_hides_the_peers_writes_falls_back_on_every_rank():
    got, exact, calls = _run_setup(blind_rank=1)
    for r in (0, 1):
        on, reason, y = got[r]
        assert not on and reason == "self-test: rank 1 does not see rank(s) [0]'s writes through CUDA IPC"
        assert torch.allclose(y, exact, rtol=2 ** -7, atol=0)  # gloo served it, the ranks still in step
    assert calls == [{0}, {0}]  # caught before any one-shot call: no wait on a peer that cannot be seen


def _spin_rank(q):
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from llm_engine.parallel.one_shot import NPROG, OneShotAllReduce, region_bytes

    regions = [torch.zeros(region_bytes(BUF), dtype=torch.uint8) for _ in range(2)]
    ptrs = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64)
    ar = OneShotAllReduce(ptrs, 0, 2, BUF, max_spin=32)  # rank 1 never comes
    y = ar(torch.ones(64))
    q.put((NPROG, ar.timeouts(), y.tolist()))


@needs_triton
def test_a_peer_that_never_comes_costs_a_bounded_wait_and_is_counted():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_spin_rank, args=(q,))
    p.start()
    nprog, timeouts, y = q.get(timeout=120)
    p.join(30)
    assert timeouts == nprog  # every program gave up once
    assert y == [1.0] * 64  # its own values plus the peer's (still zeroed) buffer


# -- stack dumps of a hung piece, TP worker processes included --------------------------------------------------
_HANG = """
import subprocess, sys, time
sys.path.insert(0, {root!r})
from llm_engine.parallel.launch import dump_stacks_on_sigusr1
dump_stacks_on_sigusr1()
def {name}():
    {body}
    print("ready", flush=True)
    time.sleep(120)
{name}()
"""


def test_a_late_piece_dumps_the_stacks_of_all_its_processes_before_the_kill(monkeypatch):
    import bench.tp_gpu as tg

    worker = _HANG.format(root=str(ROOT), name="worker_waits_in_a_collective", body="pass")
    leader = _HANG.format(root=str(ROOT), name="leader_waits_for_its_worker",
                          body=f"subprocess.Popen([sys.executable, '-c', {worker!r}])")
    p = subprocess.Popen([sys.executable, "-c", leader], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert p.stdout.readline().strip() == "ready"  # the worker is up too (same process group)
        monkeypatch.setattr(tg, "KILL_GRACE_S", 1)
        tg.kill_piece(p)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert "in leader_waits_for_its_worker" in out and "in worker_waits_in_a_collective" in out, out


# -- shutdown order: CUDA graphs go before the communicator they captured ----------------------------------------
class _RecordingRunner:
    events: list[str] = []

    def __init__(self, model, model_cfg, device, **kwargs):
        self.events.append("init")

    def close(self):
        self.events.append("runner.close")


def test_the_worker_drops_its_runners_graphs_on_stop():
    from llm_engine.parallel import steps
    from llm_engine.parallel.runner import serve_steps

    msgs = iter([steps.encode(steps.INIT, {"cls": _RecordingRunner, "kwargs": {}}), steps.encode(steps.STOP)])
    _RecordingRunner.events = []
    serve_steps(None, None, torch.device("cpu"), lambda: memoryview(next(msgs)))
    assert _RecordingRunner.events == ["init", "runner.close"]  # (then worker_main leaves the group)


def test_rank0_close_drops_the_runners_graphs_before_leaving_the_group():
    import weakref

    from llm_engine.parallel.launch import TensorParallel

    events = []

    class Channel:
        def publish(self, payload, timeout_s=None):
            events.append("STOP sent")

        def close(self):
            events.append("channel.close")

    class Group:
        def close(self, destroy=True, destroy_timeout_s=20.0):
            events.append("group.close")
            return True

    class Runner:
        def close(self):
            events.append("runner.close")

    runner = Runner()
    tp = TensorParallel.__new__(TensorParallel)  # its state without processes: the order of close() alone
    tp._closed, tp.procs, tp.channel, tp.group, tp.runner = False, [], Channel(), Group(), weakref.ref(runner)
    tp.close()
    tp.close()  # idempotent
    assert events == ["STOP sent", "runner.close", "group.close", "channel.close"]
