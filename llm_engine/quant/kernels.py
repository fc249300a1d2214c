"""Triton small-batch (M <= 16) weight-only matmuls that dequantize in registers.

Each program owns BLOCK_N output channels for all M rows and streams its weight rows once; the rows of x
are tiny and stay in L1/L2. Memory-bound: bytes ~= N*K (int8) or N*K/2 (+ scales) (int4)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, sx, sw, so,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    nm = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * sx + (k0 + rk)[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * sw + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :],
                    other=0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc *= tl.load(s_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * so + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


@triton.jit
def _int4_mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, sx, sw, ss, so,
                    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    HALF: tl.constexpr = GROUP // 2
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    mm = rm < M
    nm = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(0, K // GROUP):
        k0 = g * GROUP
        xm = mm[:, None]
        xe = tl.load(x_ptr + rm[:, None] * sx + k0 + 2 * rj[None, :], mask=xm, other=0.0)  # [BM, HALF] even k
        xo = tl.load(x_ptr + rm[:, None] * sx + k0 + 2 * rj[None, :] + 1, mask=xm, other=0.0)  # odd k
        p = tl.load(w_ptr + rn64[:, None] * sw + g * HALF + rj[None, :], mask=nm[:, None], other=0)  # [BN, HALF]
        lo = (p & 15).to(x_ptr.dtype.element_ty)
        hi = (p >> 4).to(x_ptr.dtype.element_ty)
        part = tl.dot(xe, tl.trans(lo)) + tl.dot(xo, tl.trans(hi))  # [BM, BN] = x . q over the group
        xsum = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)  # [BM]
        s = tl.load(s_ptr + rn64 * ss + g, mask=nm, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn64 * ss + g, mask=nm, other=0.0).to(tl.float32)
        acc += part * s[None, :] + xsum[:, None] * z[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * so + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def _block_n(n: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return 32 if triton.cdiv(n, 32) >= 2 * sms else 16


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                block_n: int | None = None, block_k: int = 256) -> torch.Tensor:
    """x [M, K] (M <= 16), q int8 [N, K], scale [N] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = q.shape[0]
    if M > 16:
        raise ValueError("int8_matmul is the small-batch path (M <= 16)")
    x = x.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    bn = block_n or _block_n(N, x.device)
    _int8_mm_kernel[(triton.cdiv(N, bn),)](x, q, scale, bias if bias is not None else scale, out, M, N, K,
                                          x.stride(0), q.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                          BLOCK_M=16, BLOCK_N=bn, BLOCK_K=min(block_k, triton.next_power_of_2(K)),
                                          num_warps=4, num_stages=4)
    return out


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor, group: int,
                bias: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16), packed uint8 [N, K/2], scale/wmin [N, K/group] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = packed.shape[0]
    if M > 16:
        raise ValueError("int4_matmul is the small-batch path (M <= 16)")
    x = x.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    bn = block_n or _block_n(N, x.device)
    _int4_mm_kernel[(triton.cdiv(N, bn),)](x, packed, scale, wmin, bias if bias is not None else scale, out,
                                          M, N, K, x.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
                                          HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=16, BLOCK_N=bn,
                                          num_warps=4, num_stages=4)
    return out
