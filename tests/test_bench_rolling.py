"""`voicefast bench rolling`'s verdict per call: only the documented drain close is not a failure."""

from __future__ import annotations

from bench.rolling import build_parser, classify
from bench.voice.caller import TurnRecord


def recs(*statuses: str) -> list[TurnRecord]:
    return [TurnRecord(0, i, 1, "hi", status=s) for i, s in enumerate(statuses)]


def test_call_verdicts():
    assert classify(recs("ok", "ok", "ok"), [], None, 3) == "ok"
    # closed between turns by a draining replica: the documented close, not a failure
    assert classify(recs("ok", "error: connection closed by the server (1001 server shutting down)"), [], None,
                    3) == "drain_closed"
    # any other close, an error event, a timeout, a cancelled reply or a refused call is a failure
    assert classify(recs("ok", "error: connection closed by the server (1011 internal error)"), [], None, 3) \
        == "failed"
    assert classify(recs("error: connection closed by the server (1001 server shutting down)", "ok"), [], None,
                    3) == "failed"
    assert classify(recs("ok", "ok", "ok"), ['{"code": "server_error"}'], None, 3) == "failed"
    assert classify(recs("ok", "timeout"), [], None, 3) == "failed"
    assert classify(recs("ok", "response cancelled"), [], None, 3) == "failed"
    assert classify([], [], ConnectionRefusedError("refused"), 3) == "failed"
    assert classify(recs("ok"), [], None, 3) == "failed"  # ended early without a close reason


def test_defaults_match_the_issue_target():
    args = build_parser().parse_args([])
    assert args.callers == 4 and args.restart == "r1" and args.drain_timeout_s == 120.0
