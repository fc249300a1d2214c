"""SwiGLU MLP with one fused gate_up_proj ([gate; up] rows, gate first) and down_proj."""

from __future__ import annotations

import torch
from torch import nn

from llm_engine import ops
from llm_engine.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)  # W [2I, H]
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)  # W [H, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # [T, 2I]
        if type(self.down_proj) is Linear:  # plain weights: the gate may be fused into down_proj's GEMV
            return ops.silu_mul_linear(gu, self.down_proj.weight, self.down_proj.bias)  # [T, H]
        return self.down_proj(ops.silu_and_mul(gu))  # [T, 2I] -> [T, I] -> [T, H]
