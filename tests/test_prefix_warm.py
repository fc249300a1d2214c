"""voicefast/prefix_warm.py: while a caller speaks, the reply's likely prompt is prefilled in idle engine time.
The warmer's rules against a fake engine, the session's glue (which prompt, when not), and against the real
SmolLM2 engine that a warm with a partial transcript makes the reply's prompt hit the prefix cache."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fakes import FakeASR, FakeEngine, FakeSamplingParams, FakeStats, speech_like
from test_session import Harness
from test_session_turns import until

from voicefast.config import ServerConfig
from voicefast.prefix_warm import PrefixWarmer
from voicefast.session_config import TurnDetection

WARM = ServerConfig(output_lead_ms=100, asr_partial_interval_ms=200, llm_prefix_warm=True)
MSGS = [{"role": "system", "content": "You are a shop assistant."}, {"role": "user", "content": "What time do"}]


def _warmer(engine):
    tasks = []

    def spawn(coro, name):
        t = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.append(t)
        return t
    return PrefixWarmer(engine, FakeSamplingParams, spawn), tasks


def test_a_warm_is_one_greedy_token_and_one_at_a_time():
    async def main():
        eng = FakeEngine(ttft_s=0.05)
        w, tasks = _warmer(eng)
        assert w.warm(MSGS, {}) is True
        rid, msgs = eng.requests[-1]
        params, tools = eng.params[rid]
        assert msgs == MSGS and params.max_tokens == 1 and params.temperature == 0.0 and tools is None
        assert w.in_flight and w.warm(MSGS[:1] + [{"role": "user", "content": "What time do you"}]) is False
        await asyncio.gather(*tasks)
        assert not w.in_flight
        assert w.warm(MSGS, {}) is False  # the same prompt again: nothing new to compute
        assert w.warm(MSGS[:1] + [{"role": "user", "content": "What time do you"}], {"tools": []}) is True
        assert eng.params[eng.requests[-1][0]][1] == []  # generate kwargs (tools=) pass through
        await asyncio.gather(*tasks)
        return w, eng
    w, eng = asyncio.run(main())
    assert w.sent == 2 and len(eng.requests) == 2


def test_no_warm_while_the_engine_is_busy_or_refuses():
    class Busy(FakeEngine):
        def stats(self):
            return FakeStats(1, 0, 0, 256, 0, 0.0)

    class Refuses(FakeEngine):
        def generate(self, *a, **kw):
            raise ValueError("prompt too long")

    async def main():
        w, _ = _warmer(Busy())
        assert w.warm(MSGS) is False and w.skipped_busy == 1 and w.sent == 0
        w2, _ = _warmer(Refuses())
        assert w2.warm(MSGS) is False and w2.sent == 0  # no exception reaches the session
    asyncio.run(main())


def test_cancel_ends_the_warm_and_frees_its_request():
    """Cancelling the drain task closes the stream (the real RequestStream then aborts the engine request:
    tests/test_async_engine.py); the fake engine frees the request's blocks when its stream closes."""
    async def main():
        eng = FakeEngine(ttft_s=5.0)
        w, tasks = _warmer(eng)
        w.warm(MSGS)
        await asyncio.sleep(0.01)
        assert eng.stats().running == 1
        w.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return w, eng
    w, eng = asyncio.run(main())
    assert not w.in_flight and tasks_cancelled(w) and eng.stats().running == 0


def tasks_cancelled(w) -> bool:
    return w._task is not None and w._task.cancelled()


async def _speak(h, ms: int) -> None:
    """Real-time-ish: 100 ms of speech at a time, the loop running between (partials and warms get their turn)."""
    x = speech_like(ms)
    step = 2400  # 100 ms at 24 kHz
    for i in range(0, len(x), step):
        h.audio(x[i:i + step])
        await asyncio.sleep(0.03)


def _warms(h) -> list[tuple[str, list[dict]]]:
    return [(rid, m) for rid, m in h.stack.engine.requests if rid.startswith("warm-")]


def test_the_session_warms_the_reply_prompt_with_the_partial_words():
    async def main():
        h = Harness(opts=WARM)
        await _speak(h, 1200)  # still speaking: a partial every 200 ms of speech, a warm after each
        await until(lambda: len(_warms(h)) >= 3)
        deltas = h.of("conversation.item.input_audio_transcription.delta")
        await h.session.close()
        return h, deltas
    h, deltas = asyncio.run(main())
    warms = _warms(h)
    assert deltas and len(warms) == h.session._warmer.sent
    for rid, msgs in warms:  # the reply's prompt: the persona, then the published words as the user's message
        assert msgs[0] == {"role": "system", "content": "You are a test."} and msgs[-1]["role"] == "user"
        assert h.stack.engine.params[rid][0].max_tokens == 1
    # at the start of speech the conversation up to the user's turn, then the words as they are published
    assert warms[0][1][-1]["content"] == "" and h.of("input_audio_buffer.speech_started")
    assert warms[1][1][-1]["content"] == "w1" and warms[-1][1][-1]["content"].startswith("w1 w2")


def test_no_warm_once_the_pause_began():
    """The pause's check (ASR final, held reply) is the critical path: a partial that lands after the speech
    stopped sends no warm, one that lands while the caller speaks does. The check's ASR final takes 5 s here, so
    its held reply has not reached the engine yet (an idle engine: only the pause rule holds the warm back)."""
    async def main():
        h = Harness(opts=WARM, asr=FakeASR(delay_s=5.0))
        await _speak(h, 600)
        s, tr = h.session, h.session.work.utt.transcriber
        await until(lambda: not s._warmer.in_flight)
        tr.words.append("speaking")  # a new word published while the caller speaks: warmed
        n = s._warmer.sent
        s._warm_reply_prefix()
        speaking = s._warmer.sent - n
        await until(lambda: not s._warmer.in_flight)
        h.audio(np.zeros(2400, np.float32))  # 100 ms of silence: the pause began (its check starts at 64 ms)
        await asyncio.sleep(0.01)
        assert s.work.utt is not None and not s.turns.speaking and s.work.checks
        assert h.stack.engine.stats().running == 0
        tr.words.append("paused")  # a partial landing in the pause
        n = s._warmer.sent
        s._warm_reply_prefix()
        paused = s._warmer.sent - n
        await h.session.close()
        return speaking, paused
    speaking, paused = asyncio.run(main())
    assert (speaking, paused) == (1, 0)


def test_the_fake_transcriber_has_the_real_ones_shape():
    """Every member the fake offers is a property / method / coroutine exactly where audio.transcriber's
    StreamingTranscriber has one (the session read `text` as a method once: the fake allowed it, the real one did
    not)."""
    import inspect

    from fakes import FakeTranscriber

    from audio.transcriber import StreamingTranscriber

    def kind(cls, name):
        v = inspect.getattr_static(cls, name)
        return "property" if isinstance(v, property) else "coroutine" if inspect.iscoroutinefunction(v) else \
            "method" if callable(v) else "attribute"
    members = [n for n, _ in inspect.getmembers(FakeTranscriber) if not n.startswith("_")]
    assert "text" in members and "partial" in members
    for name in members:
        assert hasattr(StreamingTranscriber, name), name
        assert kind(FakeTranscriber, name) == kind(StreamingTranscriber, name), name


def test_no_warm_when_turned_off_or_while_a_reply_is_in_flight():
    async def main():
        h = Harness(opts=ServerConfig(output_lead_ms=100, asr_partial_interval_ms=200, llm_prefix_warm=False))
        await _speak(h, 1200)
        await until(lambda: len(h.of("conversation.item.input_audio_transcription.delta")) >= 2)
        off = _warms(h)
        await h.session.close()

        # interrupt_response false: the caller's speech does not cancel the reply (with it, a barge-in ends the
        # reply and the warm for the new turn is right)
        h2 = Harness(opts=WARM, engine=FakeEngine(ttft_s=5),
                     td=TurnDetection(interrupt_response=False))
        h2.send("conversation.item.create", item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Tell me a story."}]})
        h2.send("response.create")
        await until(lambda: h2.session.active is not None)
        await _speak(h2, 1200)  # the caller talks while the reply is still thinking
        await until(lambda: len(h2.of("conversation.item.input_audio_transcription.delta")) >= 2)
        during = _warms(h2)
        assert not h2.session.active.done.is_set()
        await h2.session.close()
        return off, during
    off, during = asyncio.run(main())
    assert off == [] and during == []


@pytest.mark.slow
def test_a_warm_with_the_partial_makes_the_reply_hit_the_prefix_cache():
    """The real engine and tokenizer: the reply's prompt (final transcript) reuses the blocks a warm computed from
    the partial words, which the same prompt without a warm does not find."""
    from llm_engine import AsyncLLMEngine, EngineConfig, SamplingParams
    from llm_engine.async_engine import tokenize

    conv = [{"role": "system", "content": "You are the voice assistant of Maple Street Outfitters, a shoe shop."},
            {"role": "user", "content": "Hi, are you open today?"},
            {"role": "assistant", "content": "Yes, we are open today from nine in the morning until six."}]
    final = conv + [{"role": "user", "content": "Great. Can I return a pair of running shoes that I bought last "
                                                "week if they do not fit?"}]
    partial = conv + [{"role": "user", "content": "Great. Can I return a pair of running shoes that I bought"}]
    eng = AsyncLLMEngine(EngineConfig(device="cpu", max_num_seqs=2, kv_cache_memory_mib=64))
    try:
        async def run(msgs, max_tokens):
            outs = [o async for o in eng.generate(SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                                  messages=msgs)]
            return outs[-1].result

        async def main():
            # no warm: the conversation's own blocks are cached by an earlier turn, as in a live session
            await run(conv + [{"role": "user", "content": "Thanks."}], 1)
            cold = await run(final, 4)
            cold_again = await run(final[:-1] + [{"role": "user", "content": final[-1]["content"] + " Thanks."}], 1)
            # a fresh conversation of the same shape, warmed with its partial first
            conv2 = [dict(m) for m in conv]
            conv2[0]["content"] += " Be brief."
            w = PrefixWarmer(eng, SamplingParams, lambda c, n: asyncio.get_running_loop().create_task(c, name=n))
            await run(conv2 + [{"role": "user", "content": "Thanks."}], 1)
            assert w.warm(conv2 + partial[-1:], {})
            await w._task
            warm = await run(conv2 + final[-1:], 4)
            a = tokenize(eng.tokenizer, eng.tool_dialect, conv2 + partial[-1:], None, None)
            b = tokenize(eng.tokenizer, eng.tool_dialect, conv2 + final[-1:], None, None)
            common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
            return cold, cold_again, warm, common

        cold, cold_again, warm, common = asyncio.run(main())
    finally:
        eng.shutdown()
    bs = 16  # EngineConfig's kv_block_size
    cold_new, warm_new = cold.prompt_tokens - cold.cached_tokens, warm.prompt_tokens - warm.cached_tokens
    # Warmed, the reply finds every full block of the tokens its prompt shares with the partial's (the persona, the
    # last turns with the reply's tail block, the turn markers, "Great. Can I return ... bought") and computes the
    # rest; cold, it also computes the last reply's tail block, the turn markers and the question's first words.
    assert warm.cached_tokens == bs * (common // bs), (warm, common)
    assert warm_new < cold_new and cold_new - warm_new >= 8, (cold, warm)
    assert cold_again.cached_tokens > cold.cached_tokens  # the cache itself works across requests
    assert warm.ttft_s is not None and np.isfinite(warm.ttft_s)
