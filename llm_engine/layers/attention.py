"""Self-attention over the paged KV cache: fused qkv_proj ([q; k; v] rows), rotary + KV store, paged attention,
o_proj. Rotary always runs on interleaved (GPT-J) pairs; NeoX checkpoints are permuted at load."""

from __future__ import annotations

import torch
from torch import nn

from llm_engine import ops
from llm_engine.attn_metadata import AttnMetadata
from llm_engine.layers.linear import Linear
from llm_engine.model_config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.rot_dim = cfg.rot_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttnMetadata, cos_sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q + 2kv]
        # q [T, Hq, D], k / v [T, Hkv, D]: views into qkv (two torch calls, not six: eager steps pay per call)
        q, k, v = qkv.view(T, -1, self.head_dim).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], 1)
        q, k = ops.rotary_store_kv(q, k, v, positions, cos_sin, self.rot_dim, True, k_cache, v_cache,
                                   meta.slot_mapping)
        o = ops.paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))  # [T, H]
