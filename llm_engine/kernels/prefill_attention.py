"""Prefill / chunked-prefill / mixed-step attention over the paged KV cache: ONE Triton launch for every sequence of
a step (varlen, FlashAttention-style online softmax in fp32).

Sequence b owns query rows [qsl[b], qsl[b+1]) of q [T, Hq, D]: the LAST L = qsl[b+1] - qsl[b] positions of its
n = seq_lens[b] keys (a cached prefix, earlier chunks, then these tokens, all already in the cache). Query j sits
at position n - L + j and sees keys 0..n - L + j. Keys and values are read straight from the paged caches
[num_blocks, block_size, Hkv, D] through block_tables[b] (no gather copy). GQA by indexing: a program serves one
KV head and a tile of BLOCK_M (query, group head) pairs, flattened query-major, so the G = Hq/Hkv heads that share
a KV head ride in one tl.dot whatever G is (1, 3, 16: no padding of G to a power of two).

Grid (B, Hkv, cdiv(max_query_len * G, BLOCK_M)); tiles past a sequence's own L * G rows return at once. Every
length is read from device tensors; the host passes only max_query_len (which sizes the grid), so a step needs no
device sync and a new length never compiles a new variant (the block-table stride is not specialized either).

`sdpa_prefill_attention` is the old path (torch SDPA per sequence over its gathered KV) and the reference the
kernel is tested against; the CPU engine uses llm_engine.ops' torch code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llm_engine.kernels.decode_attention import gqa_group


@triton.jit(do_not_specialize=["s_bt"])
def _prefill_attn_kernel(q_ptr, kc_ptr, vc_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr, scale, page_size,
                         sq_t, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, s_bt, so_t, so_h,
                         G: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    L = tl.load(qsl_ptr + b + 1).to(tl.int64) - q_start
    if tile * BLOCK_M >= L * G:
        return
    n = tl.load(seq_lens_ptr + b).to(tl.int64)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (query, group head) rows of this tile
    j = r // G  # query index within the sequence's chunk
    qh = kvh * G + r % G  # query head
    rm = j < L
    d = tl.arange(0, D_P2)
    dm = d < HEAD_DIM
    qrow = q_start + j
    q = tl.load(q_ptr + qrow[:, None] * sq_t + qh[:, None] * sq_h + d[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0)  # [BLOCK_M, D_P2]
    pos = tl.where(rm, n - L + j, 0)  # absolute position of each row's query; keys 0..pos are visible
    kv_end = tl.minimum(n, n - L + (tile * BLOCK_M + BLOCK_M - 1) // G + 1)  # past the tile's last visible key
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    for start in range(0, kv_end, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        nm = offs < kv_end
        page = tl.load(bt_ptr + b * s_bt + offs // page_size, mask=nm, other=0).to(tl.int64)
        within = offs % page_size
        km = nm[:, None] & dm[None, :]
        k = tl.load(kc_ptr + page[:, None] * skc_b + within[:, None] * skc_s + kvh * skc_h + d[None, :], mask=km,
                    other=0.0)  # [BLOCK_N, D_P2]
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where((offs[None, :] <= pos[:, None]) & nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite from the first tile on: key 0 is visible to every row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + page[:, None] * svc_b + within[:, None] * svc_s + kvh * svc_h + d[None, :], mask=km,
                    other=0.0)  # [BLOCK_N, D_P2]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out_ptr + qrow[:, None] * so_t + qh[:, None] * so_h + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])


def _blocks(D: int, G: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) by head dim: 64 x 64 tiles; narrower key tiles for wide heads."""
    if D > 128:
        return 64, 32, 8
    return 64, 64, 4


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] (sequences concatenated; head dim contiguous, any token/head strides); caches
    [num_blocks, block_size, Hkv, D], already holding this step's keys; query_start_loc [B+1] int32; seq_lens [B]
    int32; block_tables [B, >= max blocks] int32; max_query_len >= every query length (host int). Returns
    out [T, Hq, D] (every row of every sequence written)."""
    T, n_q, D = q.shape
    G = gqa_group(q, k_cache, v_cache, "prefill_attention")
    n_kv = n_q // G
    B = seq_lens.shape[0]
    if out is None:
        out = torch.empty((T, n_q, D), dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if B == 0 or T == 0:
        return out
    block_m, block_n, warps = _blocks(D, G)
    grid = (B, n_kv, triton.cdiv(max_query_len * G, block_m))
    _prefill_attn_kernel[grid](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out, scale, k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1),
        G=G, HEAD_DIM=D, D_P2=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=2)
    return out


def sdpa_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int], scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """The old path and the reference: torch SDPA per sequence over its KV gathered from the paged cache, GQA by
    repeat_interleave, a bottom-right causal mask when a prefix is cached. Host lengths, no device sync."""
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
