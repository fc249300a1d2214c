"""Paged KV block bookkeeping with hash-based prefix caching (pure Python, no torch).

A full block's identity is hash(parent_hash, its tokens), so equal prefixes map to equal chains of blocks.
Blocks are registered only once their KV has been computed, so a hit never reads KV that is still pending.
Freed blocks that carry a hash stay in an LRU pool: a later hit revives them, a miss evicts the oldest."""

from __future__ import annotations

from collections import OrderedDict, deque

from llm_engine.sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent if parent is not None else -1, tokens))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full, computed and registered
        self.tokens: tuple[int, ...] = ()  # the block's tokens when hashed (guards against hash collisions)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self._free_plain: deque[int] = deque(range(num_blocks))  # free, no cached content: used first
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free but revivable, oldest first
        self.prefix_hit_tokens = 0  # cumulative prompt tokens served from the cache

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._free_cached)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block_id) of the leading full blocks already cached. At least one token is left to
        compute, since the step that finishes the prompt must produce logits."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, parent = self.block_size, [], None
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].tokens != tokens:
                break
            hits.append((h, bid))
            parent = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        revived = sum(1 for _, bid in hits if self.blocks[bid].ref_count == 0)
        return self.blocks_for(len(seq)) - len(hits) + revived <= self.num_free_blocks

    # ---- mutations -------------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._free_plain:
            bid = self._free_plain.popleft()
        elif self._free_cached:
            bid, _ = self._free_cached.popitem(last=False)  # evict the least recently used cached block
            blk = self.blocks[bid]
            if self.hash_to_block.get(blk.hash) == bid:
                del self.hash_to_block[blk.hash]
            blk.hash, blk.tokens = None, ()
        else:
            raise RuntimeError("no free KV blocks (call can_allocate / can_append first)")
        self.blocks[bid].ref_count = 1
        return bid

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id}: already has blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"{seq.request_id}: not enough free KV blocks")
        hits = self._prefix_hits(seq)
        for _h, bid in hits:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                self._free_cached.pop(bid)
            blk.ref_count += 1
            seq.block_table.append(bid)
        seq.num_hashed_blocks = len(hits)
        seq.last_block_hash = hits[-1][0] if hits else None
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        for _ in range(self.blocks_for(len(seq)) - len(hits)):
            seq.block_table.append(self._take_free())

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that the sequence's first num_tokens tokens have KV slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        return self.num_new_blocks(seq, len(seq) if num_tokens is None else num_tokens) <= self.num_free_blocks

    def append_slot(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow the block table to cover num_tokens (default: every token of the sequence)."""
        for _ in range(self.num_new_blocks(seq, len(seq) if num_tokens is None else num_tokens)):
            seq.block_table.append(self._take_free())

    def commit(self, seq: Sequence) -> None:
        """Register newly computed full blocks in the prefix cache (after a step wrote their KV)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(seq.last_block_hash, tokens)
            blk = self.blocks[seq.block_table[i]]
            if blk.hash is None and h not in self.hash_to_block:
                blk.hash, blk.tokens = h, tokens
                self.hash_to_block[h] = blk.block_id
            seq.last_block_hash = h
            seq.num_hashed_blocks += 1

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the tail blocks not needed for the first num_tokens tokens (slots taken for rejected
        speculative drafts). Tail blocks are past the computed region, so none carries a hash."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def _release(self, bid: int) -> None:
        blk = self.blocks[bid]
        blk.ref_count -= 1
        if blk.ref_count < 0:
            raise RuntimeError(f"block {bid} freed twice")
        if blk.ref_count == 0:
            if blk.hash is not None:
                self._free_cached[bid] = None
            else:
                self._free_plain.append(bid)

    def drop_cached(self, keep: set[int] | frozenset[int] = frozenset()) -> int:
        """Forget the cached content of every free block whose hash is not in `keep`: it becomes a plain free block
        (blocks in use keep theirs). LLMEngine.warm_up drops what its synthetic prompts registered. Returns how
        many blocks were dropped."""
        dropped = [bid for bid in self._free_cached if self.blocks[bid].hash not in keep]
        for bid in dropped:
            del self._free_cached[bid]
            blk = self.blocks[bid]
            if self.hash_to_block.get(blk.hash) == bid:
                del self.hash_to_block[blk.hash]
            blk.hash, blk.tokens = None, ()
            self._free_plain.append(bid)
        return len(dropped)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first, so a prefix outlives its suffix in the LRU)."""
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None
        seq.num_computed_tokens = 0
