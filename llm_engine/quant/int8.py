"""Int8 weight-only Linear: w[n, k] ~= q[n, k] * scale[n], q in [-127, 127]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_engine.quant.base import WeightOnlyLinear


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale fp32 [N])."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # [N]
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def reference_int8_linear(x, q, scale, bias=None):
    return F.linear(x, dequantize_int8(q, scale, x.dtype), bias)


class Int8Linear(WeightOnlyLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device, lin.weight.dtype)
        q, s = quantize_int8(lin.weight.data)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        m._copy_bias(lin)
        return m

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        from llm_engine.quant.kernels import int8_matmul

        return int8_matmul(x2, self.qweight, self.scale, self.bias)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        return reference_int8_linear(x2, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"
