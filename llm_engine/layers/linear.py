"""nn.Linear / nn.Embedding without the random init (weights always come from load_weights or
init_random_weights, so building a model costs only the allocation), and HalfGemvLinear, the CPU decode
speed-up (fp16 GEMV for 1-2 rows, transposed fp32 mm for a few rows) swapped in by `use_half_gemv`. All are
nn.Linear / nn.Embedding subclasses, so module swaps (quantization) by name or isinstance keep working."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def reset_parameters(self) -> None:  # filled by the loader
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:  # filled by the loader
        pass


class HalfGemvLinear(Linear):
    """A float32 CPU Linear with faster paths for the few-row inputs of batched decode (prefill keeps F.linear).

    - at most `max_rows` rows (batch-1/2 decode): a float16 copy of the weight. Decode is memory-bound and the fp16
      GEMV reads half the bytes (~4x faster than the fp32 GEMV for these weights on AVX-512). Activations stay
      float32; only the product is computed from fp16-rounded inputs and weights.
    - up to `mm_max_rows` rows: the fp32 product as torch.mm(W, x.T), i.e. MKL's sgemm on the transposed problem,
      which for these shapes is ~3x faster than F.linear(x, W) at 2-4 rows and ~1.4x at 8-9 (fp16 GEMMs grow
      linearly per row on CPUs without native fp16 math, so they lose from 3 rows on). Same float32 math as
      F.linear up to summation order (~1e-6 differences).
    Thresholds from a sweep of SmolLM2-135M's projections at 2 threads (AVX-512, MKL): for the layer projections
    mm(W, x.T) wins through 9 rows and loses at 10-15 (the lm_head alone would keep winning through 16, but one
    threshold keeps every input of 10+ rows, i.e. prefill, on F.linear bit for bit)."""

    max_rows = 2  # fp16 GEMV at <= this many rows
    mm_max_rows = 9  # fp32 mm(W, x.T) at <= this many rows, F.linear beyond

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> HalfGemvLinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = lin.in_features, lin.out_features
        m.weight, m.bias = lin.weight, lin.bias  # shared, not copied (a tied lm_head stays tied)
        m.register_buffer("weight_half", lin.weight.detach().to(torch.float16), persistent=False)  # [out, in]
        bias_half = None if lin.bias is None else lin.bias.detach().to(torch.float16)
        m.register_buffer("bias_half", bias_half, persistent=False)  # [out] or None
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() != 2 or rows > self.mm_max_rows:
            return F.linear(x, self.weight, self.bias)
        if rows <= self.max_rows:
            return F.linear(x.to(torch.float16), self.weight_half, self.bias_half).to(x.dtype)
        if self.bias is None:
            y = torch.mm(self.weight, x.T)  # [out, rows]
        else:
            y = torch.addmm(self.bias[:, None], self.weight, x.T)  # [out, rows]
        return y.T.contiguous()  # [rows, out]


def use_half_gemv(model: nn.Module) -> nn.Module:
    """Swap every float32 CPU nn.Linear of a LOADED model for a HalfGemvLinear (in place; returns model).
    Costs one fp16 copy of the projection weights (+50% weight memory)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) in (nn.Linear, Linear) and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, HalfGemvLinear.from_linear(child))
    return model
