"""A session's turn-taking work in flight (bookkeeping, no decisions): the current utterance's streaming
transcriber and its partials, and the live checks of voicefast.turns (each: an ASR task, maybe an end-of-turn
model future, maybe a held speculative reply). The session starts the work; this keeps it and cancels it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from voicefast.metrics import TurnTimings
from voicefast.turns import StartCheck

RATE_HZ = 16_000


@dataclass(slots=True)
class Check:
    action: StartCheck
    asr: asyncio.Task  # -> the transcript of the turn so far
    t: TurnTimings  # this turn's timings if the check becomes the turn's
    model: asyncio.Future | None = None  # -> end-of-turn probability
    spec: object | None = None  # the held speculative Response

    def cancel(self) -> None:
        if not self.asr.done():
            self.asr.cancel()
        if self.model is not None:
            self.model.cancel()  # drops the inference if it has not started
        if self.spec is not None:
            self.spec.discard()


@dataclass(slots=True)
class _Utterance:
    item_id: str
    transcriber: object | None
    fed: int = 0  # samples fed to the transcriber
    last_partial: int = 0  # `fed` when the last partial was asked for
    partial_task: asyncio.Task | None = None


class TurnWork:
    def __init__(self, *, transcriber_factory: Callable[[], object] | None, partial_interval_ms: int,
                 spawn: Callable[..., asyncio.Task], on_partial: Callable[[str, str], None]):
        self._factory = transcriber_factory if partial_interval_ms > 0 else None
        self._interval = partial_interval_ms * RATE_HZ // 1000
        self._spawn, self._on_partial = spawn, on_partial
        self.utt: _Utterance | None = None
        self.checks: dict[int, Check] = {}

    # -- the utterance and its partials ----------------------------------------------------------------------
    def begin(self, item_id: str, audio_so_far: np.ndarray) -> None:
        self.drop_utterance(None)
        tr = self._factory() if self._factory is not None else None
        self.utt = u = _Utterance(item_id, tr)
        if tr is not None:
            tr.feed(audio_so_far)
            u.fed = u.last_partial = len(audio_so_far)

    def feed_partials(self, x16: np.ndarray, *, speaking: bool) -> None:
        """New audio of the utterance; a partial is due every partial_interval_ms of speech. None once a pause
        began: the ASR worker is then needed for the check (the critical path)."""
        u = self.utt
        if u is None or u.transcriber is None:
            return
        u.transcriber.feed(x16)
        u.fed += len(x16)
        if speaking and u.fed - u.last_partial >= self._interval and (u.partial_task is None or
                                                                       u.partial_task.done()):
            u.last_partial = u.fed
            u.partial_task = self._spawn(self._partial(u), "asr-partial")

    async def _partial(self, u: _Utterance) -> None:
        delta = await u.transcriber.partial()
        if delta and self.utt is u:
            self._on_partial(u.item_id, delta)

    def drop_utterance(self, item_id: str | None) -> None:
        """Forget the utterance (`item_id`, or whichever is current): its partials and every check of it."""
        u = self.utt
        if u is not None and (item_id is None or u.item_id == item_id):
            if u.partial_task is not None:
                u.partial_task.cancel()
            self.utt = None
        for cid in [cid for cid, c in self.checks.items() if item_id is None or c.action.item_id == item_id]:
            self.cancel_check(cid)

    # -- checks ----------------------------------------------------------------------------------------------
    def add_check(self, action: StartCheck, asr: asyncio.Task, t: TurnTimings) -> Check:
        c = self.checks[action.check_id] = Check(action, asr, t)
        return c

    def take_check(self, check_id: int) -> Check | None:
        """The check that ended the turn: its work now belongs to the turn (not cancelled)."""
        return self.checks.pop(check_id, None)

    def cancel_check(self, check_id: int) -> None:
        c = self.checks.pop(check_id, None)
        if c is not None:
            c.cancel()

    def tasks(self) -> list[asyncio.Future]:
        """Everything still running, for close() to cancel and await."""
        out: list[asyncio.Future] = [c.asr for c in self.checks.values()]
        out += [c.model for c in self.checks.values() if c.model is not None]
        if self.utt is not None and self.utt.partial_task is not None:
            out.append(self.utt.partial_task)
        return out
