"""The engine warm-up (llm_engine.warm_up): the request plan as a pure function (classes covered, limits kept), and
the plan driven through the real CPU LLMEngine with a tiny random model: every class reaches the step path, and
nothing is left behind (requests, KV blocks, prefix-cache entries, counters, the sampler's RNG)."""

import random
import threading
from collections import Counter

import pytest
import torch
from tiny_llm import tiny_llama

from llm_engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from llm_engine.model_config import ModelConfig
from llm_engine.models import build_model
from llm_engine.models.weights import init_random_weights
from llm_engine.warm_up import MAX_TOKENS, ladder_lengths, run_warm_up, warm_up_plan

GPU_LIKE = dict(vocab_size=49152, max_num_seqs=64, max_model_len=4096, block_size=16)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()


def tiny_engine(model, **kw):
    base = dict(device="cpu", num_kv_blocks=512, kv_block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                speculative_tokens=2)
    return LLMEngine(EngineConfig(**(base | kw)), model=model)


def test_plan_covers_the_specialization_classes():
    plan = warm_up_plan(**GPU_LIKE, max_num_batched_tokens=512, avoid_token_ids={2})
    bs = GPU_LIKE["block_size"]
    singles = {len(r.prompt_token_ids) for r in plan if r.label.startswith("single")}
    assert {1, 2, 3, 5, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 511, 512, 513} <= singles
    assert max(singles) > 2 * 512  # a prompt chunked over three steps
    # several sequences arriving together, at every group size, with mixed lengths
    at_once = Counter(r.arrival_step for r in plan)

    def lengths(step):
        return {len(r.prompt_token_ids) for r in plan if r.arrival_step == step}
    for g in (2, 3, 5, 8, 17, 64):
        assert any(n == g and len(lengths(s)) > 1 for s, n in at_once.items()), g
        assert any(n == g and lengths(s) == {1} for s, n in at_once.items()) or g in (3, 8)  # one-token groups
    # prefix-cache hits: requests sharing a >= 1-block prefix with an earlier one, and different suffix lengths
    prefixed = [r for r in plan if r.label.startswith("prefix")]
    head = prefixed[0].prompt_token_ids[:bs]
    assert all(r.prompt_token_ids[:bs] == head for r in prefixed)
    assert len({len(r.prompt_token_ids) for r in prefixed}) >= 5
    # duplicated prompts n = 1 (mod bs): the duplicate computes its last token alone
    dups = [r for r in plan if r.label.endswith("duplicate")]
    assert [len(r.prompt_token_ids) for r in dups] == ladder_lengths(4096 - MAX_TOKENS, bs)
    assert all(len(r.prompt_token_ids) % bs == 1 for r in dups)
    assert all(any(o.prompt_token_ids == r.prompt_token_ids and o.arrival_step < r.arrival_step for o in plan)
               for r in dups)
    # requests that arrive while earlier ones of their phase still decode (mixed prefill + decode steps)
    mixed = [r for r in plan if r.label.startswith("mixed")]
    assert len({r.arrival_step for r in mixed}) == 3
    # sampling classes, no grammar, short completions that ignore eos
    params = [r.params for r in plan]
    assert any(p.greedy for p in params)
    assert any(p.temperature == 0.3 and p.top_p == 0.9 for p in params)
    assert any(p.temperature > 0 and p.top_k > 0 for p in params)
    assert any(p.temperature > 0 and p.top_k == 0 and p.top_p == 1.0 and p.seed is None for p in params)
    assert any(p.seed is not None and p.temperature > 0 for p in params)
    assert all(p.grammar is None and p.ignore_eos and 2 <= p.max_tokens <= 4 for p in params)


@pytest.mark.parametrize("cfg", [
    dict(GPU_LIKE, max_num_batched_tokens=512),
    dict(vocab_size=128, max_num_seqs=8, max_model_len=256, block_size=4, max_num_batched_tokens=64,
         num_kv_blocks=64),
    dict(vocab_size=50, max_num_seqs=3, max_model_len=40, block_size=8, max_num_batched_tokens=16,
         num_kv_blocks=6),
    dict(vocab_size=151552, max_num_seqs=16, max_model_len=32768, block_size=32, max_num_batched_tokens=2048),
])
def test_plan_stays_within_the_limits(cfg):
    avoid = {0, 1, 2}
    plan = warm_up_plan(**cfg, avoid_token_ids=avoid)
    assert plan and plan == warm_up_plan(**cfg, avoid_token_ids=avoid)  # deterministic
    blocks = cfg.get("num_kv_blocks")
    for r in plan:
        n = len(r.prompt_token_ids)
        assert n >= 1 and n + r.params.max_tokens <= cfg["max_model_len"], r.label
        if blocks is not None:
            assert -(-(n + r.params.max_tokens) // cfg["block_size"]) <= blocks, r.label
        assert all(0 <= t < cfg["vocab_size"] and t not in avoid for t in r.prompt_token_ids)
    assert max(Counter(r.arrival_step for r in plan).values()) <= cfg["max_num_seqs"]
    assert [r.arrival_step for r in plan] == sorted(r.arrival_step for r in plan)
    if blocks is not None:  # what arrives at one step fits the pool at once
        per_step = Counter()
        for r in plan:
            per_step[r.arrival_step] += -(-(len(r.prompt_token_ids) + MAX_TOKENS) // cfg["block_size"])
        assert max(per_step.values()) <= blocks


def test_warm_up_is_a_no_op_on_cpu(tiny_model):
    eng = tiny_engine(tiny_model)
    assert eng.warm_up() is None
    assert eng.stats().steps == 0 and eng.block_manager.prefix_hit_tokens == 0


def _batches(eng):
    """Spy on the runner: per step, (num_decodes, [(start, num_tokens, prompt_len, cached, drafts, temperature)])."""
    seen, run = [], eng.runner.run

    def spy(batch):
        seen.append((batch.num_decodes, [(s.num_computed_tokens, n, s.num_prompt_tokens, s.num_cached_tokens,
                                          len(d), s.params.temperature)
                                         for s, n, d in zip(batch.seqs, batch.num_tokens, batch.drafts, strict=True)]))
        return run(batch)
    eng.runner.run = spy
    return seen


def test_forced_warm_up_runs_every_class_and_leaves_nothing_behind(tiny_model):
    # a pool that holds the warm-up's cached blocks beside the earlier ones (a smaller one evicts the oldest, LRU)
    eng, fresh = tiny_engine(tiny_model, num_kv_blocks=2048), tiny_engine(tiny_model, num_kv_blocks=2048)
    before_prompt = list(range(3, 40))
    eng.generate([before_prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    fresh.generate([before_prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    stats0, cached0 = eng.stats(), dict(eng.block_manager.hash_to_block)
    seen = _batches(eng)
    report = eng.warm_up(force=True)
    budget = eng.config.max_num_batched_tokens
    plan = warm_up_plan(128, 8, eng.max_model_len, 4, max_num_batched_tokens=budget, num_kv_blocks=2048,
                        avoid_token_ids=eng.eos_token_ids)
    assert report.requests == len(plan) and report.errors == 0 and report.steps == len(seen) > 0
    # every class reached the step path
    rows = [r for _, b in seen for r in b]
    assert any(len(b) >= 8 and all(r[0] == 0 and r[1] > 0 for r in b) for _, b in seen)  # 8 prefills in one step
    assert any(nd > 0 and any(r[1] > 1 and r[4] == 0 for r in b[nd:]) for nd, b in seen)  # prefill beside decodes
    assert any(r[3] > 0 and r[0] == r[3] and r[1] > 1 for r in rows)  # a chunk after a prefix-cache hit
    assert any(r[3] > 0 and r[0] == r[2] - 1 and r[1] == 1 for r in rows)  # a duplicate's last token alone
    assert any(r[0] == 0 and r[1] == budget and r[2] > budget for r in rows)  # a chunked prompt
    assert any(nd == 0 and all(r[1] == 1 and r[0] == 0 for r in b) and len(b) > 1 for nd, b in seen)  # 1-token
    assert any(r[4] > 0 for r in rows)  # speculative drafts
    assert any(r[5] > 0 and r[0] + r[1] == r[2] for r in rows)  # a sampled prefill
    # and nothing remains
    assert not eng.has_unfinished() and not eng.scheduler.running and not eng.scheduler.waiting
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert eng.block_manager.hash_to_block == cached0
    assert eng.stats() == stats0
    # the next requests run as on an engine that never warmed up (the sampler's RNG included)
    eng.runner.run = type(eng.runner).run.__get__(eng.runner)
    prompts = [before_prompt[:20] + [90, 91], [5, 6, 7]]
    sp = [SamplingParams(max_tokens=6, temperature=0.9, ignore_eos=True), SamplingParams(max_tokens=6)]
    assert [t for t, _ in eng.generate(prompts, sp)] == [t for t, _ in fresh.generate(prompts, sp)]
    assert eng.stats().prefix_hit_tokens == fresh.stats().prefix_hit_tokens > 0


def test_warm_up_refuses_a_busy_engine_and_loses_nothing(tiny_model):
    eng = tiny_engine(tiny_model)
    rid = eng.add_request(None, [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    with pytest.raises(RuntimeError, match="idle"):
        run_warm_up(eng, warm_up_plan(128, 8, 256, 4))
    outs = [o for _ in range(5) for o in eng.step()]
    assert any(o.request_id == rid and o.finished and o.result.completion_tokens == 2 for o in outs)


def test_async_engine_runs_the_warm_up_on_the_engine_thread(tiny_model):
    aeng = AsyncLLMEngine.from_engine(tiny_engine(tiny_model))
    try:
        assert aeng.warm_up() is None  # CPU: a no-op
        threads = []

        def forced():
            threads.append(threading.current_thread().name)
            return aeng.engine.__class__.warm_up(aeng.engine, force=True)
        aeng.engine.warm_up = forced
        report = aeng.warm_up()
        assert threads == ["llm-engine"] and report.requests > 0 and report.errors == 0
        assert aeng.stats().steps == 0 and aeng.stats().free_blocks == aeng.stats().total_blocks
    finally:
        aeng.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_requests_after_the_warm_up_compile_no_kernel(tmp_path, monkeypatch):
    """On the GPU (bench/gpu_suite.py's pytest stage, or by hand): after warm_up(), requests of lengths, groups,
    prefix hits and sampling settings the plan never used compile no Triton kernel variant (a fresh
    TRITON_CACHE_DIR stays empty: variants compiled in this process come from the in-memory cache)."""
    cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
    model = init_random_weights(build_model(cfg, "cpu", torch.float32), seed=0).to("cuda", torch.bfloat16)
    model.cos_sin = model.cos_sin.float()
    eng = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=16, num_kv_blocks=1024,
                                 max_model_len=1024), model=model)
    stats0 = eng.stats()
    report = eng.warm_up()
    assert report is not None and report.errors == 0 and report.steps > 0
    assert eng.stats() == stats0 and eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    rng = random.Random(5)

    def prompt(n):
        return [rng.randrange(3, 512) for _ in range(n)]
    sampled = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=6, ignore_eos=True)
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    long = prompt(333)
    for p in (prompt(21), prompt(77), long, prompt(600), prompt(10)):
        eng.generate([p], sampled)
    eng.generate([prompt(n) for n in (5, 12, 40, 90, 3, 61)], [sampled, greedy] * 3)
    eng.generate([long[:320] + prompt(14), long[:320] + prompt(27)], sampled)
    compiled = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*.json")
                      if not p.name.startswith("__grp__"))
    assert compiled == []
