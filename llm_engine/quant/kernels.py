"""Triton small-batch (M <= 64) weight-only matmuls that dequantize in registers.

Each program owns BLOCK_N output channels for all M rows and streams its weight rows once; the rows of x
are tiny and stay in L1/L2. M == 1 takes an elementwise multiply-accumulate (no padding to a 16-row dot);
2..64 rows use tl.dot (one M tile of 16/32/64) on the dequantized tile.
Memory-bound: bytes ~= N*K (int8) or N*K/2 + scales (int4).
The tile shape is picked once per (kernel, N, K, M-class) by timing a few candidates on first use (outside
CUDA-graph capture); `set_config` pins one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _i8_to_f32(w):
    """int8 -> float32 without I2F (a quarter-rate unit): 2^23 + (w + 128) as float bits, minus 2^23 + 128."""
    u = (w.to(tl.int32) + 128) | 0x4B000000
    return u.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _u4_to_f32(q):
    """4-bit code (0..15, any integer type) -> float32 without I2F: 2^23 + q as float bits, minus 2^23."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit(do_not_specialize=["M"])  # M only masks rows (see kernels/gemv.py): no variant per M class
def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, sx, sw, so,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nm = rn < N
    rn64 = rn.to(tl.int64)
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            x = tl.load(x_ptr + k0 + rk, mask=km, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn64[:, None] * sw + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :], other=0)
            acc2 += _i8_to_f32(w) * x[None, :]
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BN]
        rm = tl.arange(0, 1)
    else:
        rm = tl.arange(0, BLOCK_M)
        mm = rm < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            x = tl.load(x_ptr + rm[:, None] * sx + (k0 + rk)[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + rn64[:, None] * sw + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :], other=0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc *= tl.load(s_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * so + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["M"])  # M only masks rows (see kernels/gemv.py): no variant per M class
def _int4_mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, sx, sw, ss, so,
                    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUPS_PER_STEP: tl.constexpr):
    """Half-split layout (llm_engine.quant.int4): byte j of group g holds codes k = g*GROUP + j (low nibble)
    and g*GROUP + GROUP/2 + j (high), so both nibbles meet contiguous slices of x and a per-row scale — no
    shuffles. Codes become floats by the 2^23 magic-number trick (integer ops, no I2F)."""
    pid_n = tl.program_id(0)
    GH: tl.constexpr = GROUP // 2
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, GH)
    nm = rn < N
    rn64 = rn.to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    mm = rm < M
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, GH], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_groups = K // GROUP
    for g0 in range(0, n_groups, GROUPS_PER_STEP):
        for gi in tl.static_range(GROUPS_PER_STEP):
            g = g0 + gi
            gj = (g + rj * 0) < n_groups  # [GH] (tensor masks: the interpreter rejects scalar ones)
            gn = nm & ((g + rn * 0) < n_groups)  # [BN]
            p = tl.load(w_ptr + rn64[:, None] * sw + g * GH + rj[None, :], mask=gn[:, None] & gj[None, :], other=0)
            sc = tl.load(s_ptr + rn64 * ss + g, mask=gn, other=0.0).to(tl.float32)  # [BN]
            zp = tl.load(z_ptr + rn64 * ss + g, mask=gn, other=0.0).to(tl.float32)
            lo = _u4_to_f32(p & 15)  # [BN, GH] codes of the group's first half
            hi = _u4_to_f32(p >> 4)  # second half
            if BLOCK_M == 1:
                xl = tl.load(x_ptr + g * GROUP + rj, mask=gj, other=0.0).to(tl.float32)  # [GH]
                xh = tl.load(x_ptr + g * GROUP + GH + rj, mask=gj, other=0.0).to(tl.float32)
                # w = q*s + z  =>  x.w = s * (x.q) + z * sum(x), accumulated per lane, reduced once at the end
                acc2 += (lo * xl[None, :] + hi * xh[None, :]) * sc[:, None] + zp[:, None] * (xl + xh)[None, :]
            else:
                xm = mm[:, None] & gj[None, :]
                xl = tl.load(x_ptr + rm[:, None] * sx + g * GROUP + rj[None, :], mask=xm, other=0.0)  # [BM, GH]
                xh = tl.load(x_ptr + rm[:, None] * sx + g * GROUP + GH + rj[None, :], mask=xm, other=0.0)
                wl = (lo * sc[:, None] + zp[:, None]).to(x_ptr.dtype.element_ty)  # [BN, GH] dequantized
                wh = (hi * sc[:, None] + zp[:, None]).to(x_ptr.dtype.element_ty)
                acc += tl.dot(xl, tl.trans(wl))
                acc += tl.dot(xh, tl.trans(wh))
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BN]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * so + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


# int8: (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates; the first is the default (CPU / during capture)
_CANDIDATES = {
    ("int8", 1): [(8, 512, 4, 4), (4, 1024, 4, 4), (16, 256, 4, 4), (8, 1024, 8, 3), (2, 2048, 4, 3)],
    ("int8", 16): [(32, 256, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (64, 128, 4, 4)],
    # int4: (BLOCK_N, GROUPS_PER_STEP, num_warps, num_stages)
    ("int4", 1): [(16, 2, 4, 4), (32, 1, 4, 4), (8, 4, 4, 4), (32, 2, 4, 3), (64, 1, 4, 3), (16, 4, 8, 3)],
    ("int4", 16): [(32, 1, 4, 4), (16, 2, 4, 3), (64, 1, 4, 3), (32, 2, 4, 3)],
}
for _m in (32, 64):
    _CANDIDATES[("int8", _m)] = [(32, 128, 4, 3), (64, 128, 4, 3), (16, 256, 4, 3), (32, 64, 4, 4)]
    _CANDIDATES[("int4", _m)] = [(32, 1, 4, 3), (64, 1, 4, 3), (16, 2, 4, 3), (32, 2, 4, 4)]
MAX_M = 64


def _m_class(M: int) -> int:
    return 1 if M == 1 else max(16, triton.next_power_of_2(M))
_CHOSEN: dict[tuple, tuple[int, int, int, int]] = {}


def set_config(kind: str, N: int, K: int, m_class: int, cfg: tuple[int, int, int, int]) -> None:
    _CHOSEN[(kind, N, K, m_class)] = cfg


def chosen_configs() -> dict[str, tuple[int, int, int, int]]:
    return {f"{k[0]} N={k[1]} K={k[2]} Mtile={k[3]}": v for k, v in _CHOSEN.items()}


def _pick(kind: str, N: int, K: int, m_class: int, launch) -> tuple[int, int, int, int]:
    key = (kind, N, K, m_class)
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    cands = _CANDIDATES[(kind, m_class)]
    if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return cands[0]
    best, best_ms = cands[0], float("inf")
    for c in cands:
        try:
            ms = triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=25, return_mode="median")
        except Exception:  # a candidate that does not compile/fit is skipped
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    _CHOSEN[key] = best
    return best


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M <= 64), q int8 [N, K], scale [N] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = q.shape[0]
    if M > MAX_M:
        raise ValueError(f"int8_matmul is the small-batch path (M <= {MAX_M})")
    x = x.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    m_class = _m_class(M)

    def launch(c):
        bn, bk, nw, ns = c
        _int8_mm_kernel[(triton.cdiv(N, bn),)](x, q, scale, bias if bias is not None else scale, out, M, N, K,
                                              x.stride(0), q.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                              BLOCK_M=m_class, BLOCK_N=bn,
                                              BLOCK_K=min(bk, max(16, triton.next_power_of_2(K))),
                                              num_warps=nw, num_stages=ns)

    launch(config or _pick("int8", N, K, m_class, launch))
    return out


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor, group: int,
                bias: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M <= 64), packed uint8 [N, K/2] (half-split layout), scale/wmin [N, K/group] -> [M, N].
    config: (BLOCK_N, GROUPS_PER_STEP, num_warps, num_stages)."""
    M, K = x.shape
    N = packed.shape[0]
    if M > MAX_M:
        raise ValueError(f"int4_matmul is the small-batch path (M <= {MAX_M})")
    x = x.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    m_class = _m_class(M)

    def launch(c):
        bn, gps, nw, ns = c
        _int4_mm_kernel[(triton.cdiv(N, bn),)](x, packed, scale, wmin, bias if bias is not None else scale, out,
                                              M, N, K, x.stride(0), packed.stride(0), scale.stride(0),
                                              out.stride(0), HAS_BIAS=bias is not None, GROUP=group,
                                              BLOCK_M=m_class, BLOCK_N=bn, GROUPS_PER_STEP=gps,
                                              num_warps=nw, num_stages=ns)

    launch(config or _pick("int4", N, K, m_class, launch))
    return out
