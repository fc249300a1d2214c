"""LLMEngine end to end: a tiny random-weight model for the bookkeeping-heavy cases (fast) and the real
embedded SmolLM2-135M for golden output, batching, prefix caching, chunking, preemption, stops and seeds."""

import random

import pytest
from tiny_llm import tiny_llama

from llm_engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
SYSTEM = ("You are the customer-service assistant of Maple Street Books. Opening hours: Monday to Friday 9 am to "
          "6 pm, Saturday 10 am to 4 pm, closed on Sunday. Answer in one short sentence.")
QUESTION = "When do you close on weekdays?"
# Greedy SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32) answer to SYSTEM + QUESTION; the same ids come out
# of transformers' LlamaForCausalLM with the same weights (bench/engine_cpu.py checks that).
GOLDEN_IDS = [57, 5248, 5587, 288, 4237, 346, 351, 750, 2029, 355, 8649, 30, 1423, 28, 339, 5248, 4112, 6370, 335,
              2605, 13680, 30, 2]
GOLDEN_TEXT = "I'm happy to assist you with any questions or requests. However, I'm currently closed on weekdays."


# ---------------------------------------------------------------- tiny random model

@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()


def tiny_engine(model, **kw):
    base = dict(device="cpu", num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    return LLMEngine(EngineConfig(**(base | kw)), model=model)


def tiny_prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def test_tiny_batch_chunked_preempted_all_equal_alone(tiny_model):
    prompts = tiny_prompts(6)
    eng = tiny_engine(tiny_model)
    alone = [eng.generate([p], GREEDY)[0][0] for p in prompts]
    assert [t for t, _ in eng.generate(prompts, GREEDY)] == alone
    small = tiny_engine(tiny_model, num_kv_blocks=14, max_num_batched_tokens=5)
    res = small.generate(prompts, GREEDY)
    assert [t for t, _ in res] == alone
    assert small.scheduler.num_preemptions > 0
    assert small.block_manager.num_free_blocks == 14


def test_step_counters_give_batch_size_and_step_time(tiny_model):
    eng = tiny_engine(tiny_model, max_num_batched_tokens=256)
    assert (eng.stats().steps, eng.stats().step_seqs, eng.stats().step_seconds) == (0, 0, 0.0)
    eng.generate(tiny_prompts(3, seed=5), GREEDY)  # one prefill step of 3 sequences, then 11 decode steps of 3
    st = eng.stats()
    assert st.steps == 12 and st.step_seqs == 36 and st.step_seconds > 0
    eng.step()  # nothing to run: not counted
    assert eng.stats().steps == 12


def test_tiny_1000_random_submit_abort_cycles_leak_nothing(tiny_model):
    eng = tiny_engine(tiny_model, num_kv_blocks=40, max_num_batched_tokens=16, max_waiting=1000)
    start = eng.block_manager.num_free_blocks
    rng = random.Random(1)
    live: list[str] = []
    finished = 0
    for i in range(1000):
        p = [rng.randrange(128) for _ in range(rng.randrange(1, 40))]
        live.append(eng.add_request(f"r{i}", p, SamplingParams(max_tokens=rng.randrange(1, 20), ignore_eos=True)))
        for _ in range(rng.randrange(0, 3)):
            for out in eng.step():
                if out.finished:
                    finished += 1
                    live.remove(out.request_id)
        if live and rng.random() < 0.5:
            eng.abort(rng.choice(live))
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finished += 1
    assert finished == 1000
    assert eng.block_manager.num_free_blocks == start
    assert all(b.ref_count == 0 for b in eng.block_manager.blocks)
    assert not eng.scheduler.running and not eng.scheduler.waiting


def test_runner_error_ends_batch_with_error_and_engine_survives(tiny_model):
    eng = tiny_engine(tiny_model)
    real = eng.runner.forward
    eng.runner.forward = lambda inp: (_ for _ in ()).throw(RuntimeError("boom"))
    eng.add_request("a", [1, 2, 3], GREEDY)
    outs = eng.step()
    assert outs[0].finished and outs[0].result.finish_reason == "error" and "boom" in outs[0].result.error
    assert eng.block_manager.num_free_blocks == 64 and not eng.has_unfinished()
    eng.runner.forward = real
    [(toks, res)] = eng.generate([[1, 2, 3]], GREEDY)
    assert len(toks) == 12 and res.finish_reason == "length"


def test_bad_requests_are_rejected_clearly(tiny_model):
    eng = tiny_engine(tiny_model)
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request(None, [1, 500], GREEDY)
    with pytest.raises(ValueError, match="max_model_len=256"):
        eng.add_request(None, [1] * 250, GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request(None, [], GREEDY)
    eng.add_request("dup", [1], GREEDY)
    with pytest.raises(ValueError, match="already in flight"):
        eng.add_request("dup", [1], GREEDY)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.add_request(None, [1], SamplingParams(stop=("x",)))


def test_engine_config_validates():
    with pytest.raises(ValueError, match="kv_block_size"):
        EngineConfig(kv_block_size=12)
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="max_waiting"):
        EngineConfig(max_waiting=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


# ---------------------------------------------------------------- real SmolLM2-135M

@pytest.fixture(scope="module")
def real():
    return LLMEngine(EngineConfig(device="cpu", max_num_seqs=8, kv_cache_memory_mib=64))


def engine_like(real, **kw):
    """Another engine (own KV pool and scheduler settings) over the already loaded weights."""
    return LLMEngine(EngineConfig(device="cpu", **({"kv_cache_memory_mib": 64} | kw)), model=real.model,
                     tokenizer=real.tokenizer)


def chat_ids(real, question, system=SYSTEM):
    return real.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                               {"role": "user", "content": question}])


QUESTIONS = ["What is the capital of France?", "Name three colors.", "How many legs does a spider have?",
             "What is 12 plus 7?"]


@pytest.mark.slow
def test_golden_customer_service_answer(real):
    [(toks, res)] = real.generate([chat_ids(real, QUESTION)], SamplingParams(max_tokens=32))
    assert toks == GOLDEN_IDS
    assert res.text == GOLDEN_TEXT and res.finish_reason == "stop"  # stopped on <|im_end|>, not emitted
    assert res.completion_tokens == len(GOLDEN_IDS) and res.ttft_s > 0


@pytest.mark.slow
def test_batch_equals_alone_and_chunked_and_preempted(real):
    prompts = [chat_ids(real, q, "You are a helpful assistant.") for q in QUESTIONS]
    alone = [real.generate([p], GREEDY)[0][0] for p in prompts]
    assert [t for t, _ in real.generate(prompts, GREEDY)] == alone
    chunked = engine_like(real, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert [t for t, _ in chunked.generate(prompts, GREEDY)] == alone
    # 4 prompts of ~35 tokens + 12 generated need 12+ blocks of 16: a 7-block pool forces preemption.
    tiny_pool = engine_like(real, num_kv_blocks=7, max_num_seqs=4)
    assert [t for t, _ in tiny_pool.generate(prompts, GREEDY)] == alone
    assert tiny_pool.scheduler.num_preemptions > 0 and tiny_pool.block_manager.num_free_blocks == 7


@pytest.mark.slow
def test_prefix_cache_hit_skips_prefill_and_gives_identical_output(real):
    eng = engine_like(real, max_num_seqs=4)
    first = chat_ids(real, "Do you sell used books?")
    second = chat_ids(real, "Can I order a book by phone?")  # shares the system prompt
    [(t1, r1)] = eng.generate([first], GREEDY)
    assert r1.cached_tokens == 0
    # The same conversation again: everything but the last partial block is served from the cache.
    eng.add_request("again", first, GREEDY)
    batch = eng.scheduler.schedule()
    assert batch.num_tokens[0] == len(first) - batch.seqs[0].num_cached_tokens < 16
    sampled = eng.runner.run(batch)
    eng.scheduler.postprocess(batch, sampled)
    toks = [batch.seqs[0].token_ids[-1]]
    while eng.has_unfinished():
        for out in eng.step():
            toks += out.token_ids
            if out.finished:
                again = out.result
    assert toks == t1 and again.cached_tokens >= len(first) - 16
    [(t2, r2)] = eng.generate([second], GREEDY)
    assert r2.cached_tokens >= 32 and eng.stats().prefix_hit_tokens >= again.cached_tokens + r2.cached_tokens
    cold = engine_like(real, enable_prefix_caching=False)
    assert cold.generate([second], GREEDY)[0][0] == t2


@pytest.mark.slow
def test_abort_mid_decode_frees_every_block_and_short_random_cycles(real):
    eng = engine_like(real, max_num_seqs=4, num_kv_blocks=64)
    start = eng.block_manager.num_free_blocks
    rid = eng.add_request(None, chat_ids(real, "Tell me a long story."), SamplingParams(max_tokens=200))
    got = 0
    while got < 3:
        got += sum(len(o.token_ids) for o in eng.step())
    assert eng.block_manager.num_free_blocks < start
    assert eng.abort(rid) and not eng.abort(rid)
    assert eng.block_manager.num_free_blocks == start
    [out] = eng.step()
    assert out.finished and out.result.finish_reason == "abort" and out.result.completion_tokens == got
    rng = random.Random(0)
    live = []
    for _ in range(20):
        live.append(eng.add_request(None, real.tokenizer.encode(rng.choice(QUESTIONS)),
                                    SamplingParams(max_tokens=rng.randrange(1, 6))))
        for out in eng.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        if live and rng.random() < 0.5:
            eng.abort(live.pop(rng.randrange(len(live))))
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_free_blocks == start


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(real):
    p = chat_ids(real, "Write a haiku about rain.", "You are a poet.")
    sp = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=10, seed=1234, ignore_eos=True)
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=10, seed=99, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = real.generate([p], sp)[0][0]
    # same seed again, now batched beside an unseeded and a differently seeded request: same tokens
    b, c, _ = (t for t, _ in real.generate([p, p, p], [sp, other_seed, unseeded]))
    assert a == b and a != c


@pytest.mark.slow
def test_stop_strings_cut_before_the_match(real):
    p = chat_ids(real, QUESTION)
    stops = ["questions", "I'm currently", ".", "closed"]  # multi-token stop strings span several deltas
    rids = [real.add_request(None, p, SamplingParams(max_tokens=32, stop=(s, "no-such-text"))) for s in stops]
    text = dict.fromkeys(rids, "")
    final = {}
    while real.has_unfinished():
        for out in real.step():
            text[out.request_id] += out.text
            if out.finished:
                final[out.request_id] = out.result
    for rid, stop in zip(rids, stops, strict=True):
        cut = GOLDEN_TEXT[:GOLDEN_TEXT.index(stop)]
        assert final[rid].finish_reason == "stop" and final[rid].text == cut
        assert text[rid] == cut  # the streamed deltas hold back a possible stop-string prefix, never leak it


@pytest.mark.slow
def test_multi_turn_resend_prefills_only_new_tokens(real):
    eng = engine_like(real, max_num_seqs=2)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    turn1 = real.tokenizer.apply_chat_template(history)
    [(reply, r1)] = eng.generate([turn1], SamplingParams(max_tokens=32))
    history += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And on Saturday?"}]
    turn2 = real.tokenizer.apply_chat_template(history)
    assert turn2[:len(turn1)] == turn1
    [(_, r2)] = eng.generate([turn2], SamplingParams(max_tokens=4))
    # every full block of turn 1's prompt AND of the generated reply (its KV was cached while decoding) is
    # reused, since the re-sent conversation tokenizes to the same ids: only the new tail is prefilled
    assert turn2[:len(turn1) + len(reply)] == turn1 + reply
    assert r2.cached_tokens == (len(turn1) + len(reply)) // 16 * 16 > len(turn1)


def test_llm_engine_imports_without_voicefast_or_audio():
    import subprocess
    import sys

    code = ("import sys; sys.modules['voicefast'] = None; sys.modules['audio'] = None\n"
            "sys.modules['model_assets'] = None\n"
            "import llm_engine, llm_engine.engine, llm_engine.async_engine, llm_engine.cli, llm_engine.grammar_mask\n"
            "import llm_engine.tool_format, llm_engine.tool_parser\n"
            "from llm_engine import EngineConfig, LLMEngine, AsyncLLMEngine, StreamOutput, RequestResult\n"
            "try:\n    EngineConfig().model_path()\nexcept ValueError as e:\n    assert 'model_assets' in str(e)\n"
            "else:\n    raise SystemExit('expected ValueError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_slow_step_is_logged_with_what_it_held(tiny_model, caplog):
    """slow_step_ms: a step over it is logged (prefills, tokens, decodes, where the time went), at most once a
    second; the others are counted into the next report. 0 turns it off; CPU engines default to off."""
    import logging

    eng = tiny_engine(tiny_model, slow_step_ms=1e-6)
    assert tiny_engine(tiny_model)._slow_step_s == 0.0
    with caplog.at_level(logging.WARNING, logger="llm_engine"):
        eng.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
    slow = [r.getMessage() for r in caplog.records if "slow engine step" in r.getMessage()]
    assert len(slow) == 1, slow  # 4 steps in well under a second: one report
    assert "1 prefill seq(s), 5 prefill tokens, 0 decode seq(s)" in slow[0]
    assert eng._slow_unlogged == 3
    with pytest.raises(ValueError, match="slow_step_ms"):
        EngineConfig(slow_step_ms=-1)
