"""nn.Linear / nn.Embedding without the random init (weights always come from load_weights or
init_random_weights, so building a model costs only the allocation), and HalfGemvLinear, a CPU decode
speed-up swapped in by `use_half_gemv`. All are nn.Linear / nn.Embedding subclasses, so module swaps
(quantization) by name or isinstance keep working."""

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
    """A float32 Linear that also keeps a float16 copy of its weight for inputs of at most `max_rows` rows.

    Batch-1 decode on CPU is memory-bound: the fp16 GEMV reads half the bytes (measured on AVX-512: ~2x faster
    than fp32), while the fp16 GEMM for larger inputs is far slower than fp32, so prefill keeps the fp32 weight.
    Activations stay float32; only the product is computed from fp16-rounded inputs and weights."""

    max_rows = 2

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
        if x.shape[0] <= self.max_rows and x.dim() == 2:
            return F.linear(x.to(torch.float16), self.weight_half, self.bias_half).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def use_half_gemv(model: nn.Module) -> nn.Module:
    """Swap every float32 CPU nn.Linear of a LOADED model for a HalfGemvLinear (in place; returns model).
    Costs one fp16 copy of the projection weights (+50% weight memory)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) in (nn.Linear, Linear) and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, HalfGemvLinear.from_linear(child))
    return model
