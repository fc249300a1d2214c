"""bench/tp_check.py's tie rule: a greedy difference between TP=2 and TP=1 is excused only when TP=1's top-2 logit
gap is within 2 units in the last place of the compute dtype at the top logit (bf16: 0.0625 for a top logit in
[4, 8)), and the ulp is bf16's / float32's real spacing."""

from __future__ import annotations

import pytest
import torch

from bench.tp_check import greedy_agrees, rounding_tie_gap, ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("x", [5.6, -5.6, 4.0, 7.99, 1.0, 0.3, 13.0, 100.0])
def test_ulp_is_the_dtypes_spacing_at_x(dtype, x):
    v = float(torch.tensor(x).to(dtype))  # a representable value near x
    u = ulp(v, dtype)
    step = u if v > 0 else -u
    assert float(torch.tensor(v + step).to(dtype)) == v + step  # one ulp away is representable ...
    assert float(torch.tensor(v + step / 4).to(dtype)) == v  # ... and a quarter ulp rounds back to v


def test_ulp_at_the_logit_magnitudes_of_the_264a9f4_run():
    assert ulp(5.5, torch.bfloat16) == 2**-5 == 0.03125  # the recorded bf16 gaps were 0.0312 and 0.0625
    assert rounding_tie_gap(5.5, torch.bfloat16) == 0.0625
    assert rounding_tie_gap(3.0, torch.bfloat16) == 0.03125
    assert rounding_tie_gap(5.5, torch.float32) == 2 * 2.0**-21  # ~9.5e-7
    assert ulp(0.0, torch.bfloat16) > 0


def _logits(top1: float, gap: float, dtype: torch.dtype, vocab: int = 50) -> torch.Tensor:
    """[vocab] logits in `dtype`'s values (as float32): token 7 at top1, token 3 `gap` below, the rest far lower."""
    lg = torch.linspace(-3.0, 1.0, vocab)
    lg[7], lg[3] = top1, top1 - gap
    return lg.to(dtype).float()


@pytest.mark.parametrize("top1,gap,dtype,tie", [
    (5.5, 0.03125, torch.bfloat16, True),  # one bf16 step
    (5.5, 0.0625, torch.bfloat16, True),  # two
    (5.5, 0.09375, torch.bfloat16, False),  # three: not rounding
    (3.0, 0.0625, torch.bfloat16, False),  # in [2, 4) a bf16 step is 0.0156: 0.0625 is four of them
    (5.5, 0.0625, torch.float32, False),  # the same gap in float32 is ~65,000 ulps
    (5.5, 2**-21, torch.float32, True),
])
def test_greedy_difference_is_a_tie_only_within_two_ulps(top1, gap, dtype, tie):
    prompt, ref, got = [1, 2], [7, 9, 7, 7], [7, 9, 3, 5]  # differ at token 2
    seen = []

    def ref_logits(ids):
        seen.append(list(ids))
        return _logits(top1, gap, dtype)

    ok, why = greedy_agrees(prompt, ref, got, ref_logits, tie_dtype=dtype)
    assert seen == [[1, 2, 7, 9]]  # TP=1's logits at the first difference, after its own tokens
    assert ok is tie and why.startswith("tie at token 2" if tie else "token 2: 7 vs 3"), why
    assert greedy_agrees(prompt, ref, list(ref), ref_logits, tie_dtype=dtype) == (True, "identical")


def test_absolute_tie_gap_the_larger_of_both_rules_and_bad_arguments():
    ref_logits = lambda ids: _logits(5.5, 0.09375, torch.bfloat16)  # noqa: E731  three bf16 steps
    assert greedy_agrees([], [7, 1], [3, 1], ref_logits, tie_gap=0.1)[0]
    assert not greedy_agrees([], [7, 1], [3, 1], ref_logits, tie_gap=1e-2)[0]
    assert greedy_agrees([], [7, 1], [7], ref_logits, tie_gap=1e-2) == (False, "lengths 2 vs 1")
    # int8 at TP=2: the ulp rule, or up to what the measured logits difference can flip, whichever is larger
    assert not greedy_agrees([], [7], [3], ref_logits, tie_gap=0.05, tie_dtype=torch.bfloat16)[0]
    ok, why = greedy_agrees([], [7], [3], ref_logits, tie_gap=0.1, tie_dtype=torch.bfloat16)
    assert ok and "0.0938 <= 0.1 / 2 bfloat16 ulps at top-1 5.5 = 0.0625" in why, why
    with pytest.raises(ValueError, match="tie_gap"):
        greedy_agrees([], [7], [3], ref_logits)
