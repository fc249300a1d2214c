"""audio.tts_pool.DeadlinePool (earliest deadline first, cancellation, shutdown) and SpeechOutput's phrase
deadlines: a response's first phrase is due now, a later one when the audio before it has played out."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from fakes import FakeTTS

from audio.speech_out import SpeechOutput
from audio.tts_pool import DeadlinePool


def _blocked_pool():
    """A one-worker pool whose worker is held by a job until the returned event is set."""
    pool = DeadlinePool(1)
    gate, started = threading.Event(), threading.Event()
    first = pool.submit_by(0.0, lambda: (started.set(), gate.wait(5)))
    assert started.wait(5)
    return pool, gate, first


def test_earliest_deadline_runs_first_and_ties_keep_submission_order():
    pool, gate, first = _blocked_pool()
    order: list[str] = []
    futs = [pool.submit_by(d, order.append, name) for d, name in
            [(30.0, "later phrase"), (10.0, "first phrase a"), (20.0, "middle"), (10.0, "first phrase b")]]
    futs.append(pool.submit(order.append, "undated"))  # executor-style submit: behind every dated job
    assert pool.queued() == 5
    gate.set()
    for f in [first, *futs]:
        f.result(5)
    assert order == ["first phrase a", "first phrase b", "middle", "later phrase", "undated"]
    pool.shutdown()


def test_cancelled_jobs_are_skipped_and_errors_reach_the_future():
    pool, gate, first = _blocked_pool()
    ran: list[int] = []
    dropped = pool.submit_by(1.0, ran.append, 1)
    kept = pool.submit_by(2.0, ran.append, 2)
    boom = pool.submit_by(3.0, lambda: 1 / 0)
    assert dropped.cancel()
    gate.set()
    kept.result(5)
    with pytest.raises(ZeroDivisionError):
        boom.result(5)
    assert ran == [2] and dropped.cancelled()
    pool.shutdown()


def test_shutdown_runs_or_cancels_what_is_queued_and_refuses_new_jobs():
    pool, gate, first = _blocked_pool()
    queued = pool.submit_by(1.0, lambda: "done")
    threading.Timer(0.05, gate.set).start()
    pool.shutdown(wait=True)
    assert queued.result(0) == "done"
    with pytest.raises(RuntimeError):
        pool.submit_by(0.0, print)
    pool2, gate2, _ = _blocked_pool()
    left = pool2.submit_by(1.0, lambda: "never")
    gate2.set()
    pool2.shutdown(wait=True, cancel_futures=True)
    assert left.cancelled() or left.result(0) == "never"  # the worker may have taken it before the shutdown
    with pytest.raises(ValueError):
        DeadlinePool(0)


def test_speech_output_dates_its_first_phrase_now_and_later_ones_by_the_audio_ahead():
    async def main():
        pool = DeadlinePool(1)
        seen: list[tuple[float, str]] = []
        real = pool.submit_by

        def spy(deadline_s, fn, *args):
            seen.append((deadline_s, args[0]))
            return real(deadline_s, fn, *args)

        pool.submit_by = spy
        so = SpeechOutput(FakeTTS(), 24_000, 20, executor=pool)
        t0 = time.monotonic()
        so.say("Hello there. We open at nine on Saturday. And we close at five in the evening.")
        frames = [f async for f in so.frames()]
        pool.shutdown()
        return t0, seen, frames, so

    t0, seen, frames, so = asyncio.run(main())
    assert frames and len(seen) >= 2
    (d0, text0), *later = seen
    assert text0.startswith("Hello") and d0 - t0 < 1.0  # the first phrase: due at once
    # every later phrase is due when the audio synthesized before it has played out from the first audio
    ahead_ms = [e - s for s, e, *_ in so.phrase_spans_ms]
    for i, (d, _) in enumerate(later):
        assert d >= so.first_audio_s + sum(ahead_ms[:i + 1]) / 1000.0 - 1e-6
    assert np.isfinite([d for d, _ in seen]).all()


def test_a_pool_nobody_references_ends_its_workers():
    import gc

    pool = DeadlinePool(2, name="test-deadline-gc")
    assert pool.submit_by(0.0, lambda: 7).result(5) == 7
    threads = list(pool._threads)
    del pool
    gc.collect()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
