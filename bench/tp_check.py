"""TP=N vs TP=1 agreement, shared by the CPU tests (tests/test_tensor_parallel.py) and the GPU check
(bench/tp_gpu.py): logits within a tolerance, greedy tokens equal except where the TP=1 model itself was at a
numerical tie (the all-reduce sums in a different order, so a near-tie may flip)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def top2_gap(logits: torch.Tensor) -> float:
    """logits [V] -> the gap between the two largest (0 = an exact tie)."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def logits_error(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Max abs and relative-norm error of `got` vs `ref` (both [n, V])."""
    ref, got = ref.float(), got.float()
    return {"max_abs": float((ref - got).abs().max()), "rel_norm": float((ref - got).norm() / ref.norm()),
            "argmax_equal": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def greedy_agrees(prompt: list[int], ref: list[int], got: list[int], ref_logits: Callable[[list[int]], torch.Tensor],
                  tie_gap: float) -> tuple[bool, str]:
    """Greedy continuations `ref` (TP=1) and `got` (TP=N) of `prompt` agree up to their first difference, and at
    that position TP=1's top-2 logit gap is below `tie_gap`. ref_logits(ids) -> last-position logits [V] of TP=1."""
    for k, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            gap = top2_gap(ref_logits(prompt + ref[:k]))
            if gap < tie_gap:
                return True, f"tie at token {k} (top-2 gap {gap:.2e} < {tie_gap:g})"
            return False, f"token {k}: {a} vs {b} with a top-2 gap of {gap:.3g} (not a tie)"
    if len(ref) != len(got):
        return False, f"lengths {len(ref)} vs {len(got)}"
    return True, "identical"
