"""Speculative decoding (llm_engine.spec_decode): the n-gram index against brute force, the acceptance rule,
the policy's back-off, the scheduler's use of leftovers only (budget, row cap, blocks; rejected slots released),
greedy equality with plain decoding on a tiny model (batches, chunked prefill, preemption, aborts mid-draft;
ties excused), and the sampled path's token distribution against the model's exact one (chi-square)."""

import math
import random

import pytest
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.attn_metadata import AttnMetadata
from llm_engine.block_manager import BlockManager
from llm_engine.kv_cache import allocate_kv_cache
from llm_engine.model_config import ModelConfig
from llm_engine.models import build_model
from llm_engine.models.weights import init_random_weights
from llm_engine.scheduler import Scheduler
from llm_engine.sequence import Sequence
from llm_engine.spec_decode import NgramIndex, SpecPolicy, accept

# ---------------------------------------------------------------- pure parts


def brute_propose(tokens, k, min_n, max_n):
    L = len(tokens)
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = tokens[L - n:]
        for end in range(L - 2, n - 2, -1):  # latest earlier occurrence that has a follower
            if tokens[end + 1 - n:end + 1] == suffix:
                return tokens[end + 1:min(end + 1 + k, L)]
    return []


@pytest.mark.parametrize("seed", range(5))
def test_ngram_index_matches_brute_force_as_tokens_grow(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 20])
    idx = NgramIndex(1 + seed % 2, 4)
    tokens: list[int] = []
    for _ in range(60):
        tokens += [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]  # grows by 1-3 tokens per step
        k = rng.randrange(1, 6)
        assert idx.propose(tokens, k) == brute_propose(tokens, k, idx.min_n, idx.max_n), tokens


def test_accept_rule():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # first mismatch: the target's token replaces the draft
    assert accept([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert accept([], [3]) == [3]
    with pytest.raises(ValueError, match="need 3 sampled"):
        accept([1, 2], [1])


def test_policy_backs_off_after_failures_and_respects_per_request_switch():
    pol = SpecPolicy(4, min_n=2, max_n=3, max_backoff_steps=8)
    s = Sequence("a", [1, 2, 3, 4, 1, 2], SamplingParams())
    assert pol.propose(s, 4) == [3, 4, 1, 2]
    pol.record(s, 4, 0)  # first failure: retry at once, with a shorter draft (accepted + 2)
    assert pol.propose(s, 4) == [3, 4]
    pol.record(s, 2, 0)  # second failure in a row: skip 3 steps
    assert [pol.propose(s, 4) for _ in range(4)] == [[], [], [], [3, 4]]
    for _ in range(5):
        pol.record(s, 2, 0)
    assert s.spec.skip == 7  # capped at max_backoff_steps - 1 skips
    pol.record(s, 2, 2)
    assert s.spec.fails == 0 and s.spec.max_next == 4
    assert pol.num_drafted == 4 + 2 + 6 * 2 and pol.num_accepted == 2
    off = Sequence("b", [1, 2, 3, 4, 1, 2], SamplingParams(speculate=False))
    assert pol.propose(off, 4) == []
    with pytest.raises(ValueError, match="speculate"):
        SamplingParams(speculate="yes")


# ---------------------------------------------------------------- scheduler (pure Python, fake model)

PATTERN = [11, 12, 13, 14, 15, 16, 17]


def make(num_blocks=64, block_size=4, budget=64, rows=32, max_num_seqs=8, k=4):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     max_waiting=64, max_model_len=512, spec=SpecPolicy(k), spec_max_rows=rows)


def fake_step(sch, right: bool):
    """A fake model that continues PATTERN (every draft right), or (right=False) rejects every draft."""
    batch = sch.schedule()
    sampled = []
    for i in range(len(batch)):
        if not batch.samples(i):
            sampled.append([])
            continue
        inp = batch.tokens_of(i)[-(1 + len(batch.drafts[i])):]
        truth = [PATTERN[(PATTERN.index(t) + 1) % len(PATTERN)] if t in PATTERN else PATTERN[0] for t in inp]
        if not right:
            truth = [98] + [99] * len(batch.drafts[i])  # 98, 99: never a draft (not in PATTERN)
        sampled.append(truth)
    return batch, sch.postprocess(batch, sampled)


def test_scheduler_drafts_from_leftovers_and_releases_rejected_slots():
    sch = make()
    a = Sequence("a", PATTERN * 2, SamplingParams(max_tokens=40), frozenset({-1}))
    sch.add(a)
    batch, new = fake_step(sch, True)  # the prompt repeats itself: its final prefill chunk carries drafts too
    assert batch.drafts[0] == PATTERN[:4] and batch.num_tokens == [14 + 4]
    assert new[0][1] == PATTERN[:5]  # 4 accepted drafts + the bonus token
    assert a.num_computed_tokens == len(a) - 1 and len(a.block_table) == sch.bm.blocks_for(len(a))
    batch, new = fake_step(sch, False)  # all drafts rejected: one token, the drafts' slots released
    assert batch.num_decodes == 1 and len(batch.drafts[0]) == 4 and len(new[0][1]) == 1
    assert a.num_computed_tokens == len(a) - 1 and len(a.block_table) == sch.bm.blocks_for(len(a))
    assert sch.bm.num_free_blocks == 64 - len(a.block_table)


def test_drafts_fit_free_slots_budget_and_row_cap():
    sch = make(num_blocks=2)  # 6 tokens in 2 blocks of 4, none free: only the 2 spare slots can take drafts
    s = Sequence("s", [11, 12, 13, 14, 11, 12], SamplingParams(max_tokens=2), frozenset({-1}))
    sch.add(s)
    batch, _ = fake_step(sch, False)
    assert batch.drafts[0] == [13] and sch.num_preemptions == 0  # max_tokens 2 allows one draft
    sch = make(num_blocks=3)
    s = Sequence("s", [11, 12, 13, 14, 11, 12], SamplingParams(max_tokens=6), frozenset({-1}))
    sch.add(s)
    sch.bm.allocate(Sequence("hog", [0] * 4, SamplingParams()))  # another sequence holds the third block
    batch, _ = fake_step(sch, False)
    assert batch.drafts[0] == [13, 14] and sch.num_preemptions == 0
    # budget 6 and a row cap of 5 over 3 decodes: at most 2 draft tokens in a pure decode step
    sch = make(budget=6, rows=5)
    for i in range(3):
        sch.add(Sequence(f"t{i}", PATTERN * 2, SamplingParams(max_tokens=30), frozenset({-1})))
    decode_steps = 0
    for _ in range(12):
        batch, _ = fake_step(sch, True)
        assert batch.total_tokens <= 6
        if len(batch) and batch.num_decodes == len(batch):
            decode_steps += 1
            assert batch.total_tokens <= 5
    assert decode_steps > 3
    # max_tokens: a step never drafts past what the request may still emit
    sch = make()
    s = Sequence("m", PATTERN * 2, SamplingParams(max_tokens=3), frozenset({-1}))
    sch.add(s)
    batch, new = fake_step(sch, True)
    assert len(batch.drafts[0]) == 2 and new[0][1] == PATTERN[:3]  # 2 drafts + the target's token = 3
    assert s.finish_reason == "length" and sch.bm.num_free_blocks == 64


def test_stop_token_inside_accepted_drafts_finishes_there():
    sch = make()
    s = Sequence("a", PATTERN * 2, SamplingParams(max_tokens=40), frozenset({PATTERN[2]}))
    sch.add(s)
    _, new = fake_step(sch, True)
    assert new[0][1] == PATTERN[:3] and s.finish_reason == "stop" and sch.bm.num_free_blocks == 64


# ---------------------------------------------------------------- tiny model, greedy equality


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    return init_random_weights(build_model(cfg), seed=0, std=0.1)  # small weights: the model repeats itself


def engine(model, k=4, **kw):
    base = dict(device="cpu", num_kv_blocks=96, kv_block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                speculative_tokens=k)
    return LLMEngine(EngineConfig(**(base | kw)), model=model)


def patterned_prompts(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pat = [rng.randrange(128) for _ in range(rng.randrange(2, 9))]
        out.append([rng.randrange(128) for _ in range(rng.randrange(0, 6))] + pat * rng.randrange(1, 4))
    return out


@torch.inference_mode()
def plain_logits(model, tokens):
    """The model's next-token logits after `tokens` (one prefill over a fresh cache)."""
    n, bs = len(tokens), 16
    nb = (n + bs - 1) // bs
    kv = allocate_kv_cache(model.config, nb, bs, torch.device("cpu"), torch.float32)
    meta = AttnMetadata(query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                        seq_lens=torch.tensor([n], dtype=torch.int32),
                        block_tables=torch.arange(nb, dtype=torch.int32)[None], slot_mapping=torch.arange(n),
                        max_query_len=n, max_seq_len=n, is_decode=n == 1, query_lens_cpu=[n], seq_lens_cpu=[n])
    h = model(torch.tensor(tokens), torch.arange(n), kv, meta)
    return model.compute_logits(h[-1:])[0]


def assert_same_or_tie(model, prompt, plain, spec, gap=1e-2):
    """spec == plain, except from a position where plain decoding's top-2 logit gap is below `gap`."""
    if spec == plain:
        return
    i = next((j for j, (x, y) in enumerate(zip(plain, spec, strict=False)) if x != y), min(len(plain), len(spec)))
    assert i < min(len(plain), len(spec)), f"same tokens, different lengths: {plain} vs {spec}"
    top2 = plain_logits(model, prompt + plain[:i]).topk(2).values
    assert float(top2[0] - top2[1]) < gap, f"diverged at {i} with a top-2 gap of {float(top2[0] - top2[1]):.4f}"


def test_greedy_speculative_equals_plain_over_random_batches(tiny):
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    for seed in range(3):
        prompts = patterned_prompts(8, seed)
        plain = [t for t, _ in engine(tiny, k=0).generate(prompts, greedy)]
        for kw in ({}, {"max_num_batched_tokens": 7}, {"num_kv_blocks": 40}, {"speculative_tokens": 2}):
            eng = engine(tiny, **kw)
            got = [t for t, _ in eng.generate(prompts, greedy)]
            for p, a, b in zip(prompts, plain, got, strict=True):
                assert_same_or_tie(tiny, p, a, b)
            st = eng.stats()
            assert st.spec_accepted_tokens > 0 and st.spec_draft_tokens > st.spec_accepted_tokens
            assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
            if "num_kv_blocks" in kw and seed == 0:
                assert eng.scheduler.num_preemptions > 0


def test_aborts_mid_draft_and_random_cycles_leak_nothing(tiny):
    eng = engine(tiny, num_kv_blocks=48, max_waiting=1000)
    rng = random.Random(3)
    live: list[str] = []
    aborted_mid_draft = 0
    for i in range(150):
        p = patterned_prompts(1, 1000 + i)[0]
        live.append(eng.add_request(f"r{i}", p, SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=True)))
        for _ in range(rng.randrange(0, 3)):
            batch = eng.scheduler.schedule()
            if not len(batch):
                continue
            sampled = eng.runner.run(batch)
            drafted = [s.request_id for s, d in zip(batch.seqs, batch.drafts, strict=True) if d]
            if drafted and rng.random() < 0.5:  # abort while its drafts are being verified
                eng.abort(rng.choice(drafted))
                aborted_mid_draft += 1
            for seq, toks in eng.scheduler.postprocess(batch, sampled):
                eng._emit(seq, toks)
            eng._pending.clear()
        live = [r for r in live if r in eng._seqs]
        if live and rng.random() < 0.3:
            eng.abort(rng.choice(live))
    while eng.has_unfinished():
        eng.step()
    assert aborted_mid_draft > 5
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in eng.block_manager.blocks)


# ---------------------------------------------------------------- sampled path: distribution


def chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Goodness of fit of observed counts to probabilities; cells with < 5 expected pooled into one."""
    stat, df, pool_o, pool_e = 0.0, -1, 0.0, 0.0
    for key, p in probs.items():
        e, o = n * p, counts.get(key, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    pool_o += sum(c for key, c in counts.items() if key not in probs)
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        df += 1
    return chi2_sf(stat, max(df, 1))


@pytest.fixture(scope="module")
def peaky():
    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    return init_random_weights(build_model(cfg), seed=0, std=0.3)  # larger weights: peaked next-token laws


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_speculation_preserves_the_distribution(peaky, temperature, top_p):
    """The prompt ends with 40 41 42, seen earlier followed by X: X is drafted for the first token (the final
    prefill chunk carries it). The (first, second) token pairs drawn with speculation must follow the model's
    exact joint law p(t1) p(t2 | t1) (chi-square, fixed seeds), and X must be accepted Binomial(n, p(X)) times."""
    from llm_engine.sampler import _mask_top_k_top_p

    def probs(tokens):
        x = (plain_logits(peaky, tokens) / temperature)[None]
        if top_p < 1:
            x = _mask_top_k_top_p(x, torch.zeros(1, dtype=torch.long), torch.tensor([top_p]), False, True)
        return torch.softmax(x[0], -1)

    x_tok = 82  # with this model p(82 | prompt) is 0.41 at temperature 1 and 0.62 at 0.7: accepts and rejects
    prompt = [3, 40, 41, 42, x_tok, 5, 9, 8, 40, 41, 42]
    p1 = probs(prompt)
    joint = {}
    for t1 in torch.nonzero(p1 > 1e-4).flatten().tolist():
        p2 = probs(prompt + [t1])
        for t2 in torch.nonzero(p2 > 1e-5).flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    n = 3000
    eng = engine(peaky, max_num_seqs=64, num_kv_blocks=64 * 5, max_num_batched_tokens=1024, max_waiting=n, seed=7)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=2, ignore_eos=True)
    pairs = [tuple(t) for t, _ in eng.generate([prompt] * n, params)]
    st = eng.stats()
    assert st.spec_verifies == n and st.spec_draft_tokens == n  # every request drafted X for its first token
    counts: dict = {}
    for pr in pairs:
        counts[pr] = counts.get(pr, 0) + 1
    assert chi2_pvalue(counts, joint, n) > 1e-3
    px = float(p1[x_tok])
    assert 0.05 < px < 0.95  # both branches (accept, reject) are exercised
    mean, sd = n * px, math.sqrt(n * px * (1 - px))
    assert abs(st.spec_accepted_tokens - mean) < 4 * sd
