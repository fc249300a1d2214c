"""Rotary embedding on q and k (in place) fused with the paged KV-cache write of k and v.

cos_sin: [max_pos, rot_dim], cos in the first rot_dim/2 columns, sin in the last (vLLM's cache layout).
Layouts: interleaved=True rotates adjacent pairs (0,1),(2,3)... (GPT-J / GLM / GGUF-llama);
interleaved=False rotates halves (i, i + rot_dim/2) (NeoX / HF llama). Dims past rot_dim pass through
(GLM's partial rotary). slot_mapping[t] = block * block_size + offset, -1 = don't store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                      n_q_heads, block_size,
                      sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_cs,
                      skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                      HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                      HALF_P2: tl.constexpr, DIM_P2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    half = ROT_DIM // 2
    i = tl.arange(0, HALF_P2)
    im = i < half
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    cos = tl.load(cs_ptr + pos * s_cs + i, mask=im, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + half + i, mask=im, other=0.0).to(tl.float32)
    if h < n_q_heads:
        base = q_ptr + t * sq_t + h * sq_h
        x1 = tl.load(base + i1, mask=im, other=0.0).to(tl.float32)
        x2 = tl.load(base + i2, mask=im, other=0.0).to(tl.float32)
        tl.store(base + i1, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=im)
        tl.store(base + i2, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=im)
    else:
        kh = h - n_q_heads
        base = k_ptr + t * sk_t + kh * sk_h
        x1 = tl.load(base + i1, mask=im, other=0.0).to(tl.float32)
        x2 = tl.load(base + i2, mask=im, other=0.0).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty)
        tl.store(base + i1, y1, mask=im)
        tl.store(base + i2, y2, mask=im)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            blk = slot // block_size
            off = slot % block_size
            kc = kc_ptr + blk * skc_b + off * skc_s + kh * skc_h
            tl.store(kc + i1, y1.to(kc_ptr.dtype.element_ty), mask=im)
            tl.store(kc + i2, y2.to(kc_ptr.dtype.element_ty), mask=im)
            d = tl.arange(0, DIM_P2)
            if ROT_DIM < HEAD_DIM:
                pm = (d >= ROT_DIM) & (d < HEAD_DIM)
                xp = tl.load(base + d, mask=pm, other=0.0)
                tl.store(kc + d, xp.to(kc_ptr.dtype.element_ty), mask=pm)
            dm = d < HEAD_DIM
            vv = tl.load(v_ptr + t * sv_t + kh * sv_h + d, mask=dm, other=0.0)
            vc = vc_ptr + blk * svc_b + off * svc_s + kh * svc_h
            tl.store(vc + d, vv.to(vc_ptr.dtype.element_ty), mask=dm)


def rotary_store_kv(q, k, v, positions, cos_sin, rot_dim: int, interleaved: bool, k_cache, v_cache, slot_mapping):
    """q [T,Hq,D], k/v [T,Hkv,D] (last dim contiguous; q and k rotated in place), positions [T],
    k_cache/v_cache [num_blocks, block_size, Hkv, D]. Returns (q, k)."""
    T, n_q, D = q.shape
    n_kv = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("rotary_store_kv wants the head dim contiguous")
    if rot_dim % 2 or rot_dim > D or cos_sin.shape[1] != rot_dim:
        raise ValueError(f"bad rot_dim {rot_dim} for head_dim {D} / cos_sin {tuple(cos_sin.shape)}")
    if T == 0:
        return q, k
    _rotary_kv_kernel[(T, n_q + n_kv)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, n_q, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        HEAD_DIM=D, ROT_DIM=rot_dim, INTERLEAVED=interleaved,
        HALF_P2=triton.next_power_of_2(rot_dim // 2), DIM_P2=triton.next_power_of_2(D), num_warps=1)
    return q, k


def reference_rotary(x: torch.Tensor, positions, cos_sin, rot_dim: int, interleaved: bool) -> torch.Tensor:
    """x [T, H, D] -> rotated copy (fp32 math, x's dtype)."""
    half = rot_dim // 2
    cs = cos_sin[positions.long()].float()  # [T, rot_dim]
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, half]
    xf = x.float()
    rot, rest = xf[..., :rot_dim], xf[..., rot_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((y, rest), dim=-1).to(x.dtype)


def reference_rotary_store_kv(q, k, v, positions, cos_sin, rot_dim, interleaved, k_cache, v_cache, slot_mapping):
    q2 = reference_rotary(q, positions, cos_sin, rot_dim, interleaved)
    k2 = reference_rotary(k, positions, cos_sin, rot_dim, interleaved)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k2[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)
    q.copy_(q2)
    k.copy_(k2)
    return q, k


def make_cos_sin(max_pos: int, rot_dim: int, base: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """[max_pos, rot_dim] = cat(cos, sin) of position * base^(-2i/rot_dim)."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim))
    f = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv[None, :]  # [max_pos, rot_dim/2]
    return torch.cat((f.cos(), f.sin()), dim=-1).to(dtype)
