"""nn.Linear / nn.Embedding without the random init (weights always come from load_weights or
init_random_weights, so building a model costs only the allocation), and HalfGemvLinear, the CPU decode
speed-up (fp16 GEMV for 1-2 rows, oneDNN-packed fp32 GEMM for a few rows) swapped in by `use_half_gemv`. All are
nn.Linear / nn.Embedding subclasses, so module swaps (quantization) by name or isinstance keep working."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_engine import ops


class Linear(nn.Linear):
    def reset_parameters(self) -> None:  # filled by the loader
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)  # decode-sized CUDA inputs may take the Triton GEMV


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:  # filled by the loader
        pass


def _pack_onednn(w: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] float32 -> oneDNN's blocked copy for `_linear_pointwise`, or None where this torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8)  # 8: the batch size the layout is tuned for
        torch.ops.mkldnn._linear_pointwise(torch.zeros(3, w.shape[1]), packed, None, "none", [], "")  # smoke test
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return packed


class HalfGemvLinear(Linear):
    """A float32 CPU Linear with faster paths than F.linear for every 2-D input.

    - at most `max_rows` rows (batch-1/2 decode): a float16 copy of the weight. Decode is memory-bound and the fp16
      GEMV reads half the bytes (~4x faster than the fp32 GEMV for these weights on AVX-512). Activations stay
      float32; only the product is computed from fp16-rounded inputs and weights.
    - more rows (batched decode, prefill): float32 through oneDNN with the weight pre-packed in its blocked layout
      (another fp32 copy). For SmolLM2-135M's 120 layer projections at 2 threads (AVX-512) it runs 3-12 rows at
      about the memory floor, 11-14 ms, vs 35-47 ms with F.linear, and a 64-token prefill in ~65 ms vs ~115 ms
      (fp16 GEMMs grow linearly per row on CPUs without native fp16 math, so they lose from 3 rows on).
      Same float32 math as F.linear up to summation order (~1e-6 relative differences).
    - without oneDNN: torch.mm(W, x.T) (MKL's sgemm on the transposed problem) up to `mm_max_rows` rows, where it
      beats F.linear, and F.linear beyond."""

    max_rows = 2  # fp16 GEMV at <= this many rows
    mm_max_rows = 9  # without oneDNN: mm(W, x.T) at <= this many rows, F.linear beyond

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> HalfGemvLinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = lin.in_features, lin.out_features
        m.weight, m.bias = lin.weight, lin.bias  # shared, not copied (a tied lm_head stays tied)
        m.register_buffer("weight_half", lin.weight.detach().to(torch.float16), persistent=False)  # [out, in]
        bias_half = None if lin.bias is None else lin.bias.detach().to(torch.float16)
        m.register_buffer("bias_half", bias_half, persistent=False)  # [out] or None
        m.weight_packed = _pack_onednn(lin.weight)  # [out, in] opaque oneDNN layout, or None; not a buffer (CPU only)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if rows <= self.max_rows:
            return F.linear(x.to(torch.float16), self.weight_half, self.bias_half).to(x.dtype)
        if self.weight_packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")  # [rows, out]
        if rows > self.mm_max_rows:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            y = torch.mm(self.weight, x.T)  # [out, rows]
        else:
            y = torch.addmm(self.bias[:, None], self.weight, x.T)  # [out, rows]
        return y.T.contiguous()  # [rows, out]


def use_half_gemv(model: nn.Module) -> nn.Module:
    """Swap every float32 CPU nn.Linear of a LOADED model for a HalfGemvLinear (in place; returns model).
    Costs an fp16 copy and a oneDNN-packed fp32 copy of the projection weights (+150% weight memory)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) in (nn.Linear, Linear) and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, HalfGemvLinear.from_linear(child))
    return model
