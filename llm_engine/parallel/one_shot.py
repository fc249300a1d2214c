"""One-shot all-reduce for small messages over peer-to-peer buffers (the technique of vLLM's and SGLang's custom
all-reduce; our own Triton kernel). NCCL's ring/tree all-reduce of a batch-1 hidden vector (8 KiB) is latency:
tens of µs eager, ~15 µs inside a CUDA graph. Here every rank copies its input into its own buffer, which every
peer can read (CUDA IPC, llm_engine/parallel/cuda_ipc.py), raises one flag in each peer's memory, waits for the
peers' flags, and sums all ranks' buffers itself — one barrier, one read of each peer's data.

Each rank's region (addresses of all W regions in `ptrs`, int64 [W], valid in this process):
    [0, FLAGS)            flags  int64 [NPROG, W]: flags[p, src] = the last generation rank src published for
                          program p (written by src with a release store, polled here with acquire loads)
    [FLAGS, DATA_OFF)     counts int64 [NPROG]: this rank's generation of each program (local only)
    [DATA_OFF, +2*BUF)    data   two buffers of BUF bytes, used alternately (by generation parity)

Why one barrier is enough: a rank writes buffer g % 2 for call g only after call g-1's barrier, i.e. after every
peer arrived at call g-1 and so finished reading buffer (g-2) % 2 = g % 2 in call g-2 (stream order: a peer's
call g-2 kernel ends before its call g-1 kernel starts). Every call launches the same NPROG programs, so every
program's generation advances in lockstep on every rank. Generations are int64: they never wrap.

The grid, generations and addresses are fixed, so the kernel is captured in CUDA graphs like any other. Every
rank sums the ranks' values in rank order (fp32 accumulate), so all ranks get bit-identical results.
On CPU the kernel runs in Triton's interpreter (tests: two processes over shared memory)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton: only NCCL/gloo collectives
    triton = None

NPROG = 16  # programs per call (fixed: see above)
FLAGS_BYTES = 8 * NPROG * 8  # int64 [NPROG, W<=8]
DATA_OFF = 4096  # flags + counters fit below this


def region_bytes(buf_bytes: int) -> int:
    return DATA_OFF + 2 * buf_bytes


if triton is not None:
    @triton.jit
    def _one_shot_all_reduce(inp, out, ptrs, n, chunk, RANK: tl.constexpr, W: tl.constexpr, BUF: tl.constexpr,
                             FLAGS: tl.constexpr, DOFF: tl.constexpr, BLOCK: tl.constexpr):
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
        # 3. wait until every peer has published generation `gen` (a peer is never more than one ahead)
        for p in tl.static_range(W):
            if p != RANK:
                flag = own.to(tl.pointer_type(tl.int64)) + pid * W + p
                while tl.atomic_add(flag, 0, sem="acquire", scope="sys") < gen:
                    pass
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


class OneShotAllReduce:
    """all-reduce(sum) of contiguous tensors of at most `buf_bytes` over the ranks whose regions `ptrs` holds.
    Every rank must make the same sequence of calls (sizes may differ between calls, not between ranks)."""

    def __init__(self, ptrs: torch.Tensor, rank: int, world: int, buf_bytes: int):
        if triton is None:
            raise RuntimeError("the one-shot all-reduce needs triton")
        if not 2 <= world <= 8:
            raise ValueError(f"one-shot all-reduce supports 2..8 ranks, got {world}")
        if buf_bytes % 256:
            raise ValueError(f"buf_bytes must be a multiple of 256, got {buf_bytes}")
        self.ptrs, self.rank, self.world, self.buf_bytes = ptrs, rank, world, buf_bytes  # ptrs: int64 [W]

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and 0 < x.numel() * x.element_size() <= self.buf_bytes and x.device == self.ptrs.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        out = torch.empty_like(x)
        chunk = -(-n // NPROG)
        chunk = -(-chunk // 8) * 8  # 16-byte aligned slices
        block = 256 if chunk <= 256 else 1024
        _one_shot_all_reduce[(NPROG,)](x, out, self.ptrs, n, chunk, RANK=self.rank, W=self.world,
                                       BUF=self.buf_bytes, FLAGS=FLAGS_BYTES, DOFF=DATA_OFF, BLOCK=block,
                                       num_warps=4)
        return out
