"""Sampler: greedy, temperature, top-k, top-p, per-request seeds (torch on CPU)."""

import torch

from llm_engine.sampler import sample


def args(B, temp=0.0, k=0, p=1.0):
    return (torch.full((B,), temp), torch.full((B,), k, dtype=torch.int64), torch.full((B,), p))


def test_greedy_is_argmax():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    t, k, p = args(4)
    assert torch.equal(sample(logits, t, k, p, [None] * 4, all_greedy=True), logits.argmax(-1))
    assert torch.equal(sample(logits, t, k, p, [None] * 4), logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0, 0.0])
    _, k, p = args(3)
    for s in range(5):
        out = sample(logits, t, k, p, [None] * 3, torch.Generator().manual_seed(s))
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_rows_are_reproducible_and_independent_of_batch():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2))
    t, k, p = args(2, temp=1.0)

    def run(seed_a, seed_b):
        gens = [torch.Generator().manual_seed(seed_a), torch.Generator().manual_seed(seed_b)]
        return [int(sample(logits, t, k, p, gens)[0]) for _ in range(1)] + \
            [int(x) for x in torch.stack([sample(logits, t, k, p, gens) for _ in range(20)])[:, 0]]

    assert run(7, 1) == run(7, 99)  # row 0 depends only on its own seed
    assert run(7, 1) != run(8, 1)


def test_top_k_restricts_support():
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    t, k, p = args(1, temp=5.0, k=5)
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, t, k, p, [g])[0]) for _ in range(300)}
    assert seen <= top5 and len(seen) >= 3
    t, k, p = args(1, temp=5.0, k=1)
    assert int(sample(logits, t, k, p, [g])[0]) == int(logits.argmax())


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    t, k, p = args(1, temp=1.0, p=0.7)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    seen = {int(sample(logits, t, k, p, [g])[0]) for _ in range(300)}
    assert seen == {0, 1}
    t, k, p = args(1, temp=1.0, p=0.01)
    assert {int(sample(logits, t, k, p, [g])[0]) for _ in range(50)} == {0}


def test_temperature_sampling_matches_softmax_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = (probs.log() * 2).unsqueeze(0)  # temperature 2 undoes the factor 2
    t, k, p = args(1, temp=2.0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.bincount(torch.cat([sample(logits, t, k, p, [g]) for _ in range(n)]), minlength=3)
    freq = counts.float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq
