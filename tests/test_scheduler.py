"""Scheduler: continuous batching, decode priority, chunked prefill, preemption, admission control.
Pure Python: a fake "model" appends a fixed token to every sequence that samples."""

import pytest

from llm_engine.block_manager import BlockManager
from llm_engine.sampling_params import SamplingParams
from llm_engine.scheduler import EngineOverloaded, Scheduler
from llm_engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, max_waiting=16, max_model_len=1024):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_waiting=max_waiting,
                     max_model_len=max_model_len)


def seq(rid, n, max_tokens=8, base=0):
    return Sequence(rid, [base + i for i in range(n)], SamplingParams(max_tokens=max_tokens),
                    stop_token_ids=frozenset({-1}))


def step(sch, token=7):
    batch = sch.schedule()
    sampled = [[token] if batch.samples(i) else [] for i in range(len(batch))]
    sch.postprocess(batch, sampled)
    return batch


def run_all(sch, limit=10_000):
    for _ in range(limit):
        if not sch.has_unfinished():
            return
        step(sch)
    raise AssertionError("did not finish")


def test_prefill_then_decode_then_finish_by_length():
    sch = make()
    s = seq("a", 5, max_tokens=3)
    sch.add(s)
    b = step(sch)
    assert b.num_tokens == [5] and b.num_decodes == 0 and len(s) == 6
    b = step(sch)
    assert b.num_tokens == [1] and b.num_decodes == 1
    step(sch)
    assert s.status is SequenceStatus.FINISHED and s.finish_reason == "length" and s.num_completion_tokens == 3
    assert sch.bm.num_free_blocks == 64


def test_stop_token_finishes():
    sch = make()
    s = seq("a", 3)
    sch.add(s)
    step(sch, token=-1)
    assert s.finish_reason == "stop" and s.completion_token_ids == [-1]
    assert not sch.has_unfinished() and sch.bm.num_free_blocks == 64


def test_token_budget_respected_and_long_prompt_is_chunked():
    sch = make(budget=16)
    long = seq("long", 50)
    sch.add(long)
    chunks = []
    while long.num_completion_tokens == 0:
        b = step(sch)
        assert b.total_tokens <= 16
        chunks.append(b.num_tokens[0])
    assert chunks == [16, 16, 16, 2]


def test_decode_priority_and_interleaving_with_chunked_prefill():
    sch = make(budget=8)
    runners = [seq(f"r{i}", 3, max_tokens=100, base=100 * i) for i in range(3)]
    for s in runners:
        sch.add(s)
    step(sch)  # prefill of the three short prompts (9 tokens > 8: the third is chunked)
    while any(s.num_completion_tokens == 0 for s in runners):
        step(sch)
    before = [s.num_completion_tokens for s in runners]
    long = seq("long", 40, max_tokens=4, base=1000)
    sch.add(long)
    steps = 0
    while long.num_completion_tokens == 0:
        b = step(sch)
        steps += 1
        # every running decode comes first, every step, and the prefill chunk fills the rest of the budget
        assert b.num_decodes == 3 and [x.request_id for x in b.seqs[:3]] == ["r0", "r1", "r2"]
        assert b.seqs[3] is long and b.num_tokens[3] == min(5, 40 - 5 * (steps - 1))
        assert b.total_tokens <= 8
    assert steps == 8
    assert [s.num_completion_tokens - n for s, n in zip(runners, before, strict=True)] == [steps] * 3


def test_max_num_seqs_limits_running():
    sch = make(max_num_seqs=2)
    for i in range(4):
        sch.add(seq(f"s{i}", 2))
    b = sch.schedule()
    assert len(b) == 2 and len(sch.running) == 2 and len(sch.waiting) == 2


def test_admission_control_raises_engine_overloaded():
    sch = make(max_waiting=3)
    for i in range(3):
        sch.add(seq(f"s{i}", 2))
    with pytest.raises(EngineOverloaded, match=r"engine overloaded: 3 requests waiting \(max_waiting=3\)"):
        sch.add(seq("x", 2))
    assert len(sch.waiting) == 3


def test_request_that_can_never_fit_is_rejected():
    sch = make(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="KV cache capacity of 16 tokens"):
        sch.add(seq("big", 10, max_tokens=10))
    with pytest.raises(ValueError, match="max_model_len=64"):
        make(max_model_len=64).add(seq("long", 60, max_tokens=10))
    with pytest.raises(ValueError, match="empty prompt"):
        sch.add(seq("empty", 0))
    assert not sch.waiting


def test_preemption_newest_first_when_blocks_run_out_and_all_complete():
    # 6 blocks of 4 tokens; 3 sequences of 4 prompt tokens growing by 8 each need 9 blocks: someone is preempted.
    sch = make(num_blocks=6, block_size=4, budget=64)
    seqs = [seq(f"s{i}", 4, max_tokens=8, base=10 * i) for i in range(3)]
    for s in seqs:
        sch.add(s)
    step(sch)
    assert len(sch.running) == 3
    preempted_first = None
    for _ in range(200):
        if not sch.has_unfinished():
            break
        before = {s.request_id for s in sch.running}
        step(sch)
        after = {s.request_id for s in sch.running}
        if preempted_first is None and sch.num_preemptions:
            preempted_first = (before - after) or {"?"}
    assert sch.num_preemptions >= 1
    assert preempted_first == {"s2"}  # the newest goes first
    assert all(s.finish_reason == "length" and s.num_completion_tokens == 8 for s in seqs)
    assert sch.bm.num_free_blocks == 6


def test_preempted_sequence_recomputes_all_its_tokens():
    sch = make(num_blocks=3, block_size=2, budget=64)
    a, b = seq("a", 2, max_tokens=3), seq("b", 2, max_tokens=3, base=50)
    sch.add(a)
    sch.add(b)
    step(sch)  # both prefilled, each has 3 tokens now (needs 2 blocks each, 4 > 3)
    batch = step(sch)
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and b.num_computed_tokens == 0
    assert [s.request_id for s in batch.seqs] == ["a"]
    run_all(sch)
    assert a.num_completion_tokens == 3 and b.num_completion_tokens == 3
    assert sch.bm.num_free_blocks == 3


def test_finish_frees_blocks_immediately_for_running_and_waiting():
    sch = make(max_num_seqs=1)
    a, b = seq("a", 6), seq("b", 6)
    sch.add(a)
    sch.add(b)
    step(sch)
    free = sch.bm.num_free_blocks
    sch.finish(a, "abort")
    assert sch.bm.num_free_blocks == free + 2 and a.finish_reason == "abort"
    sch.finish(b, "abort")
    assert not sch.has_unfinished() and sch.bm.num_free_blocks == 64


def test_abort_during_step_is_ignored_by_postprocess():
    sch = make()
    a = seq("a", 3)
    sch.add(a)
    batch = sch.schedule()
    sch.finish(a, "abort")
    sch.postprocess(batch, [[7]])
    assert a.completion_token_ids == [] and sch.bm.num_free_blocks == 64


def test_prefix_cache_skips_shared_prompt_tokens():
    sch = make(block_size=4)
    a = seq("a", 13, max_tokens=2)
    sch.add(a)
    run_all(sch)
    b = seq("b", 13, max_tokens=2)
    sch.add(b)
    batch = step(sch)
    assert b.num_cached_tokens == 12 and batch.num_tokens == [1]
