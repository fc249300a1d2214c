"""The paged KV pool: one (k, v) pair per layer, each [num_blocks, block_size, n_kv_heads, head_dim], and how
many blocks fit in memory."""

from __future__ import annotations

import torch

from llm_engine.model_config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def num_blocks_for_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return max(2, budget_bytes // kv_bytes_per_block(cfg, block_size, dtype))


def cuda_kv_budget_bytes(device: torch.device, utilization: float) -> int:
    """What is left of `utilization` x total GPU memory once the weights are resident."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(total * utilization) - used)


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str,
                      dtype: torch.dtype) -> list[KVCache]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype),  # k [N, bs, Hkv, D]
             torch.zeros(shape, device=device, dtype=dtype))  # v [N, bs, Hkv, D]
            for _ in range(cfg.num_layers)]
