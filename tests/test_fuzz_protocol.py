"""Property-based fuzzing of the protocol layer with fakes behind it: random and mutated client frames (wrong
types, huge numbers, deep nesting, unicode, wrong order) into a session. Every frame is answered by events or a
ProtocolError (an `error` event), never another exception; no session task fails; the session's bounded state stays
within its bounds and closing it leaves nothing behind.

Deterministic in CI (hypothesis' derandomized profile: the same generated cases on every run, so no flakes);
`HYPOTHESIS_PROFILE=explore` draws fresh random cases, ten times as many. The case counts are printed."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from fakes import make_stack
from fuzz_events import frames, json_values, mutated, templates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voicefast.config import ServerConfig
from voicefast.errors import ProtocolError
from voicefast.intake import deliver
from voicefast.protocol import RealtimeProtocol
from voicefast.response import ResponseParams
from voicefast.session import Session
from voicefast.session_config import SessionConfig

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 1
OPTS = ServerConfig(output_lead_ms=0, max_item_bytes=2000, max_conversation_bytes=8000, max_conversation_items=8,
                    max_input_buffer_s=2.0, max_utterance_s=1.0)
CASES: dict[str, int] = {}


class ErrorLog(logging.Handler):
    """Counts ERROR records of the server's loggers: a session task or a response that crashed."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("voicefast"):
            self.records.append(record)


def count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@settings(max_examples=1000 * SCALE)
@given(st.lists(frames(), min_size=1, max_size=6), st.booleans())
def test_any_frames_into_a_session_yield_events_or_errors(seq, beta):
    count("session sequences")
    errors = ErrorLog()
    logging.getLogger("voicefast").addHandler(errors)
    try:
        asyncio.run(_drive(seq, beta))
    finally:
        logging.getLogger("voicefast").removeHandler(errors)
    assert errors.records == [], [r.getMessage() for r in errors.records]


async def _drive(seq, beta: bool) -> None:
    events: list[dict] = []
    stack = make_stack()
    proto = RealtimeProtocol(beta=beta)
    session = Session(stack, OPTS, emit=events.append, beta=beta,
                      defaults=SessionConfig(instructions="Fuzz.", voice="fake"))
    session.start()
    for frame in seq:
        n = len(events)
        try:
            await deliver(session, proto.receive_message(frame), inline_audio_ms=OPTS.inline_audio_ms)
        except ProtocolError as e:
            count("frames refused with an error")
            ev = e.to_event()
            assert ev["error"]["code"] and ev["error"]["message"]
            json.dumps(ev)  # what the server sends must serialize
            continue
        count("frames applied")
        for ev in events[n:]:
            for frame_out in proto.events_to_send(ev):
                json.loads(frame_out)
        await asyncio.sleep(0)  # let spawned tasks take a step
        # bounded state stays within its bounds after every event
        assert len(session.conv.items) <= OPTS.max_conversation_items
        assert session.inbuf.samples <= OPTS.max_input_buffer_s * 16_000 + 16_000
    # still serving: a well-formed event works after whatever came before
    session.handle(proto.receive_message(json.dumps({"type": "session.update", "session": {"instructions": "ok"}})))
    assert session.cfg.instructions == "ok"
    await session.close()
    assert session.closed and not session._tasks
    assert stack.engine.stats().running == 0


@settings(max_examples=1500 * SCALE)
@given(frames())
def test_protocol_parses_any_frame_or_raises_protocol_error(frame):
    count("protocol frames")
    try:
        ev = RealtimeProtocol().receive_message(frame)
    except ProtocolError as e:
        assert e.code
        return
    assert isinstance(ev.data, dict) and isinstance(ev.type, str)


@settings(max_examples=1000 * SCALE)
@given(st.one_of(mutated(templates()).map(lambda e: e.get("session")), json_values), st.booleans())
def test_session_update_applies_or_rejects_by_name(session_obj, beta):
    count("session.update bodies")
    base = SessionConfig(voice="fake")
    try:
        new = base.apply(session_obj, beta=beta, voices=["fake"], languages=("en",))
    except ProtocolError as e:
        assert e.param
        return
    json.dumps(new.to_dict(beta=beta))
    assert base.to_dict(beta=beta) == SessionConfig(voice="fake").to_dict(beta=beta)  # the original is untouched


@settings(max_examples=1000 * SCALE)
@given(st.one_of(mutated(templates()).map(lambda e: e.get("response")), json_values))
def test_response_overrides_apply_or_reject_by_name(over):
    count("response.create bodies")
    if not isinstance(over, dict):
        over = {"response": over}
    try:
        p, instructions = ResponseParams.from_request(over, SessionConfig(voice="fake"), OPTS, ["fake"])
    except ProtocolError as e:
        assert e.param
        return
    assert p.voice == "fake" and isinstance(instructions, str)
    assert p.max_output_tokens == "inf" or 1 <= p.max_output_tokens <= 4096


def teardown_module():
    print(f"\nfuzz cases run: {CASES}")
