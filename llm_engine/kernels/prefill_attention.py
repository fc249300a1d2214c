"""Prefill / chunked-prefill attention: torch SDPA (flash backend on CUDA) per sequence over its KV gathered
from the paged cache. Query token j of a chunk of L sits at position seq_len - L + j and sees keys up to it.
Host-side lengths come from AttnMetadata's *_cpu lists, so this needs no device sync."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_lens: list[int], seq_lens: list[int], scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] (sequences concatenated); caches [num_blocks, block_size, Hkv, D], already holding this
    step's keys. Returns out [T, Hq, D]."""
    T, n_q, D = q.shape
    n_kv, bs = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)  # [T, Hq, D]
    start = 0
    for i, (L, n) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if L == 0:
            continue
        pages = block_tables[i, : (n + bs - 1) // bs].long()
        k = k_cache[pages].reshape(-1, n_kv, D)[:n]  # [n, Hkv, D]
        v = v_cache[pages].reshape(-1, n_kv, D)[:n]
        qi = q[start:start + L].transpose(0, 1)  # [Hq, L, D]
        ki, vi = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, n, D]
        if n_q != n_kv:
            ki = ki.repeat_interleave(n_q // n_kv, dim=0)
            vi = vi.repeat_interleave(n_q // n_kv, dim=0)
        if n == L:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            qpos = torch.arange(n - L, n, device=q.device)[:, None]  # [L, 1]
            mask = torch.arange(n, device=q.device)[None, :] <= qpos  # [L, n]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[start:start + L] = o.transpose(0, 1)
        start += L
    return out
