"""Paged KV block bookkeeping: allocation, reference counts, prefix hashing, LRU reuse (pure Python)."""

import subprocess
import sys

import pytest

from llm_engine.block_manager import BlockManager
from llm_engine.sampling_params import SamplingParams
from llm_engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4))


def compute_all(bm, s):
    s.num_computed_tokens = len(s)
    bm.commit(s)


def test_modules_do_not_import_torch():
    code = ("import sys, llm_engine.block_manager, llm_engine.scheduler, llm_engine.sequence, "
            "llm_engine.config, llm_engine.sampling_params, llm_engine.grammar, llm_engine.tool_format, "
            "llm_engine.tool_parser; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_and_free_restore_free_count():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_cannot_allocate_beyond_pool():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(9))
    assert not bm.can_allocate(s)
    with pytest.raises(RuntimeError):
        bm.allocate(s)
    assert bm.num_free_blocks == 2


def test_append_slot_grows_at_block_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(4))
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.token_ids.append(99)  # the 5th token needs a second block
    assert bm.num_new_blocks(s, len(s)) == 1 and bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    s.token_ids.append(100)
    assert bm.num_new_blocks(s, len(s)) == 0


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)), "a")
    bm.allocate(a)
    assert a.num_cached_tokens == 0
    # Nothing is registered before the KV is computed: a concurrent twin must not hit pending blocks.
    b0 = seq(list(range(10)), "b0")
    assert bm._prefix_hits(b0) == []
    compute_all(bm, a)
    assert a.num_hashed_blocks == 2  # only the 2 full blocks
    b = seq(list(range(8)) + [50, 51, 52], "b")
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.prefix_hit_tokens == 8
    bm.free(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_prefix_miss_on_different_parent():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([9, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first: no hit at all
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_full_prompt_hit_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(8))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.num_uncomputed_tokens == 4


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 2
    # Revive: the same prefix hits blocks sitting in the free pool.
    b = seq([1, 2, 3, 4, 9])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.num_cached_free_blocks == 0
    compute_all(bm, b)
    bm.free(b)
    # A new 4-block sequence must evict the cached blocks (LRU), and they stop being hits.
    c = seq([7, 7, 7, 7, 7, 7, 7, 7])
    bm.allocate(c)
    assert bm.num_free_blocks == 0 and bm.hash_to_block == {}
    bm.free(c)
    d = seq([1, 2, 3, 4, 9])
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_lru_evicts_oldest_cached_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    old, new = seq([1, 2, 0], "old"), seq([3, 4, 0], "new")
    for s in (old, new):
        bm.allocate(s)
        compute_all(bm, s)
    bm.free(old)
    bm.free(new)
    filler = seq([9, 9, 0])  # plain (never cached) blocks are used before cached ones
    bm.allocate(filler)
    assert bm.num_cached_free_blocks == 2
    big = seq([8] * 7)  # 4 blocks: 1 plain left, then the 2 cached (oldest first) -> only 3; needs 4
    assert not bm.can_allocate(big)
    small = seq([8] * 3)  # 2 blocks: the last plain one, then evicts "old"'s cached block, not "new"'s
    bm.allocate(small)
    assert bm.num_cached_free_blocks == 1
    assert bm._prefix_hits(seq([1, 2, 0])) == []
    assert len(bm._prefix_hits(seq([3, 4, 0]))) == 1


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    bm.allocate(a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError):
        bm.free(a)


def test_drop_cached_forgets_only_free_blocks_outside_keep():
    bm = BlockManager(num_blocks=8, block_size=2)
    old = seq([1, 2, 3, 4, 5], "old")
    bm.allocate(old)
    compute_all(bm, old)
    bm.free(old)  # 2 cached free blocks
    keep = set(bm.hash_to_block)
    new, held = seq([7, 8, 9], "new"), seq([10, 11, 12], "held")
    for s in (new, held):
        bm.allocate(s)
        compute_all(bm, s)
    bm.free(new)  # its full block is cached and free; held's is in use
    assert bm.num_cached_free_blocks == 3
    assert bm.drop_cached(keep) == 1
    assert bm.num_cached_free_blocks == 2 and bm.num_free_blocks == 8 - len(held.block_table)
    assert set(bm.hash_to_block) == keep | {bm.blocks[held.block_table[0]].hash}
    again = seq([7, 8, 9], "again")  # the dropped content no longer hits; the kept one does
    bm.allocate(again)
    assert again.num_cached_tokens == 0
    bm.free(again)
    twin = seq([1, 2, 3, 4, 6], "twin")
    bm.allocate(twin)
    assert twin.num_cached_tokens == 4
    bm.free(twin)
    bm.free(held)
    assert bm.drop_cached() == 3 and bm.num_cached_free_blocks == 0 and bm.hash_to_block == {}
    assert bm.num_free_blocks == 8
