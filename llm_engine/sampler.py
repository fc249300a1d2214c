"""Batched token sampling on the logits' device with no host sync: greedy rows take argmax, random rows use
temperature, top-k and top-p, then the exponential race argmax(p / E), E ~ Exp(1) (Gumbel-max in disguise),
with a torch.Generator per seeded request so seeded sampling is reproducible."""

from __future__ import annotations

import torch


@torch.inference_mode()
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None], default_generator: torch.Generator | None = None,
           *, all_greedy: bool = False, any_top_k: bool = True, any_top_p: bool = True) -> torch.Tensor:
    """logits [B, V] float32; temperature [B] float32 (0 = greedy); top_k [B] int64 (0 = off);
    top_p [B] float32 (1 = off); generators: per row, None -> default_generator. Returns tokens [B] int64."""
    greedy_tok = logits.argmax(dim=-1)  # [B]
    if all_greedy:
        return greedy_tok
    is_greedy = temperature == 0  # [B]
    x = logits / torch.where(is_greedy, 1.0, temperature).unsqueeze(1)  # [B, V]
    if any_top_k or any_top_p:
        x = _mask_top_k_top_p(x, top_k, top_p, any_top_k, any_top_p)
    probs = torch.softmax(x, dim=-1)  # [B, V]
    q = torch.empty_like(probs)  # [B, V] Exp(1) noise
    if all(g is None for g in generators):
        q.exponential_(generator=default_generator)
    else:
        for i, g in enumerate(generators):
            q[i].exponential_(generator=g if g is not None else default_generator)
    sampled = (probs / q).argmax(dim=-1)  # [B]
    return torch.where(is_greedy, greedy_tok, sampled)


def _mask_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, any_top_k: bool,
                      any_top_p: bool) -> torch.Tensor:
    V = x.shape[-1]
    sorted_x, idx = x.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(V, device=x.device).unsqueeze(0)  # [1, V]
    drop = torch.zeros_like(sorted_x, dtype=torch.bool)  # [B, V]
    if any_top_k:
        k = torch.where(top_k > 0, top_k, V).clamp(max=V).unsqueeze(1)  # [B, 1]
        drop |= ranks >= k
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    if any_top_p:
        p = torch.softmax(sorted_x, dim=-1)  # [B, V]
        mass_before = p.cumsum(dim=-1) - p  # [B, V] probability of strictly better tokens
        drop |= mass_before >= top_p.unsqueeze(1)  # keep the smallest prefix reaching top_p (>= 1 token)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, idx, sorted_x)  # [B, V] back in vocab order
