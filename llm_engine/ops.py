"""The model's compute ops in pure torch, one small function each, so that a device backend (Triton on CUDA) can
replace any of them behind the same name and signature. `reference_*` functions are the slow, obvious
formulas (float32, dense) that kernels and fast paths are tested against.

Shapes: T = tokens this step, B = sequences, Hq/Hkv = query/kv heads, D = head_dim, H = hidden size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from llm_engine.attn_metadata import AttnMetadata

__all__ = ["add_rms_norm", "rms_norm", "norm_add_rms_norm", "rotary_store_kv", "paged_attention", "silu_and_mul",
           "linear", "silu_mul_linear",
           "reference_rms_norm", "reference_rotary", "reference_paged_attention", "gather_kv"]


# ---------------------------------------------------------------- CUDA dispatch (Triton kernels, llm_engine.kernels)
# Each public op sends CUDA tensors to its Triton kernel; CPU tensors take the torch code below unchanged.
# The kernels are imported lazily, so the CPU engine never imports triton.

def _kernels():
    from llm_engine import kernels as _k  # noqa: F401
    from llm_engine.kernels import decode_attention, rms_norm, rotary_kv, silu_and_mul
    return rms_norm, rotary_kv, decode_attention, silu_and_mul


_KERNELS_ON_CPU = [False]


@contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Inside: CPU tensors take the CUDA path's Triton kernels too (run them under TRITON_INTERPRET=1), so tests and
    bench/prefill_ops.py exercise and count exactly what a GPU step runs, on a machine without one. Not for serving:
    interpreted kernels are slow."""
    prev = _KERNELS_ON_CPU[0]
    _KERNELS_ON_CPU[0] = True
    try:
        yield
    finally:
        _KERNELS_ON_CPU[0] = prev


def _kern(x: torch.Tensor) -> bool:
    return x.is_cuda or _KERNELS_ON_CPU[0]


# ---------------------------------------------------------------- norms

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> weight * x / rms(x)  [T, H] (no +1 on the weight)."""
    if _kern(x) and x.dim() == 2 and x.stride(-1) == 1:
        return _kernels()[0].rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: new_residual = x + residual (x itself when residual is None);
    returns (rms_norm(new_residual) [T, H], new_residual [T, H]). Inputs are not modified."""
    if _kern(x) and x.dim() == 2 and x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1):
        return _kernels()[0].add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    return F.rms_norm(x, weight.shape, weight, eps), x


def norm_add_rms_norm(x: torch.Tensor, pre_weight: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4's sandwich step in one pass: new_residual = rms_norm(x) * pre_weight + residual; returns
    (rms_norm(new_residual) * weight, new_residual). Same maths as rms_norm then add_rms_norm."""
    if _kern(x) and x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1:
        return _kernels()[0].norm_add_rms_norm(x, pre_weight, residual, weight, eps)
    return add_rms_norm(rms_norm(x, pre_weight, eps), residual, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 formula: weight * x * rsqrt(mean(x^2) + eps), cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


# ---------------------------------------------------------------- rotary + KV store

def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> None:
    """Rotate x [T, Hx, rot_dim] in place (x may be a strided view); cos/sin [T, rot_dim/2] float32."""
    half = x.shape[-1] // 2
    if interleaved:
        # GPT-J pairs (0,1),(2,3)...: one complex multiply per pair.
        freqs = torch.complex(cos, sin)[:, None, :]  # [T, 1, rot/2] complex64
        if x.dtype == torch.float32:
            xc = torch.view_as_complex(x.unflatten(-1, (half, 2)))  # [T, Hx, rot/2] view into x
            xc.mul_(freqs)
        else:
            xc = torch.view_as_complex(x.float().unflatten(-1, (half, 2)))  # [T, Hx, rot/2] fp32 copy
            x.copy_(torch.view_as_real(xc * freqs).flatten(-2))
        return
    # NeoX rotate-half pairs (i, i + rot/2).
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, rot/2]
    x1, x2 = x[..., :half].float(), x[..., half:].float()  # [T, Hx, rot/2] (views when x is float32)
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s  # both computed before either half is overwritten
    x[..., :half] = o1
    x[..., half:] = o2


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor, rot_dim: int, interleaved: bool, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embedding to the first rot_dim dims of every head of q [T, Hq, D] and k [T, Hkv, D]
    (in place; q/k may be strided views, e.g. slices of a fused qkv output), then write the rotated k and
    v [T, Hkv, D] into the paged caches k_cache/v_cache [num_blocks, block_size, Hkv, D] at flat slot
    slot_mapping [T] (slots < 0 are skipped). cos_sin [max_pos, rot_dim] float32 holds cos | sin halves;
    positions [T] index it. interleaved: GPT-J adjacent pairs, else NeoX halves. Returns (q, k)."""
    if _kern(q) and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1:
        return _kernels()[1].rotary_store_kv(q, k, v, positions, cos_sin, rot_dim, interleaved, k_cache, v_cache,
                                             slot_mapping)
    cs = cos_sin.index_select(0, positions)  # [T, rot_dim]
    half = rot_dim // 2
    cos, sin = cs[:, :half], cs[:, half:]
    qk = _adjacent_heads(q, k)
    if qk is not None:  # q and k are neighbours in one fused qkv row: rotate both heads' sets in one go
        _rotate_(qk[..., :rot_dim], cos, sin, interleaved)
    else:
        _rotate_(q[..., :rot_dim], cos, sin, interleaved)
        _rotate_(k[..., :rot_dim], cos, sin, interleaved)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A [T, Hq + Hkv, D] view over q then k when k's heads directly follow q's in memory (slices of one
    fused qkv output), else None."""
    if q.dtype != k.dtype or q.stride() != k.stride() or q.stride()[1:] != (q.shape[2], 1):
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into the caches [N, block_size, Hkv, D] at flat slots [T]; slots < 0 are skipped."""
    if slot_mapping.numel() == 0:
        return
    if int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0  # [T] bool
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def reference_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, rot_dim: int,
                     interleaved: bool) -> torch.Tensor:
    """HF-formula rotary (float32, out of place) for x [T, Hx, D]; dims past rot_dim pass through."""
    half = rot_dim // 2
    cs = cos_sin[positions].float()  # [T, rot_dim]
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, rot/2]
    xf = x.float()
    xr, xp = xf[..., :rot_dim], xf[..., rot_dim:]
    if interleaved:
        cos2, sin2 = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)  # [c0,c0,c1,c1,...]
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        rot = torch.cat((-xr[..., half:], xr[..., :half]), -1)
    return torch.cat((xr * cos2 + rot * sin2, xp), -1).to(x.dtype)


# ---------------------------------------------------------------- attention over the paged cache

def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first seq_len cached rows: cache [N, bs, Hkv, D], block_table [max_blocks] -> [S, Hkv, D]."""
    bs = cache.shape[1]
    n_blocks = (seq_len + bs - 1) // bs
    # index_select, not cache[table]: advanced indexing costs ~3x more per call on CPU.
    return cache.index_select(0, block_table[:n_blocks]).flatten(0, 1)[:seq_len]  # [S, Hkv, D]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata,
                    scale: float) -> torch.Tensor:
    """Causal GQA attention of q [T, Hq, D] over the paged caches [N, block_size, Hkv, D] -> out [T, Hq, D].

    Sequence i owns query rows [qsl[i], qsl[i+1]): the LAST query_len_i positions of its seq_len_i keys, which
    are read through block_tables[i]. Query j of the sequence (absolute position seq_len - query_len + j)
    sees keys 0..that position. Covers decode (query_len 1), prefill and chunked prefill over a cached prefix.
    On the kernel path a step with any prefill row runs kernels/prefill_attention.py (one launch; the default,
    VOICEFAST_PREFILL_ATTN=triton), else the per-sequence SDPA loop below (the CPU path, and CUDA with
    VOICEFAST_PREFILL_ATTN=sdpa)."""
    if meta.is_decode and _kern(q):  # Triton: GQA-grouped split-K over the paged cache, device metadata only
        return _kernels()[2].decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                              max_seq_len=meta.max_seq_len)
    if _kern(q) and q.stride(-1) == 1:
        from llm_engine.kernels import prefill_attention_backend

        if prefill_attention_backend() == "triton":  # one varlen launch for every sequence, KV read in place
            from llm_engine.kernels.prefill_attention import prefill_attention

            return prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                     scale, meta.max_query_len)
    if meta.is_decode:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)  # [T, Hq, D]
    start = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        k = gather_kv(k_cache, meta.block_tables[i], slen)  # [S, Hkv, D]
        v = gather_kv(v_cache, meta.block_tables[i], slen)  # [S, Hkv, D]
        qi = q[start:start + qlen]  # [L, Hq, D]
        if qlen == 1:
            out[start] = _one_query_attention(qi, k[None], v[None], None, scale)[0]
        else:
            # Bottom-right aligned causal mask: query j sees keys <= slen - qlen + j.
            mask = None if qlen == slen else torch.ones(qlen, slen, dtype=torch.bool, device=q.device).tril_(
                slen - qlen)  # [L, S]
            o = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                               scale=scale, enable_gqa=True)  # [1, Hq, L, D]
            out[start:start + qlen] = o[0].transpose(0, 1)
        start += qlen
    return out


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one query per sequence), k/v [B, S, Hkv, D], mask [B, 1, 1, S] or None -> [B, Hq, D].
    The G = Hq/Hkv query heads sharing a kv head ride in SDPA's query-length dim: no kv expansion, no GQA path."""
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.view(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)  # [B, Hkv, G, D]
    return o.reshape(B, Hq, D)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata,
                      scale: float) -> torch.Tensor:
    """One query per sequence: gather all sequences' blocks at once, mask keys past each seq_len."""
    B = q.shape[0]
    bs, Hkv, D = k_cache.shape[1:]
    n_blocks = (meta.max_seq_len + bs - 1) // bs
    blocks = meta.block_tables[:, :n_blocks].reshape(-1)  # [B * nb]
    k = k_cache.index_select(0, blocks).view(B, n_blocks * bs, Hkv, D)  # [B, S_pad, Hkv, D]
    v = v_cache.index_select(0, blocks).view(B, n_blocks * bs, Hkv, D)  # [B, S_pad, Hkv, D]
    if B == 1:
        s = meta.seq_lens_cpu[0]
        return _one_query_attention(q, k[:, :s], v[:, :s], None, scale)
    keys = torch.arange(n_blocks * bs, device=q.device)  # [S_pad]
    mask = (keys[None, :] < meta.seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, S_pad]
    return _one_query_attention(q, k, v, mask, scale)


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Dense float32 formula, one sequence and one head at a time: out [T, Hq, D] in q's dtype."""
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q, dtype=torch.float32)  # [T, Hq, D]
    start = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        k = gather_kv(k_cache, meta.block_tables[i], slen).float()  # [S, Hkv, D]
        v = gather_kv(v_cache, meta.block_tables[i], slen).float()  # [S, Hkv, D]
        for j in range(qlen):
            visible = slen - qlen + j + 1
            for h in range(Hq):
                s = (k[:visible, h // group] @ q[start + j, h].float()) * scale  # [visible]
                out[start + j, h] = torch.softmax(s, 0) @ v[:visible, h // group]
        start += qlen
    return out.to(q.dtype)


# ---------------------------------------------------------------- linears (small CUDA inputs: kernels/gemv.py)

def _gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    from llm_engine.kernels import gemv_enabled

    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= 16 and x.dtype == w.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1 and gemv_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight[N, K]^T (+ bias) -> [T, N]. Decode-sized CUDA inputs take the faster of cuBLAS and the
    Triton GEMV for their shape (timed once); everything else F.linear."""
    if _gemv_ok(x, weight):
        from llm_engine.kernels import gemv

        return gemv.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu_and_mul(x), weight, bias) for x [T, 2I] = [gate | up]; decode-sized CUDA inputs may run it as
    one kernel (the gate formed in the GEMV's prologue) when that is the faster candidate."""
    if _gemv_ok(x, weight):
        from llm_engine.kernels import gemv

        return gemv.linear(x, weight, bias, silu_mul=True)
    return F.linear(silu_and_mul(x), weight, bias)


# ---------------------------------------------------------------- MLP

def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: x [T, 2I] = [gate | up] -> silu(gate) * up  [T, I]."""
    if _kern(x) and x.dim() == 2 and x.stride(-1) == 1:
        return _kernels()[3].silu_and_mul(x)
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]
