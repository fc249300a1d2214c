"""Readiness of one replica (sans-I/O): may a load balancer send it a new session now? `/readyz` answers 200 with
`ready: true`, or 503 with the first reason it is not, and always the numbers behind the verdict:

- "loading": the models are not loaded (or warmed up) yet;
- "engine_failed": the LLM engine is gone (its own process died: `--engine-process`); every request would fail;
- "draining": a drain began (SIGTERM): live sessions finish, new ones must go elsewhere;
- "full": every session slot is taken (max_sessions);
- "overloaded": more LLM requests wait for a batch slot than `ready_max_waiting` (the engine is saturated:
  a new caller would only add latency to everyone's turns).

`/healthz` stays the liveness check (the process answers): a replica that is full or draining is healthy but
not ready, and a load balancer that health-checks `/readyz` keeps its existing connections open."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    status: str  # "ready" | "loading" | "engine_failed" | "draining" | "full" | "overloaded"
    body: dict

    @property
    def http_status(self) -> int:
        return 200 if self.ready else 503


def readiness(*, models_loaded: bool, draining: bool, sessions: int, max_sessions: int,
              engine_waiting: int | None, engine_running: int | None, ready_max_waiting: int,
              drain_remaining_s: float | None = None, engine_error: str | None = None) -> Readiness:
    """The verdict and the JSON body of `/readyz`. engine_* None: the engine's stats were unavailable (not a
    reason to refuse callers on its own); engine_error: why the engine is gone (it is, when set)."""
    if not models_loaded:
        status = "loading"
    elif engine_error is not None:
        status = "engine_failed"
    elif draining:
        status = "draining"
    elif sessions >= max_sessions:
        status = "full"
    elif engine_waiting is not None and engine_waiting > ready_max_waiting:
        status = "overloaded"
    else:
        status = "ready"
    body = {"ready": status == "ready", "status": status, "sessions": sessions, "max_sessions": max_sessions,
            "free_slots": max(0, max_sessions - sessions),
            "engine": {"running": engine_running, "waiting": engine_waiting, "ready_max_waiting": ready_max_waiting}}
    if engine_error is not None:
        body["engine"]["error"] = engine_error
    if drain_remaining_s is not None:
        body["drain_remaining_s"] = round(drain_remaining_s, 1)
    return Readiness(status == "ready", status, body)
