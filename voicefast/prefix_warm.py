"""Prefix warm (issue 11): while the user is still speaking, prefill the prompt their reply will most likely have
— the conversation so far plus the words the streaming ASR has published — so that when the turn ends the LLM
computes only what the final transcript changed.

Why it helps: the engine's prefix cache keeps every full KV block it has computed (llm_engine.block_manager), and a
turn's prompt otherwise starts with ~30 uncached tokens (the last reply's tail block, which was never full, the
chat template's turn markers and the user's words): ~90 ms of prefill on one core of the 2-core CPU host, on the
critical path after the ASR final. A warm computes those blocks while the caller is still talking; the reply's
request then shares them up to the first token where the final differs from the partial, and prefills the rest.

A warm is a one-token greedy request whose output is dropped. It only takes idle engine time: none while the
engine has a request running or waiting (the warm would lengthen their steps), and at most one per session in
flight (a newer partial waits for the next). Sans-I/O apart from the engine call: the session decides when a warm
is due (voicefast.session) and supplies the messages; this keeps the one request and its bookkeeping."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

log = logging.getLogger("voicefast.session")
_ids = itertools.count()


class PrefixWarmer:
    def __init__(self, engine, sampling_params: Callable[..., object],
                 spawn: Callable[..., asyncio.Task]):
        self._engine, self._sp, self._spawn = engine, sampling_params, spawn
        self._task: asyncio.Task | None = None
        self._last: tuple | None = None  # the (messages, kwargs) last warmed: the same prompt twice is skipped
        self.sent = 0  # warms submitted (for tests and logs)
        self.skipped_busy = 0  # warms not sent because the engine was busy

    @property
    def in_flight(self) -> bool:
        return self._task is not None and not self._task.done()

    def warm(self, messages: list[dict], generate_kwargs: dict | None = None) -> bool:
        """Prefill `messages` (rendered as a reply's prompt would be, with `generate_kwargs` such as tools=) if the
        engine is idle and this session has no warm in flight. Returns whether a warm was sent. Never raises for a
        refused request (the reply's own request will say what is wrong, if anything)."""
        key = (repr(messages), repr(generate_kwargs))
        if self.in_flight or key == self._last:
            return False
        try:
            st = self._engine.stats()
            if st.running or st.waiting:
                self.skipped_busy += 1
                log.debug("prefix warm skipped: engine busy (%d running, %d waiting)", st.running, st.waiting)
                return False
            rid = f"warm-{next(_ids)}"
            stream = self._engine.generate(self._sp(temperature=0.0, max_tokens=1), messages=messages,
                                           request_id=rid, **(generate_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - overloaded, too long, engine gone: no warm, nothing else changes
            log.debug("prefix warm not sent: %s", e)
            return False
        self._last = key
        self.sent += 1
        log.debug("prefix warm %s: %d messages, the user's so far %r", rid, len(messages), messages[-1]["content"])
        self._task = self._spawn(self._drain(stream), "llm-prefix-warm")
        return True

    @staticmethod
    async def _drain(stream) -> None:
        try:
            async for _ in stream:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed warm costs nothing but its own time
            log.debug("prefix warm failed: %s", e)

    def cancel(self) -> None:
        """Abort the warm in flight (its stream aborts the engine request when cancelled)."""
        if self.in_flight:
            self._task.cancel()
