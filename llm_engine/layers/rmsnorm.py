"""RMSNorm module (weight only, no +1) with an optional fused residual add, both via llm_engine.ops."""

from __future__ import annotations

import torch
from torch import nn

from llm_engine import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [H]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None -> (norm(x), x)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
