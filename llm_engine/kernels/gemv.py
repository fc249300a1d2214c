"""Small-batch (M <= 16 rows) bf16/fp16 linear y = x W^T (+ b) as a Triton GEMV, optionally with the SwiGLU gate
fused into its input (down_proj reads gate_up's output [M, 2I] and forms silu(gate) * up on the fly, so the
separate SiLU·mul kernel and its [M, I] round trip disappear).

Why: at decode sizes a linear is a pure weight stream, and cuBLAS reaches only ~60 % of HBM bandwidth on the
4096-row projections of a 9B model (too few blocks for 132 SMs). Here each program owns BLOCK_N weight rows
(a few: hundreds of programs per projection) for all M rows and streams them once in BLOCK_K-wide, 16-byte
vectorized tiles; M = 1 accumulates with FMAs, 2..16 rows with one padded tl.dot per tile.

Whether this kernel or cuBLAS (plus the separate SiLU·mul kernel) runs is decided per (N, K, row bucket, fused
gate) by timing every candidate once on the device, with the weights rotated over copies larger than L2 (`pick`);
cuBLAS stays whenever it wins. The row buckets are the decode graphs' batch buckets (1, 2, 4, 8, 16 rows), each
timed at its own row count, and the timing replays the candidate from a CUDA graph (`graph_ms`), as the decode
step runs it: timed eagerly, a tiny weight's kernel costs what its Python launch costs, and a one-launch Triton
kernel beat cuBLAS + the SiLU·mul kernel by launch overhead alone (SmolLM2's down_proj at 8 rows: picked at
24.8 µs in a graph against 5.8 µs). `reference_gemv` defines the maths."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16


# M (the row count) is not specialized: it only masks rows, never the contiguous (K / N) dimension that loads and
# stores vectorize over, so knowing M == 1 or M % 16 == 0 cannot speed the kernel up, while each such class of a
# prefill's token count would compile another variant on first use (a ~1 s stall).
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sx, sw, so,
                 HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k a[m, k] w[n, k] (+ b[n]); a = x, or with SILU_MUL a[m, k] = silu(x[m, k]) * x[m, K + k]."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nm = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * sw
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            a = tl.load(x_ptr + k0 + rk, mask=km, other=0.0).to(tl.float32)
            if SILU_MUL:
                u = tl.load(x_ptr + K + k0 + rk, mask=km, other=0.0).to(tl.float32)
                a = a / (1.0 + tl.exp(-a)) * u
            w = tl.load(w_rows + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc2 += w.to(tl.float32) * a[None, :]
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BN]
        rm = tl.arange(0, 1)
    else:
        rm = tl.arange(0, BLOCK_M)
        mm = rm < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            xm = mm[:, None] & km[None, :]
            a = tl.load(x_ptr + rm[:, None] * sx + (k0 + rk)[None, :], mask=xm, other=0.0)
            if SILU_MUL:
                u = tl.load(x_ptr + rm[:, None] * sx + K + (k0 + rk)[None, :], mask=xm, other=0.0).to(tl.float32)
                af = a.to(tl.float32)
                a = (af / (1.0 + tl.exp(-af)) * u).to(w_ptr.dtype.element_ty)
            w = tl.load(w_rows + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(a.to(w.dtype), tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * so + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & nm[None, :])


def m_class(M: int) -> int:
    """The kernel's row tile: 1 (FMA path) or 16 (one padded tl.dot)."""
    return 1 if M == 1 else 16


def m_bucket(M: int) -> int:
    """The row count a choice is made (and timed) for: M's decode-graph batch bucket, 1, 2, 4, 8 or 16."""
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv serves 1..{MAX_ROWS} rows, got {M}")
    return triton.next_power_of_2(M)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         config: tuple[int, int, int, int] = (8, 512, 4, 3)) -> torch.Tensor:
    """x [M, K] (or [M, 2K] = [gate | up] with silu_mul), w [N, K], bias [N] -> [M, N] in x's dtype.
    config: (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    M = x.shape[0]
    N, K = w.shape
    if M > MAX_ROWS:
        raise ValueError(f"gemv is the small-batch path (M <= {MAX_ROWS}), got M = {M}")
    if x.shape[1] != (2 * K if silu_mul else K) or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} does not match w {tuple(w.shape)} (silu_mul={silu_mul}) "
                         "or is not row-major")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    bn, bk, nw, ns = config
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    _gemv_kernel[(triton.cdiv(N, bn),)](x, w, bias if bias is not None else w, out, M, N, K, x.stride(0),
                                        w.stride(0), out.stride(0), HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
                                        BLOCK_M=m_class(M), BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    return out


def reference_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                   silu_mul: bool = False) -> torch.Tensor:
    """float32 formula, cast back to x's dtype."""
    a = x.float()
    if silu_mul:
        K = w.shape[1]
        a = F.silu(a[:, :K]) * a[:, K:]
    y = a @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------- choice between this kernel and cuBLAS

TORCH = "torch"  # the candidate "F.linear (after the separate SiLU·mul kernel when the gate is fused)"
CANDIDATES: dict[int, list] = {
    1: [TORCH, (4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 4, 3), (4, 1024, 4, 2), (2, 1024, 2, 3),
        (16, 512, 8, 3)],
    16: [TORCH, (16, 128, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3)],
}
_CHOSEN: dict[tuple, object] = {}


def chosen() -> dict[str, object]:
    return {f"N={k[0]} K={k[1]} M<={k[2]} silu={k[3]}": v for k, v in _CHOSEN.items()}


def set_choice(N: int, K: int, bucket: int, silu_mul: bool, choice) -> None:
    """Fix the choice for rows in `bucket` (m_bucket) of this shape."""
    _CHOSEN[(N, K, bucket, silu_mul)] = choice


def _torch_path(x, w, bias, silu_mul):
    if silu_mul:
        from llm_engine import ops

        x = ops.silu_and_mul(x)
    return F.linear(x, w, bias)


def graph_ms(fn: Callable[[], object], reps: int = 10, rounds: int = 7) -> float:
    """Device ms of one fn() call, replayed from a CUDA graph of `reps` calls (median over `rounds` replays): no host
    launch cost, as inside the decode graphs. Captured on a side stream in thread-local mode, so CUDA work of other
    threads (the ASR beside the engine) is neither disturbed nor an error."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles outside the capture
        side.synchronize()
        g = torch.cuda.CUDAGraph()
        g.capture_begin(capture_error_mode="thread_local")
        try:
            for _ in range(reps):
                fn()
        finally:
            g.capture_end()
        g.replay()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for a, b in ev:
            a.record(side)
            g.replay()
            b.record(side)
        side.synchronize()
    torch.cuda.current_stream().wait_stream(side)
    del g
    return statistics.median(a.elapsed_time(b) for a, b in ev) / reps


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pick(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
         timer: Callable[[Callable[[], object]], float] | None = None):
    """The fastest candidate for this shape and x's row bucket (m_bucket), timed once at the bucket's row count on
    random weights rotated past L2, by `timer` (default graph_ms: device time in a CUDA graph). Never while a CUDA
    graph is being captured: then cuBLAS, unless a choice was made before."""
    N, K = w.shape
    mb = m_bucket(x.shape[0])
    key = (N, K, mb, silu_mul)
    got = _CHOSEN.get(key)
    if got is not None:
        return got
    if _capturing():
        return TORCH
    timer = timer or graph_ms
    l2 = 60 * 2**20
    copies = max(1, min(8, -(-3 * l2 // (N * K * w.element_size()))))
    ws = [torch.randn_like(w) * 0.02 for _ in range(copies)]
    xs = torch.randn((mb, x.shape[1]), dtype=x.dtype, device=x.device)  # the bucket's rows, as the graph runs it
    best, best_ms = TORCH, float("inf")
    for cand in CANDIDATES[m_class(mb)]:
        if cand == TORCH:
            def fn(ws=ws):
                return [_torch_path(xs, wi, bias, silu_mul) for wi in ws]
        else:
            def fn(c=cand, ws=ws):
                return [gemv(xs, wi, bias, silu_mul, c) for wi in ws]
        try:
            ms = timer(fn)
        except Exception:  # a candidate that does not compile or fit is skipped
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    _CHOSEN[key] = best
    return best


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False):
    """The decode-sized linear: the picked candidate for this shape (cuBLAS or this kernel)."""
    choice = pick(x, w, bias, silu_mul)
    if choice == TORCH:
        return _torch_path(x, w, bias, silu_mul)
    return gemv(x, w, bias, silu_mul, choice)
