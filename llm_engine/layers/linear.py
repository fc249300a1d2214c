"""nn.Linear / nn.Embedding without the random init: weights always come from load_weights or
init_random_weights, and skipping kaiming/normal init makes building a model cost only the allocation.
They ARE nn.Linear / nn.Embedding, so module swaps (quantization) by name or isinstance keep working."""

from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    def reset_parameters(self) -> None:  # filled by the loader
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:  # filled by the loader
        pass
