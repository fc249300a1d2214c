"""voicefast.loader.freeze_heap: what is alive after start-up leaves the garbage collector's full passes (a full
collection walks every tracked object with every thread stopped)."""

from __future__ import annotations

import gc

from voicefast.loader import freeze_heap


def test_freeze_heap_takes_what_is_alive_out_of_full_collections():
    keep = [[i] for i in range(1000)]  # stands in for the loaded stack
    try:
        n = freeze_heap()
        assert n == gc.get_freeze_count() >= len(keep)
        tracked = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert not any(id(x) in tracked for x in keep)  # none of them is walked by a collection any more
        young = [[i] for i in range(10)]  # what serving allocates afterwards is collected as usual
        tracked = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert all(id(x) in tracked for x in young)
    finally:
        gc.unfreeze()


def test_slow_collections_are_logged_with_their_generation(caplog):
    import logging

    from voicefast.loader import log_gc_pauses

    cb = log_gc_pauses(threshold_ms=0.0)  # every collection counts as slow here
    try:
        with caplog.at_level(logging.WARNING, logger="voicefast.loader"):
            gc.collect(1)
    finally:
        gc.callbacks.remove(cb)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("garbage collection of generation 1 took") for m in msgs), msgs
    quiet = log_gc_pauses(threshold_ms=1e9)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="voicefast.loader"):
            gc.collect(0)
        assert not caplog.records
    finally:
        gc.callbacks.remove(quiet)
