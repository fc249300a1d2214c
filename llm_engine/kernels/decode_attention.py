"""Decode attention over the paged KV cache: one query token per sequence.

One program per (sequence, KV head, split): it loads each KV tile once and serves all the G = Hq/Hkv
query heads of its group with one tl.dot (G padded to 16). Long contexts are split over `num_splits`
programs (split-K) whose partial outputs are merged by log-sum-exp in a second small kernel. Everything
is read from device tensors (seq_lens, block_tables), so a CUDA graph can replay it with new contents.

Split s covers keys [s * SPLIT_TOKENS, (s + 1) * SPLIT_TOKENS). SPLIT_TOKENS depends only on the batch shape,
never on lengths, so a sequence's keys are partitioned the same way whatever the launch's length bound (the
graph's capacity or the eager step's max_seq_len): eager and graph decode give bit-identical outputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def gqa_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, who: str) -> int:
    """Query heads per KV head for q [..., Hq, D] over caches [num_blocks, block_size, Hkv, D]; checks the head dim
    is contiguous everywhere (the attention kernels load it as one vector)."""
    n_q, n_kv = q.shape[-2], k_cache.shape[2]
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads do not group over {n_kv} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{who} wants the head dim contiguous")
    return n_q // n_kv


@triton.jit
def _decode_attn_kernel(q_ptr, kc_ptr, vc_ptr, seq_lens_ptr, bt_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                        scale, page_size,
                        sq_b, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, s_bt, so_b, so_h,
                        G: tl.constexpr, G_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                        BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_TOKENS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_P2)
    d = tl.arange(0, D_P2)
    gm = g < G
    dm = d < HEAD_DIM
    qh = kvh * G + g  # [G_P2] query heads of this group
    q = tl.load(q_ptr + b * sq_b + qh[:, None] * sq_h + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * SPLIT_TOKENS
    end = tl.minimum(start + SPLIT_TOKENS, seq_len)
    m_i = tl.full([G_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, D_P2], tl.float32)
    for n in range(start, end, BLOCK_N):
        offs = n + tl.arange(0, BLOCK_N)
        nm = offs < end
        page = tl.load(bt_ptr + b * s_bt + offs // page_size, mask=nm, other=0).to(tl.int64)
        within = offs % page_size
        km = nm[:, None] & dm[None, :]
        k = tl.load(kc_ptr + page[:, None] * skc_b + within[:, None] * skc_s + kvh * skc_h + d[None, :],
                    mask=km, other=0.0)  # [BLOCK_N, D]
        s = tl.dot(q, tl.trans(k)) * scale  # [G_P2, BLOCK_N]
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + page[:, None] * svc_b + within[:, None] * svc_s + kvh * svc_h + d[None, :],
                    mask=km, other=0.0)  # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    om = gm[:, None] & dm[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * so_b + qh[:, None] * so_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=om)
    else:
        # partials: o [B, Hq, S, D_P2] fp32, lse [B, Hq, S] fp32 (-inf for an empty split)
        n_q = tl.num_programs(1) * G
        row = (b * n_q + qh) * NUM_SPLITS + split  # [G_P2]
        tl.store(part_o_ptr + row[:, None] * D_P2 + d[None, :], o, mask=om)
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=gm)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, so_b, so_h,
                  HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n_q = tl.num_programs(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_P2)
    row = (b * n_q + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + s)  # [S]
    mx = tl.max(lse, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx_safe)  # exp(-inf) = 0 for empty splits
    live = lse > float("-inf")  # empty splits are not read
    o = tl.load(part_o_ptr + (row + s)[:, None] * D_P2 + d[None, :], mask=live[:, None], other=0.0)  # [S, D_P2]
    tot = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + d, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def pick_split_tokens(batch: int, n_kv_heads: int) -> int:
    """Keys per split: short splits when few (sequence, head) programs would run, longer ones for big batches
    (fewer partials to write and merge). A function of the batch shape only (see the module note)."""
    progs = batch * n_kv_heads
    return 64 if progs <= 32 else 128 if progs <= 64 else 256


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, split_tokens: int | None = None,
                     max_seq_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence); caches [num_blocks, block_size, Hkv, D]; seq_lens [B] int32;
    block_tables [B, max_blocks] int32; max_seq_len: a bound on seq_lens (default: the tables' capacity).
    split_tokens: keys per split-K program (a multiple of 64 and a power of two; default by batch shape).
    Returns out [B, Hq, D]. Rows with seq_len 0 give zeros."""
    B, n_q, D = q.shape
    G = gqa_group(q, k_cache, v_cache, "decode_attention")
    n_kv = n_q // G
    block_n = 64 if D <= 128 else 32
    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * k_cache.shape[1]
    split = split_tokens or pick_split_tokens(B, n_kv)
    while triton.cdiv(bound, split) > 256:  # very long bounds: longer splits (changes the partition)
        split *= 2
    if split % block_n or split & (split - 1):
        raise ValueError(f"split_tokens must be a power of two and a multiple of {block_n}, got {split}")
    num_splits = triton.next_power_of_2(max(1, triton.cdiv(bound, split)))
    if out is None:
        out = torch.empty((B, n_q, D), dtype=q.dtype, device=q.device)  # [B, Hq, D]
    if B == 0:
        return out
    d_p2 = triton.next_power_of_2(D)
    if num_splits > 1:
        part_o = torch.empty((B, n_q, num_splits, d_p2), dtype=torch.float32, device=q.device)  # [B, Hq, S, D]
        part_lse = torch.empty((B, n_q, num_splits), dtype=torch.float32, device=q.device)  # [B, Hq, S]
    else:
        part_o = part_lse = out
    _decode_attn_kernel[(B, n_kv, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_o, part_lse, scale, k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1),
        G=G, G_P2=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, D_P2=d_p2, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, SPLIT_TOKENS=split, num_warps=4, num_stages=2)
    if num_splits > 1:
        _merge_kernel[(B, n_q)](part_o, part_lse, out, out.stride(0), out.stride(1),
                                HEAD_DIM=D, D_P2=d_p2, NUM_SPLITS=num_splits, num_warps=1)
    return out


def reference_decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale) -> torch.Tensor:
    B, n_q, D = q.shape
    n_kv = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.zeros_like(q)
    for i in range(B):
        n = int(seq_lens[i])
        if n == 0:
            continue
        pages = block_tables[i, : (n + bs - 1) // bs].long()
        k = k_cache[pages].reshape(-1, n_kv, D)[:n].float()  # [n, Hkv, D]
        v = v_cache[pages].reshape(-1, n_kv, D)[:n].float()
        k = k.repeat_interleave(n_q // n_kv, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(n_q // n_kv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
