"""On-device sampling with no host sync: greedy, temperature, top-k / top-p.

Sampling uses the Gumbel-max trick: argmax(logits / T + Gumbel) is a draw from softmax(logits / T), so a
single pass over the vocabulary picks the token (rows with T == 0 take the plain argmax). Random numbers
come from Philox (tl.rand) keyed by a per-row seed and a per-row step counter kept on the device, so a
CUDA graph replays it with fresh noise and a seeded request is reproducible. Top-k / top-p rows are
filtered first by a sort (torch ops, graph-capturable)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temp_ptr, seed_ptr, step_ptr, val_ptr, idx_ptr, vocab, stride_l,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    m = cols < vocab
    x = tl.load(logits_ptr + b * stride_l + cols, mask=m, other=float("-inf")).to(tl.float32)
    temp = tl.load(temp_ptr + b).to(tl.float32)
    seed = tl.load(seed_ptr + b).to(tl.int64) + tl.load(step_ptr + b).to(tl.int64) * 1000003
    u = tl.rand(seed, cols)
    u = tl.minimum(tl.maximum(u, 1e-12), 1.0 - 1e-7)
    gumbel = -tl.log(-tl.log(u))
    inv_t = tl.where(temp > 0, 1.0 / tl.where(temp > 0, temp, 1.0), 1.0)
    score = tl.where(temp > 0, x * inv_t + gumbel, x)
    score = tl.where(m, score, float("-inf"))
    best = tl.argmax(score, axis=0)
    bval = tl.max(score, axis=0)
    tl.store(val_ptr + b * n_chunks + c, bval)
    tl.store(idx_ptr + b * n_chunks + c, (c * BLOCK + best).to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  steps: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """logits [B, V]; temperature [B] float (0 = greedy); seeds [B] int64; steps [B] int64 (bump per token).
    Returns tokens [B] int64 on the device."""
    B, V = logits.shape
    block = min(block, triton.next_power_of_2(V))
    nc = triton.cdiv(V, block)
    vals = torch.empty((B, nc), dtype=torch.float32, device=logits.device)  # [B, chunks]
    idxs = torch.empty((B, nc), dtype=torch.int64, device=logits.device)  # [B, chunks]
    if B == 0:
        return idxs[:, 0]
    _gumbel_argmax_kernel[(B, nc)](logits, temperature, seeds, steps, vals, idxs, V, logits.stride(0),
                                   BLOCK=block, num_warps=8 if block >= 4096 else 4)
    best = vals.argmax(dim=1, keepdim=True)  # [B, 1]
    return idxs.gather(1, best).squeeze(1)


def filter_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Returns temperature-scaled logits [B, V] fp32 with everything outside each row's top-k / top-p set at
    -inf (top_k 0 = off, top_p 1 = off; the best token always stays). Greedy rows (T == 0) keep scale 1."""
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    V = x.shape[1]
    srt, order = x.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(V, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    drop = ranks >= k[:, None]
    srt = srt.masked_fill(drop, float("-inf"))
    probs = srt.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass ahead of each token
    drop = drop | (before > top_p[:, None])
    drop[:, 0] = False
    srt = srt.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, srt)


def sample(logits, temperature, top_k, top_p, seeds, steps, needs_filter: bool) -> torch.Tensor:
    """Full sampler. needs_filter (host bool, known when the batch is formed) skips the sort when no row
    uses top-k / top-p."""
    if needs_filter:
        logits = filter_top_k_top_p(logits, temperature, top_k, top_p)
        temperature = torch.where(temperature > 0, 1.0, 0.0).to(torch.float32)
    return gumbel_argmax(logits, temperature, seeds, steps)


def reference_sample(logits, temperature, top_k, top_p, generator: torch.Generator | None = None) -> torch.Tensor:
    """Torch reference: greedy for T == 0, else the exponential trick argmax(p / Exp(1)) over the filtered
    distribution."""
    x = filter_top_k_top_p(logits, temperature, top_k, top_p)
    probs = x.softmax(dim=-1)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    drawn = (probs / e).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, logits.argmax(dim=-1))
