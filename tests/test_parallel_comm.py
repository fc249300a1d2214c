"""The tensor-parallel plumbing without a GPU: the one-shot all-reduce kernel in Triton's interpreter (two
processes over shared memory standing in for CUDA IPC buffers), the shared-memory step channel, and the step
message codec on a real ModelRunner's inputs."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_engine.parallel import steps
from llm_engine.parallel.channel import StepChannel

ROOT = Path(__file__).resolve().parents[1]
CALLS = [(4096, "bfloat16"), (100, "float32"), (7, "float16"), (30000, "bfloat16"), (1, "float32"),
         (4096, "bfloat16")]  # 8 KiB = a batch-1 GLM-4-9B hidden vector, first and again after the others


def _one_shot_rank(rank: int, names: list[str], buf_bytes: int, q) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from llm_engine.parallel.one_shot import DATA_OFF, FLAGS_BYTES, NPROG, OneShotAllReduce

    shms = [SharedMemory(n) for n in names]
    regions = [torch.frombuffer(s.buf, dtype=torch.uint8) for s in shms]
    ptrs = torch.tensor([r.data_ptr() for r in regions], dtype=torch.int64)  # as CUDA IPC gives on a GPU
    ar = OneShotAllReduce(ptrs, rank, len(names), buf_bytes)
    outs = []
    for call, (n, dt) in enumerate(CALLS):
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank * 1000 + call)).to(getattr(torch, dt))
        assert ar.fits(x)
        y = ar(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        outs.append(y.float().numpy())  # exact for every dtype here; plain pickling through the queue
    counts = regions[rank][FLAGS_BYTES:DATA_OFF].view(torch.int64)[:NPROG].tolist()
    q.put((rank, outs, counts))
    del regions, ptrs, ar
    for s in shms:
        s.close()


# (find_spec, not import: the spawned ranks import this module and must import triton only after
# TRITON_INTERPRET is set)
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_one_shot_all_reduce_in_the_interpreter_with_two_processes():
    from llm_engine.parallel.one_shot import NPROG, region_bytes

    world, buf_bytes = 2, 1 << 16
    shms = [SharedMemory(create=True, size=region_bytes(buf_bytes)) for _ in range(world)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_one_shot_rank, args=(r, [s.name for s in shms], buf_bytes, q)) for r in range(world)]
    try:
        for p in procs:
            p.start()
        got = dict((r, (o, c)) for r, o, c in (q.get(timeout=240) for _ in procs))
        for p in procs:
            p.join(30)
    finally:
        for s in shms:
            s.close()
            s.unlink()
    for call, (n, dt) in enumerate(CALLS):
        xs = [torch.randn(n, generator=torch.Generator().manual_seed(r * 1000 + call)) for r in range(world)]
        dtype = getattr(torch, dt)
        ref = sum(x.to(dtype).float() for x in xs)  # rank order, float32
        a, b = torch.from_numpy(got[0][0][call]), torch.from_numpy(got[1][0][call])
        assert a.shape == (n,) and torch.equal(a, b), f"ranks disagree on call {call}"  # bit-identical
        # the interpreter rounds float32 -> bf16/fp16 toward zero, a GPU to nearest: allow one unit in the last place
        ulp = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
        assert ((a - ref).abs() <= ulp * ref.abs() + 1e-6).all(), call
    for r in range(world):  # every program's generation advanced once per call, in lockstep on both ranks
        assert got[r][1] == [len(CALLS)] * NPROG


def _read_all(spec: dict, n: int, q) -> None:
    ch = StepChannel.attach(**spec)
    q.put([bytes(ch.receive(0, parent_pid=os.getppid())) for _ in range(n)])
    ch.close()


def test_step_channel_delivers_in_order_across_processes_and_wraps():
    ch = StepChannel.create(readers=1, slots=3, slot_bytes=256)
    msgs = [bytes([i]) * (1 + 17 * i % 256) for i in range(20)]  # more messages than slots: the ring wraps
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_read_all, args=(ch.spec(), len(msgs), q))
    p.start()
    try:
        for m in msgs:
            ch.publish(m)  # blocks while the reader is 3 behind
        assert q.get(timeout=60) == msgs
        p.join(30)
    finally:
        ch.close()
    assert ch.next_seq == len(msgs) + 1


def test_step_channel_refuses_oversized_messages_and_reports_stuck_readers():
    ch = StepChannel.create(readers=2, slots=2, slot_bytes=64)
    try:
        with pytest.raises(ValueError, match="exceeds"):
            ch.publish(b"x" * 65)
        ch.publish(b"a")
        ch.publish(b"b")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="stopped reading"):
            ch.publish(b"c", timeout_s=0.05)  # nobody consumed message 1: its slot is not free
        assert time.monotonic() - t0 < 30
    finally:
        ch.close()


def test_step_messages_round_trip_a_real_runners_inputs():
    from test_tensor_parallel import GLM4

    from llm_engine.block_manager import BlockManager
    from llm_engine.model_runner import ModelRunner
    from llm_engine.models import build_model
    from llm_engine.models.weights import init_random_weights
    from llm_engine.sampling_params import SamplingParams
    from llm_engine.scheduler import Scheduler
    from llm_engine.sequence import Sequence

    model = init_random_weights(build_model(GLM4))
    runner = ModelRunner(model, GLM4, num_kv_blocks=16, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                         max_model_len=256, device=torch.device("cpu"), dtype=torch.float32)
    sched = Scheduler(BlockManager(16, 16), max_num_seqs=4, max_num_batched_tokens=64, max_waiting=8,
                      max_model_len=256)
    gen = torch.Generator().manual_seed(1)
    for i, n in enumerate((5, 20)):
        seq = Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(temperature=0.5, seed=3, max_tokens=8))
        seq.generator = gen
        sched.add(seq)
    made = {}
    orig = runner._tensor

    def record(a):
        t = orig(a)
        made[id(t)] = a
        return t

    runner._tensor = record
    inp = runner.prepare_inputs(sched.schedule())
    kind, tree = steps.decode(memoryview(steps.encode(steps.EAGER, steps.pack_inputs(inp, made))))
    back = steps.unpack_inputs(tree, orig)
    assert kind == steps.EAGER and type(back) is type(inp)
    assert torch.equal(back.input_ids, inp.input_ids) and torch.equal(back.meta.block_tables, inp.meta.block_tables)
    assert back.meta.query_lens_cpu == inp.meta.query_lens_cpu and back.sample_rows == inp.sample_rows
    assert back.generators == [None, None]  # workers never sample
    with torch.inference_mode():
        assert torch.equal(runner.forward(back), runner.forward(inp))
    rows = np.arange(12, dtype=np.int64).reshape(3, 4)
    kind, (b, got) = steps.decode(memoryview(steps.encode_graph(3, rows)))
    assert kind == steps.GRAPH and b == 3 and np.array_equal(got, rows)
    with pytest.raises(RuntimeError, match="not made by ModelRunner._upload"):
        steps.pack_inputs(inp, {})


class _FakeGraphs:
    def __init__(self, rows: int, cols: int):
        self.staging = torch.zeros(rows, cols, dtype=torch.int64)
        self.replayed: list[tuple[int, torch.Tensor]] = []

    def replay(self, b: int) -> None:
        self.replayed.append((b, self.staging[:b].clone()))


class _FakeRunner:
    """The parts of GpuModelRunner a decode-graph step touches: pinned staging (_h_st, numpy view _n_st)."""

    block_size = 16

    def __init__(self, rows: int = 8, cols: int = 7 + 16):
        self._h_st = torch.zeros(rows, cols, dtype=torch.int64)
        self._n_st = self._h_st.numpy()
        self.graphs = _FakeGraphs(rows, cols)


def test_decode_graph_steps_reach_the_worker_with_the_used_columns():
    from llm_engine.cuda_graphs import COL_ID, COL_SEQ_LEN, STAGING_COLS
    from llm_engine.parallel.runner import _GraphSteps, _PublishingGraphs

    sent = []
    leader = _FakeRunner()
    leader._tp = type("Leader", (), {"publish": staticmethod(sent.append)})()
    published = _PublishingGraphs(leader.graphs, leader)
    worker, steps_ = _FakeRunner(), _GraphSteps()
    worker._n_st[:] = -5  # stale garbage past the used columns stays harmless
    for b, lens in ((4, [17, 3, 40, 1]), (2, [5, 33])):
        st = leader._n_st
        st[:b] = 0
        st[:b, COL_ID] = np.arange(b) + 100
        st[:b, COL_SEQ_LEN] = lens
        for i, n in enumerate(lens):
            st[i, STAGING_COLS:STAGING_COLS + -(-n // 16)] = np.arange(-(-n // 16)) + 10 * i
        published.replay(b)  # rank 0: send, then replay its own graph
        kind, (bb, rows) = steps.decode(memoryview(sent[-1]))
        assert kind == steps.GRAPH and bb == b and rows.shape == (b, STAGING_COLS + -(-max(lens) // 16))
        steps_.replay(worker, bb, rows)
        w = rows.shape[1]
        b_w, staged = worker.graphs.replayed[-1]
        assert b_w == b and torch.equal(staged[:, :w], torch.from_numpy(st[:b, :w]))
    assert [b for b, _ in leader.graphs.replayed] == [4, 2]
