"""Graceful drain of one replica, sans-I/O: a state machine fed the clock and a view of the live sessions, which
answers with actions (close this session, stop). The server (voicefast/server.py) runs it on SIGTERM.

    SERVING --begin()--> DRAINING --deadline--> CLOSING --no sessions--> STOPPED
                            `------------no sessions-----------------------^

- SERVING: new sessions are accepted.
- DRAINING (from `begin(now_s)`): readiness fails, new WebSocket upgrades are refused (503); live sessions go on
  until the client ends them. When none is left, STOPPED.
- CLOSING (once `timeout_s` has passed): every session that has no response in progress and nothing left to
  send gets a `Close` (1001, going away) at once; a session in the middle of a response is closed as soon as
  that response is finished and sent. A response still going `finish_timeout_s` after the deadline is not
  waited for any longer (its session is closed too, with the same code).
- STOPPED: every session is gone; the process may exit.

A client therefore never sees an error from a drain: its call either ends on its own or ends between responses
with the documented close code 1001 (docs/deploy.md)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

GOING_AWAY = 1001
DRAIN_REASON = "server shutting down"


class Phase(Enum):
    SERVING = "serving"
    DRAINING = "draining"
    CLOSING = "closing"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the drain needs to know of one live session."""

    id: str
    responding: bool  # a response is in progress (its audio/text is still being produced or sent)
    flushed: bool  # every event already emitted has been handed to the socket


@dataclass(frozen=True, slots=True)
class Close:
    session_id: str
    code: int = GOING_AWAY
    reason: str = DRAIN_REASON


@dataclass(frozen=True, slots=True)
class Stop:
    pass


class Drain:
    def __init__(self, timeout_s: float = 120.0, finish_timeout_s: float = 60.0):
        if timeout_s < 0 or finish_timeout_s < 0:
            raise ValueError(f"drain timeouts must be >= 0, got {timeout_s}, {finish_timeout_s}")
        self.timeout_s = timeout_s
        self.finish_timeout_s = finish_timeout_s
        self.phase = Phase.SERVING
        self.started_s: float | None = None
        self._closed: set[str] = set()  # sessions already told to close (each is told once)

    @property
    def accepting(self) -> bool:
        """New sessions may start (False from the moment the drain begins)."""
        return self.phase is Phase.SERVING

    @property
    def deadline_s(self) -> float | None:
        return None if self.started_s is None else self.started_s + self.timeout_s

    def remaining_s(self, now_s: float) -> float | None:
        """Seconds of grace left before live sessions are closed (None while serving)."""
        d = self.deadline_s
        return None if d is None else max(0.0, d - now_s)

    def begin(self, now_s: float) -> bool:
        """Start draining; False (and nothing changes) if a drain already began."""
        if self.phase is not Phase.SERVING:
            return False
        self.phase, self.started_s = Phase.DRAINING, now_s
        return True

    def poll(self, now_s: float, sessions: list[SessionView]) -> list[Close | Stop]:
        """Advance with the clock and the live sessions; returns what to do now. Call it often (~10 Hz) and on
        every session end. Sessions already closed are not closed again; `Stop` comes once all are gone."""
        if self.phase is Phase.SERVING or self.phase is Phase.STOPPED:
            return []
        live = [s for s in sessions if s.id not in self._closed]
        if not sessions:
            self.phase = Phase.STOPPED
            return [Stop()]
        if self.phase is Phase.DRAINING and now_s >= self.deadline_s:
            self.phase = Phase.CLOSING
        if self.phase is not Phase.CLOSING:
            return []
        give_up = now_s >= self.deadline_s + self.finish_timeout_s
        out = [Close(s.id) for s in live if give_up or (not s.responding and s.flushed)]
        self._closed.update(c.session_id for c in out)
        return out
