"""AsyncLLMEngine with the real SmolLM2-135M: streaming, abort from another task, early exit, overload, errors."""

import asyncio
import gc

import pytest

from llm_engine import AsyncLLMEngine, EngineConfig, EngineOverloaded, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Describe a sunny day at the beach."}]


@pytest.fixture(scope="module")
def aeng():
    eng = AsyncLLMEngine(EngineConfig(device="cpu", max_num_seqs=1, max_waiting=1, kv_cache_memory_mib=64))
    yield eng
    eng.shutdown()


async def wait_all_blocks_free(aeng, timeout_s=30.0):
    """Poll (not a timing assertion): the engine thread frees blocks at its next loop iteration."""
    total = aeng.stats().total_blocks
    for _ in range(int(timeout_s / 0.01)):
        if aeng.stats().free_blocks == total and aeng.stats().running == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def test_stream_deltas_concatenate_to_final_text(aeng):
    async def main():
        outs = [o async for o in aeng.generate(SamplingParams(max_tokens=24), messages=MESSAGES)]
        return outs

    outs = asyncio.run(main())
    res = outs[-1].result
    assert outs[-1].finished and all(not o.finished for o in outs[:-1]) and res is not None
    assert "".join(o.text for o in outs) == res.text and len(res.text) > 20
    ids = [t for o in outs for t in o.token_ids]
    assert len(ids) == res.completion_tokens
    eos = set(aeng.tokenizer.eos_token_ids)
    assert aeng.tokenizer.decode([t for t in ids if t not in eos]) == res.text
    assert res.prompt_tokens > 10 and res.ttft_s > 0 and res.finish_reason in ("stop", "length")
    assert aeng.stats().finished_requests >= 1


def test_abort_from_another_task_ends_stream_and_frees_blocks(aeng):
    async def main():
        stream = aeng.generate(SamplingParams(max_tokens=300, ignore_eos=True), prompt="Once upon a time")
        seen = []

        async def consume():
            async for out in stream:
                seen.append(out)
                if len(seen) == 3:
                    await asyncio.sleep(0)  # let the aborting task run
            return seen[-1]

        async def aborter():
            while len(seen) < 3:
                await asyncio.sleep(0.005)
            aeng.abort(stream.request_id)

        last, _ = await asyncio.gather(consume(), aborter())
        return last, await wait_all_blocks_free(aeng)

    last, freed = asyncio.run(main())
    assert last.finished and last.result.finish_reason == "abort"
    assert 3 <= last.result.completion_tokens < 300
    assert freed


def test_breaking_out_of_async_for_frees_blocks(aeng):
    async def main():
        n = 0
        async for _ in aeng.generate(SamplingParams(max_tokens=300, ignore_eos=True), prompt="Count to one hundred:"):
            n += 1
            if n == 2:
                break
        gc.collect()
        freed = await wait_all_blocks_free(aeng)
        # aclose() and cancellation abort too
        s = aeng.generate(SamplingParams(max_tokens=300, ignore_eos=True), prompt="Hello")
        await s.__anext__()
        await s.aclose()
        freed2 = await wait_all_blocks_free(aeng)
        task = asyncio.create_task(_drain(aeng.generate(SamplingParams(max_tokens=300, ignore_eos=True),
                                                        prompt="Hi")))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return freed, freed2, await wait_all_blocks_free(aeng)

    assert asyncio.run(main()) == (True, True, True)


async def _drain(stream):
    async for _ in stream:
        pass


def test_engine_overloaded_surfaces_to_caller(aeng):
    async def main():
        long = aeng.generate(SamplingParams(max_tokens=300, ignore_eos=True), prompt="Tell me everything")
        await long.__anext__()  # running now (max_num_seqs=1)
        queued = aeng.generate(SamplingParams(max_tokens=2), prompt="queued")  # waits (max_waiting=1)
        with pytest.raises(EngineOverloaded, match=r"engine overloaded: 1 requests waiting \(max_waiting=1\)"):
            aeng.generate(SamplingParams(max_tokens=2), prompt="one too many")
        await long.aclose()
        outs = [o async for o in queued]
        return outs[-1].result, await wait_all_blocks_free(aeng)

    res, freed = asyncio.run(main())
    assert res.finish_reason in ("stop", "length") and freed


def test_step_error_ends_stream_with_error_and_loop_survives(aeng):
    runner = aeng.engine.runner
    real = runner.forward

    def boom(inp):
        runner.forward = real  # fail once
        raise RuntimeError("simulated device failure")

    async def main():
        runner.forward = boom
        bad = [o async for o in aeng.generate(SamplingParams(max_tokens=4), prompt="Hello")]
        good = [o async for o in aeng.generate(SamplingParams(max_tokens=4), prompt="Hello")]
        return bad[-1].result, good[-1].result

    bad, good = asyncio.run(main())
    assert bad.finish_reason == "error" and "simulated device failure" in bad.error
    assert good.finish_reason in ("stop", "length") and good.completion_tokens >= 1


def test_bad_request_raises_at_submit(aeng):
    async def main():
        with pytest.raises(ValueError, match="exactly one"):
            aeng.generate(SamplingParams(), prompt="a", messages=MESSAGES)
        with pytest.raises(ValueError, match="max_model_len"):
            aeng.generate(SamplingParams(max_tokens=100_000), prompt="a")

    asyncio.run(main())


def test_from_engine_and_stats_fields():
    eng = LLMEngine(EngineConfig(device="cpu", kv_cache_memory_mib=16))
    a = AsyncLLMEngine.from_engine(eng)
    try:
        async def main():
            return [o async for o in a.generate(SamplingParams(max_tokens=3, ignore_eos=True), prompt_token_ids=[1])]

        outs = asyncio.run(main())
        assert outs[-1].result.completion_tokens == 3
        st = a.stats()
        assert st.free_blocks == st.total_blocks and st.running == 0 and st.waiting == 0
        assert st.num_preemptions == 0 and st.prefix_hit_tokens >= 0 and st.decode_tok_s >= 0
    finally:
        a.shutdown()
