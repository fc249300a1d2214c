"""TP=N vs TP=1 agreement, shared by the CPU tests (tests/test_tensor_parallel.py) and the GPU check
(bench/tp_gpu.py): logits within a tolerance, greedy tokens equal except where the TP=1 model itself was at a
numerical tie (the all-reduce sums in a different order, so a near-tie may flip).

What counts as a tie depends on the dtype the logits are computed in: bf16 keeps 8 significant bits, so near a
top logit of ~5.5 two logits are either equal or at least 2**-5 = 0.031 apart, and a flip between logits one or
two such steps apart is rounding, whatever the sharding. `rounding_tie_gap` is that rule: ties are top-2 gaps up
to `ulps` units in the last place of the dtype at the top logit's magnitude (2 ulps: 0.0625 in bf16 for a top
logit in [4, 8); 9.5e-7 in float32)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def top2(logits: torch.Tensor) -> tuple[float, float]:
    """logits [V] -> (the largest, the gap between the two largest; 0 = an exact tie)."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0]), float(top[0] - top[1])


def ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s values at |x| (normal range): 2**(floor(log2|x|) - mantissa bits), e.g. bf16
    (7 stored bits) 2**-5 for |x| in [4, 8)."""
    fi = torch.finfo(dtype)
    ax = abs(float(x))
    if ax < fi.tiny:
        return fi.eps * fi.tiny
    return fi.eps * 2.0 ** math.floor(math.log2(ax))


def rounding_tie_gap(top1: float, dtype: torch.dtype, ulps: int = 2) -> float:
    """The largest top-2 gap that still counts as a rounding tie: `ulps` ulps of `dtype` at the top logit."""
    return ulps * ulp(top1, dtype)


def logits_error(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Max abs and relative-norm error of `got` vs `ref` (both [n, V])."""
    ref, got = ref.float(), got.float()
    return {"max_abs": float((ref - got).abs().max()), "rel_norm": float((ref - got).norm() / ref.norm()),
            "argmax_equal": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def greedy_agrees(prompt: list[int], ref: list[int], got: list[int], ref_logits: Callable[[list[int]], torch.Tensor],
                  tie_gap: float = 0.0, tie_dtype: torch.dtype | None = None,
                  tie_ulps: int = 2) -> tuple[bool, str]:
    """Greedy continuations `ref` (TP=1) and `got` (TP=N) of `prompt` agree up to their first difference, and at
    that position TP=1's top-2 logit gap is a tie: at most the absolute `tie_gap`, or (tie_dtype) at most
    `tie_ulps` ulps of tie_dtype at the top logit (`rounding_tie_gap`), whichever is larger.
    ref_logits(ids) -> last-position logits [V] of TP=1."""
    if tie_gap <= 0 and tie_dtype is None:
        raise ValueError("greedy_agrees needs tie_gap (absolute) or tie_dtype (ulps of a dtype), or both")
    for k, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            top1, gap = top2(ref_logits(prompt + ref[:k]))
            rules = [f"{tie_gap:.3g}"] if tie_gap > 0 else []
            limit = tie_gap
            if tie_dtype is not None:
                limit = max(limit, rounding_tie_gap(top1, tie_dtype, tie_ulps))
                rules.append(f"{tie_ulps} {str(tie_dtype).removeprefix('torch.')} ulps at top-1 {top1:.3g} = "
                             f"{rounding_tie_gap(top1, tie_dtype, tie_ulps):.3g}")
            rule = " / ".join(rules)
            if gap <= limit:
                return True, f"tie at token {k}: {a} vs {b}, top-2 gap {gap:.3g} <= {rule}"
            return False, f"token {k}: {a} vs {b}, top-2 gap {gap:.3g} > {rule} (not a tie)"
    if len(ref) != len(got):
        return False, f"lengths {len(ref)} vs {len(got)}"
    return True, "identical"
