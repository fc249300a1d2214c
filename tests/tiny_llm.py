"""A tiny random llama for engine tests: 2 layers, 64 hidden, GQA; sizes and seed overridable."""

from __future__ import annotations

import torch

from llm_engine.model_config import ModelConfig
from llm_engine.models import build_model
from llm_engine.models.weights import init_random_weights


def tiny_llama(*, seed: int = 0, std: float = 0.5, **cfg):
    torch.set_num_threads(2)
    base = dict(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    return init_random_weights(build_model(ModelConfig(**(base | cfg))), seed=seed, std=std)
