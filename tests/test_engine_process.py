"""ProcessLLMEngine (the engine in its own spawned process) against AsyncLLMEngine (the engine on a thread), both
on the same random-weight llama with SmolLM2's real tokenizer: identical greedy outputs (text, messages, tools and a
grammar), abort, synchronous EngineOverloaded / ValueError, the child's death, start-up errors and a clean
shutdown. max_num_seqs=1: on CPU the fp16 GEMV's rounding depends on a step's rows, so only one sequence per step
makes the outputs independent of how the two processes' timing batches the requests. Requests that a test stops
(abort, kill, shutdown) ask for LONG tokens: they cannot finish before the test's reaction, however slow the host."""

import asyncio
import json
import multiprocessing
import os
import signal
import threading

import pytest

from llm_engine import AsyncLLMEngine, EngineConfig, EngineOverloaded, Grammar, SamplingParams
from llm_engine.engine_process import ProcessLLMEngine
from llm_engine.model_config import ModelConfig
from llm_engine.parallel import RandomCheckpoint
from llm_engine.tool_format import Tool

MC = ModelConfig(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is the weather?"}]
LONG = 4000
WEATHER = Tool.make("get_weather", "The weather in a city", {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]})


def config(**kw) -> EngineConfig:
    from model_assets import resolve_llm  # the embedded SmolLM2 GGUF: its tokenizer, not its weights

    ckpt = RandomCheckpoint(MC, seed=3, std=0.5, tokenizer=str(resolve_llm().path))
    return EngineConfig(**({"model": ckpt, "device": "cpu", "max_num_seqs": 1, "max_waiting": 3,
                            "kv_cache_memory_mib": 16} | kw))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def engines():
    pe = ProcessLLMEngine(config())
    ae = AsyncLLMEngine(config())
    yield pe, ae
    pe.shutdown()
    ae.shutdown()


async def collect(stream) -> list:
    return [o async for o in stream]


async def wait_idle(eng, limit: int = 3000) -> bool:
    """Poll (not a timing assertion) until the engine reports every block free and nothing running."""
    for _ in range(limit):
        st = eng.stats()
        if st.free_blocks == st.total_blocks and st.running == 0 and st.waiting == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def summary(outs: list) -> tuple:
    r = outs[-1].result
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.text for o in outs) == r.text
    return [t for o in outs for t in o.token_ids], r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens


def test_concurrent_greedy_outputs_match_the_thread_engine(engines):
    tool_grammar = engines[0].tool_dialect.grammar([WEATHER], choice="get_weather", max_tokens=40)

    async def run(eng):
        return await asyncio.gather(
            collect(eng.generate(SamplingParams(max_tokens=12, ignore_eos=True), prompt="Once upon a time")),
            collect(eng.generate(SamplingParams(max_tokens=12), messages=MESSAGES)),
            collect(eng.generate(SamplingParams(max_tokens=8, ignore_eos=True), prompt_token_ids=[5, 6, 7, 8])),
            collect(eng.generate(SamplingParams(max_tokens=60, grammar=tool_grammar), messages=MESSAGES,
                                 tools=[WEATHER])))

    pe, ae = engines
    got = [summary(o) for o in asyncio.run(run(pe))]
    want = [summary(o) for o in asyncio.run(run(ae))]
    assert got == want
    assert got[0][2] == "length" and got[0][4] == 12 and got[2][4] == 8
    call = got[3][1]  # the grammar forced a complete call of the tool
    prefix, suffix = pe.tool_dialect.call_prefix(WEATHER), pe.tool_dialect.call_suffix()
    assert call.startswith(prefix) and call.endswith(suffix) and got[3][2] == "stop"
    assert json.loads(call[len(prefix):-len(suffix)])["city"] in ("Paris", "Rome")
    assert pe.stats().finished_requests == ae.stats().finished_requests == 4
    assert pe.engine.max_model_len == 4096 and pe.engine.device == "cpu"
    assert pe.tool_dialect.name == ae.tool_dialect.name


def test_abort_and_early_exit_end_streams_and_free_blocks(engines):
    pe, _ = engines

    async def main():
        stream = pe.generate(SamplingParams(max_tokens=LONG, ignore_eos=True), prompt="Count:")
        seen = []
        async for out in stream:
            seen.append(out)
            if len(seen) == 3:
                pe.abort(stream.request_id)
        n = 0
        async for _ in pe.generate(SamplingParams(max_tokens=LONG, ignore_eos=True), prompt="Again:"):
            n += 1
            if n == 2:
                break  # leaving the loop drops the stream: it aborts the request
        return seen, await wait_idle(pe)

    seen, idle = asyncio.run(main())
    assert seen[-1].finished and seen[-1].result.finish_reason == "abort"
    assert 3 <= seen[-1].result.completion_tokens < LONG
    assert idle


def test_overload_and_bad_requests_raise_at_submit(engines):
    pe, _ = engines

    async def main():
        streams, overloaded = [], None
        for _ in range(1 + 3 + 3):  # one running + max_waiting waiting: one of these must be refused
            try:
                streams.append(pe.generate(SamplingParams(max_tokens=LONG, ignore_eos=True), prompt="Go"))
            except EngineOverloaded as e:
                overloaded = e
                break
        errors = []
        for kw in ({"prompt_token_ids": [1, 49152]}, {"prompt_token_ids": [1] * 4000},
                   {"prompt_token_ids": []}, {"prompt": "a", "messages": MESSAGES},
                   {"prompt": "a", "params": SamplingParams(grammar=Grammar(lark="start: ???"))}):
            with pytest.raises(ValueError) as ei:
                pe.generate(kw.pop("params", None), **kw)
            errors.append(str(ei.value))
        for s in streams:
            await s.aclose()
        return overloaded, errors, await wait_idle(pe)

    overloaded, errors, idle = asyncio.run(main())
    assert overloaded is not None and "max_waiting=3" in str(overloaded)
    assert "out of range" in errors[0] and "max_model_len=4096" in errors[1] and "empty prompt" in errors[2]
    assert "exactly one" in errors[3] and "grammar" in errors[4]
    assert idle


@pytest.mark.skipif(_has_cuda(), reason="needs a host without CUDA (device='cuda' must fail in the child)")
def test_startup_error_raises_the_childs_message():
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="CUDA is not available") as ei:
        ProcessLLMEngine(config(device="cuda"))
    assert "in the engine process" in "".join(getattr(ei.value, "__notes__", []))
    assert set(multiprocessing.active_children()) <= before


def test_killed_child_ends_streams_with_an_error_then_generate_raises():
    threads = threading.active_count()
    pe = ProcessLLMEngine(config())
    assert threading.active_count() == threads + 1  # the reader

    async def main():
        stream = pe.generate(SamplingParams(max_tokens=LONG, ignore_eos=True), prompt="Long story:")
        outs = []
        async for out in stream:
            if not outs:
                os.kill(pe.pid, signal.SIGKILL)
            outs.append(out)
        with pytest.raises(RuntimeError, match="signal 9"):
            pe.generate(None, prompt="after")
        return outs

    assert pe.error is None
    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].result.finish_reason == "error"
    assert "killed by signal 9" in outs[-1].result.error
    assert "signal 9" in pe.error  # what /readyz reports (voicefast.readiness: engine_failed)
    with pytest.raises(RuntimeError, match="signal 9"):
        pe.warm_up()
    pe.shutdown()
    assert pe._proc.exitcode == -signal.SIGKILL and threading.active_count() == threads


def test_shutdown_aborts_open_streams_and_leaves_nothing():
    threads = threading.active_count()
    pe = ProcessLLMEngine(config())
    assert pe.warm_up() is None  # off CUDA the warm-up is a no-op, run in the child
    pe.engine.grammar_compiler()  # built here and in the child

    async def main():
        stream = pe.generate(SamplingParams(max_tokens=LONG, ignore_eos=True), prompt="Story:")
        outs = [await stream.__anext__()]
        await asyncio.to_thread(pe.shutdown)
        outs += [o async for o in stream]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].result.finish_reason == "abort"
    assert pe._proc.exitcode == 0 and not pe._proc.is_alive() and threading.active_count() == threads
    with pytest.raises(RuntimeError, match="shut down"):
        pe.generate(None, prompt="late")
    pe.shutdown()  # idempotent


@pytest.mark.slow
def test_the_real_server_with_the_engine_in_its_own_process():
    """The embedded stack served with engine_process=True: a forced tool call (a grammar through the pipe) through
    the official SDK, a spoken-style answer, the engine idle after, and its process gone with the server."""
    from openai import AsyncOpenAI
    from real_server import running_real_server

    from voicefast.config import ServerConfig

    tool = {"type": "function", "name": "check_order_status", "description": "Look up an order by its number",
            "parameters": {"type": "object", "properties": {"order_number": {"type": "string"}},
                           "required": ["order_number"]}}

    async def talk(port: int) -> tuple:
        client = AsyncOpenAI(api_key="local", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        async with client.realtime.connect(model="voicefast") as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [tool],
                                               "audio": {"input": {"turn_detection": None}}})
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Where is my order A1234?"}]})
            await conn.response.create(response={"tool_choice": {"type": "function", "name": "check_order_status"},
                                                 "temperature": 0})
            dones = []
            async with asyncio.timeout(120):
                async for ev in conn:
                    assert ev.type != "error", ev
                    if ev.type == "response.done":
                        dones.append(ev.response)
                        if len(dones) == 1:
                            call = next(o for o in ev.response.output if o.type == "function_call")
                            await conn.conversation.item.create(item={
                                "type": "function_call_output", "call_id": call.call_id,
                                "output": json.dumps({"status": "shipped", "arrives": "Friday"})})
                            await conn.response.create(response={"temperature": 0})
                        else:
                            break
            return call, dones

    opts = ServerConfig(host="127.0.0.1", port=0, max_output_tokens=24, torch_threads=2, asr_cpu_threads=1,
                        engine_process=True)
    with running_real_server(opts, "real-server-engine-process") as (server, stack, _):
        assert isinstance(stack.engine, ProcessLLMEngine) and "own process" in stack.description["llm"]
        call, dones = asyncio.run(talk(server.port))
        assert call.name == "check_order_status" and "order_number" in json.loads(call.arguments)
        assert dones[0].status == "completed" and dones[1].status in ("completed", "incomplete")
        answer = next(o for o in dones[1].output if o.type == "message").content[0].text
        assert answer.strip()
        assert asyncio.run(wait_idle(stack.engine))
        proc = stack.engine._proc
    assert not proc.is_alive() and proc.exitcode == 0
