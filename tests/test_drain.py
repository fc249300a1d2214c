"""The drain state machine and the readiness verdict, sans-I/O: clock and session views in, actions out."""

from __future__ import annotations

import pytest

from voicefast.drain import GOING_AWAY, Close, Drain, Phase, SessionView, Stop
from voicefast.readiness import readiness


def s(i: str, responding: bool = False, flushed: bool = True) -> SessionView:
    return SessionView(i, responding, flushed)


def test_serving_accepts_and_does_nothing():
    d = Drain(timeout_s=10)
    assert d.accepting and d.phase is Phase.SERVING
    assert d.poll(0.0, [s("a", True)]) == [] and d.poll(1e9, []) == []
    assert d.remaining_s(5.0) is None


def test_no_sessions_stops_at_once():
    d = Drain(timeout_s=10)
    assert d.begin(100.0)
    assert not d.accepting
    assert d.poll(100.0, []) == [Stop()]
    assert d.phase is Phase.STOPPED
    assert d.poll(101.0, []) == []  # Stop comes once


def test_sessions_that_end_on_their_own_are_never_closed():
    d = Drain(timeout_s=10)
    d.begin(0.0)
    assert d.poll(1.0, [s("a", True), s("b")]) == []
    assert d.remaining_s(1.0) == pytest.approx(9.0)
    assert d.poll(5.0, [s("a", True)]) == []  # b hung up
    assert d.poll(9.9, [s("a", False)]) == []  # still within the grace period: idle sessions are left alone
    assert d.poll(9.95, []) == [Stop()]


def test_after_the_deadline_idle_sessions_close_and_responding_ones_finish_first():
    d = Drain(timeout_s=10, finish_timeout_s=30)
    d.begin(0.0)
    out = d.poll(10.0, [s("idle"), s("talking", responding=True), s("sending", flushed=False)])
    assert out == [Close("idle", GOING_AWAY, "server shutting down")]
    assert d.phase is Phase.CLOSING
    # the response goes on; nothing new to do
    assert d.poll(12.0, [s("idle"), s("talking", True), s("sending", flushed=False)]) == []
    # its response finished and was sent: now it closes; the other has flushed its queue too
    out = d.poll(13.0, [s("idle"), s("talking"), s("sending")])
    assert {c.session_id for c in out} == {"talking", "sending"} and all(c.code == 1001 for c in out)
    assert d.poll(14.0, [s("talking")]) == []  # closing in progress: not told twice
    assert d.poll(15.0, []) == [Stop()]


def test_a_response_that_never_ends_is_cut_after_the_finish_timeout():
    d = Drain(timeout_s=5, finish_timeout_s=20)
    d.begin(0.0)
    assert d.poll(5.0, [s("stuck", True)]) == []
    assert d.poll(24.9, [s("stuck", True)]) == []
    assert d.poll(25.0, [s("stuck", True)]) == [Close("stuck")]


def test_zero_grace_closes_idle_sessions_immediately():
    d = Drain(timeout_s=0)
    d.begin(3.0)
    assert d.poll(3.0, [s("a"), s("b", True)]) == [Close("a")]


def test_begin_twice_keeps_the_first_deadline():
    d = Drain(timeout_s=10)
    assert d.begin(0.0)
    assert not d.begin(5.0)
    assert d.deadline_s == 10.0


def test_bad_timeouts_are_rejected():
    with pytest.raises(ValueError, match="drain timeouts"):
        Drain(timeout_s=-1)


@pytest.mark.parametrize("kw, status", [
    (dict(), "ready"),
    (dict(models_loaded=False), "loading"),
    (dict(draining=True), "draining"),
    (dict(sessions=4), "full"),
    (dict(engine_waiting=9), "overloaded"),
    (dict(engine_waiting=8), "ready"),
    (dict(engine_waiting=None, engine_running=None), "ready"),
    (dict(engine_error="engine process exited with signal SIGKILL"), "engine_failed"),
    (dict(engine_error="gone", draining=True), "engine_failed"),
])
def test_readiness_verdicts(kw, status):
    args = dict(models_loaded=True, draining=False, sessions=3, max_sessions=4, engine_waiting=0, engine_running=2,
                ready_max_waiting=8) | kw
    r = readiness(**args)
    assert r.status == status and r.ready == (status == "ready")
    assert r.http_status == (200 if status == "ready" else 503)
    assert r.body["sessions"] == args["sessions"] and r.body["max_sessions"] == 4
    assert r.body["free_slots"] == 4 - args["sessions"]
    assert r.body["engine"]["waiting"] == args["engine_waiting"]
    assert r.body["engine"].get("error") == kw.get("engine_error")
