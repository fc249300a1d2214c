"""What the weight-only Linears share: [..., in] -> [..., out] reshaping, and the choice between the Triton
small-batch kernel (CUDA, decode-sized inputs) and the torch dequant reference (CPU, prefill)."""

from __future__ import annotations

import torch
from torch import nn

SMALL_BATCH_MAX = 64  # rows that take the Triton small-batch kernel; larger (prefill) dequantize + GEMM


class WeightOnlyLinear(nn.Module):
    """Subclasses hold the packed weight and implement `_kernel(x2)` and `_reference(x2)` on x2 [rows, in]."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def _init_bias(self, has_bias: bool, device, dtype) -> None:
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False) \
            if has_bias else None

    def _copy_bias(self, lin: nn.Linear) -> None:
        if lin.bias is not None:
            self.bias.data.copy_(lin.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        y = self._kernel(x2) if x.is_cuda and x2.shape[0] <= SMALL_BATCH_MAX else self._reference(x2)
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
