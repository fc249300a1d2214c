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
