"""One-shot all-reduce for small messages over peer-to-peer buffers (the technique of vLLM's and SGLang's custom
all-reduce; our own Triton kernel). NCCL's ring/tree all-reduce of a batch-1 hidden vector (8 KiB) is latency:
tens of µs eager, ~15 µs inside a CUDA graph. Here every rank copies its input into its own buffer, which every
peer can read (CUDA IPC, llm_engine/parallel/cuda_ipc.py), raises one flag in each peer's memory, waits for the
peers' flags, and sums all ranks' buffers itself — one barrier, one read of each peer's data.

Each rank's region (addresses of all W regions in `ptrs`, int64 [W], valid in this process):
    [0, FLAGS)            flags  int64 [NPROG, W]: flags[p, src] = the last generation rank src published for
                          program p (written by src with a release store, polled here with acquire loads)
    [FLAGS, +8*NPROG)     counts int64 [NPROG]: this rank's generation of each program (local only)
    TIMEOUTS_OFF          int64: calls of this rank that gave up waiting for a peer (see below; 0 when healthy)
    PROBE_OFF             int64: a word the set-up's self-test writes and every peer reads back (one_shot_setup)
    [DATA_OFF, +2*BUF)    data   two buffers of BUF bytes, used alternately (by generation parity)

Why one barrier is enough: a rank writes buffer g % 2 for call g only after call g-1's barrier, i.e. after every
peer arrived at call g-1 and so finished reading buffer (g-2) % 2 = g % 2 in call g-2 (stream order: a peer's
call g-2 kernel ends before its call g-1 kernel starts). Every call launches the same NPROG programs, so every
program's generation advances in lockstep on every rank. Generations are int64: they never wrap.

A rank waits for a peer's flag at most `max_spin` polls (a runtime argument: the set-up's self-test uses a short
bound, steady state a bound of minutes that only breaks a hang: a peer that died or a mapping that never shows
the peer's writes). Giving up counts in TIMEOUTS_OFF (`OneShotAllReduce.timeouts()`); that call's sum is wrong
and the generations may be out of step from then on, so a nonzero count means the one-shot path is broken.

The grid, generations and addresses are fixed, so the kernel is captured in CUDA graphs like any other. Every
rank sums the ranks' values in rank order (fp32 accumulate), so all ranks get bit-identical results.
On CPU the kernel runs in Triton's interpreter (tests: two processes over shared memory)."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton: only NCCL/gloo collectives
    triton = None

NPROG = 16  # programs per call (fixed: see above)
FLAGS_BYTES = 8 * NPROG * 8  # int64 [NPROG, W<=8]
COUNTS_OFF = FLAGS_BYTES  # int64 [NPROG]
TIMEOUTS_OFF = COUNTS_OFF + 8 * NPROG  # int64
PROBE_OFF = 2048  # int64
DATA_OFF = 4096  # flags + counters fit below this
SPIN_STEADY = 1 << 28  # polls of a peer's flag before giving up in steady state (minutes: a hang breaker only)


def region_bytes(buf_bytes: int) -> int:
    return DATA_OFF + 2 * buf_bytes


if triton is not None:
    @triton.jit
    def _one_shot_all_reduce(inp, out, ptrs, n, chunk, max_spin, RANK: tl.constexpr, W: tl.constexpr,
                             BUF: tl.constexpr, FLAGS: tl.constexpr, TMO: tl.constexpr, DOFF: tl.constexpr,
                             BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        ety = inp.dtype.element_ty
        own = tl.load(ptrs + RANK)  # int64 address of this rank's region
        cnt = (own + FLAGS).to(tl.pointer_type(tl.int64)) + pid
        gen = tl.load(cnt) + 1
        par = gen % 2
        start = pid * chunk
        stop = tl.minimum(start + chunk, n)
        mine = (own + DOFF + par * BUF).to(tl.pointer_type(ety))
        # 1. publish this rank's slice of the input in its own buffer
        for off in range(start, stop, BLOCK):
            o = off + tl.arange(0, BLOCK)
            m = o < stop
            tl.store(mine + o, tl.load(inp + o, mask=m), mask=m)
        tl.debug_barrier()  # every thread's stores happen before the release below
        # 2. tell each peer this program's data of generation `gen` is there
        for p in tl.static_range(W):
            if p != RANK:
                peer = tl.load(ptrs + p)
                flag = (peer).to(tl.pointer_type(tl.int64)) + pid * W + RANK
                tl.atomic_xchg(flag, gen, sem="release", scope="sys")
        # 3. wait until every peer has published generation `gen` (a peer is never more than one ahead), or give up
        for p in tl.static_range(W):
            if p != RANK:
                flag = own.to(tl.pointer_type(tl.int64)) + pid * W + p
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
                spins = 0
                while (seen < gen) & (spins < max_spin):
                    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
                    spins += 1
                if seen < gen:
                    tl.atomic_add((own + TMO).to(tl.pointer_type(tl.int64)), 1, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        # 4. sum every rank's slice in rank order
        for off in range(start, stop, BLOCK):
            o = off + tl.arange(0, BLOCK)
            m = o < stop
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for p in tl.static_range(W):
                if p == RANK:
                    x = tl.load(inp + o, mask=m, other=0.0)
                else:
                    src = (tl.load(ptrs + p) + DOFF + par * BUF).to(tl.pointer_type(ety))
                    x = tl.load(src + o, mask=m, other=0.0, cache_modifier=".cv")  # never a stale cached line
                acc += x.to(tl.float32)
            tl.store(out + o, acc.to(ety), mask=m)
        tl.store(cnt, gen)

    @triton.jit
    def _write_own_word(ptrs, value, RANK: tl.constexpr, OFF: tl.constexpr):
        """int64 `value` at byte OFF of this rank's region (release, system scope: peers may read it next)."""
        word = (tl.load(ptrs + RANK) + OFF).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(word, value, sem="release", scope="sys")

    @triton.jit
    def _read_words(ptrs, out, W: tl.constexpr, OFF: tl.constexpr):
        """out[p] = the int64 at byte OFF of rank p's region, for every rank (peers' through their mappings)."""
        for p in tl.static_range(W):
            word = (tl.load(ptrs + p) + OFF).to(tl.pointer_type(tl.int64))
            tl.store(out + p, tl.load(word, volatile=True))


class OneShotAllReduce:
    """all-reduce(sum) of contiguous tensors of at most `buf_bytes` over the ranks whose regions `ptrs` holds.
    Every rank must make the same sequence of calls (sizes may differ between calls, not between ranks)."""

    def __init__(self, ptrs: torch.Tensor, rank: int, world: int, buf_bytes: int, max_spin: int = SPIN_STEADY):
        if triton is None:
            raise RuntimeError("the one-shot all-reduce needs triton")
        if not 2 <= world <= 8:
            raise ValueError(f"one-shot all-reduce supports 2..8 ranks, got {world}")
        if buf_bytes % 256:
            raise ValueError(f"buf_bytes must be a multiple of 256, got {buf_bytes}")
        self.ptrs, self.rank, self.world, self.buf_bytes = ptrs, rank, world, buf_bytes  # ptrs: int64 [W]
        self.max_spin = max_spin  # read at launch (and captured with it into a CUDA graph)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and 0 < x.numel() * x.element_size() <= self.buf_bytes and x.device == self.ptrs.device)

    def _launch(self, x: torch.Tensor, out: torch.Tensor, warmup: bool = False):
        n = x.numel()
        chunk = -(-n // NPROG)
        chunk = -(-chunk // 8) * 8  # 16-byte aligned slices
        block = 256 if chunk <= 256 else 1024
        args = (x, out, self.ptrs, n, chunk, self.max_spin)
        kw = dict(RANK=self.rank, W=self.world, BUF=self.buf_bytes, FLAGS=FLAGS_BYTES, TMO=TIMEOUTS_OFF,
                  DOFF=DATA_OFF, BLOCK=block, num_warps=4)
        if warmup:
            return _one_shot_all_reduce.warmup(*args, grid=(NPROG,), **kw)
        return _one_shot_all_reduce[(NPROG,)](*args, **kw)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        self._launch(x, out)
        return out

    def compile_for(self, x: torch.Tensor) -> bool:
        """Compile the kernel for x's call without running it (so that no rank's first call waits out another's
        compile). False where Triton cannot (its interpreter): the first call compiles."""
        if os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(_one_shot_all_reduce, "warmup"):
            return False
        self._launch(x, torch.empty_like(x), warmup=True)
        return True

    # -- the region's control words (self-test, health) -------------------------------------------------
    def write_probe(self, value: int) -> None:
        _write_own_word[(1,)](self.ptrs, value, RANK=self.rank, OFF=PROBE_OFF)

    def read_words(self, off: int) -> list[int]:
        """The int64 at byte `off` of every rank's region, read from this rank (peers' through the mappings)."""
        out = torch.zeros(self.world, dtype=torch.int64, device=self.ptrs.device)  # [W]
        _read_words[(1,)](self.ptrs, out, W=self.world, OFF=off)
        return out.tolist()

    def timeouts(self) -> int:
        """Calls of this rank that gave up waiting for a peer (0 while the one-shot path is healthy)."""
        return self.read_words(TIMEOUTS_OFF)[self.rank]
