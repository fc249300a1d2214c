"""Fused residual-add + RMSNorm (and plain RMSNorm): one pass over each row, fp32 statistics. With a pre-norm
weight (GLM-4's sandwich norms) the branch output is normed first, then added, then normed again: the two
kernels of `rms_norm(a)` + `add_rms_norm(., residual)` in one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, pre_w_ptr, out_ptr, res_out_ptr, H, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RES: tl.constexpr, HAS_PRE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:  # x = rms_norm(x) * pre_w, rounded to the activation dtype as the unfused kernel stores it
        pw = tl.load(pre_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x / tl.sqrt(tl.sum(x * x, axis=0) / H + eps) * pw).to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * stride_ro + cols, x.to(res_out_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            pre_weight: torch.Tensor | None = None):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm wants a row-major [T, H] tensor, got {tuple(x.shape)}")
    T, H = x.shape
    out = torch.empty_like(x)  # [T, H]
    res_out = torch.empty_like(x) if residual is not None else out  # [T, H]
    if T == 0:
        return out, res_out
    block = triton.next_power_of_2(H)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 1
    res = residual if residual is not None else x
    _rms_norm_kernel[(T,)](x, res, weight, pre_weight if pre_weight is not None else weight, out, res_out, H, eps,
                           x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
                           HAS_RES=residual is not None, HAS_PRE=pre_weight is not None, BLOCK=block,
                           num_warps=num_warps)
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(x + residual) * weight, x + residual); with residual None, (rms_norm(x), x)."""
    if residual is None:
        return rms_norm(x, weight, eps), x
    return _launch(x, residual, weight, eps)


def norm_add_rms_norm(x: torch.Tensor, pre_weight: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float):
    """Returns (rms_norm(rms_norm(x) * pre_weight + residual) * weight, rms_norm(x) * pre_weight + residual)."""
    return _launch(x, residual, weight, eps, pre_weight)


def reference_norm_add_rms_norm(x, pre_weight, residual, weight, eps):
    return reference_add_rms_norm(reference_rms_norm(x, pre_weight, eps), residual, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def reference_add_rms_norm(x, residual, weight, eps):
    if residual is None:
        return reference_rms_norm(x, weight, eps), x
    s = (x.float() + residual.float()).to(x.dtype)
    return reference_rms_norm(s, weight, eps), s
