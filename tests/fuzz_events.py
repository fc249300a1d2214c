"""hypothesis strategies for client frames: well-formed events of every type, the same with fields replaced by
random JSON (wrong types, huge numbers, deep nesting, unicode), dropped or added, unknown types, and raw text
mutations of valid frames (truncated, spliced, bytes). Shared by the protocol fuzz tests (fakes) and the live
fuzz test (the embedded models)."""

from __future__ import annotations

import base64
import json

import numpy as np
from hypothesis import strategies as st

from voicefast.protocol import CLIENT_EVENTS

_SPEECH = (0.3 * np.sin(2 * np.pi * 300 * np.arange(4800) / 24_000) * 32767).astype("<i2").tobytes()  # 200 ms
AUDIO_B64 = [base64.b64encode(_SPEECH).decode(), base64.b64encode(bytes(960)).decode(), "", "AAA=", "////"]
ITEM_IDS = ["item_a", "item_b", "root", "", "x" * 65]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["audio", "text", "user", "assistant", "system", "inf", "auto", "none",
                                     "server_vad", "semantic_vad", "audio/pcm", "audio/pcmu", "g711_ulaw", "pcm16",
                                     "alloy", "marin", "whisper-1", "en", "de", "input_text", "input_audio",
                                     "message", "function_call", "\u0000", "\ud7ff\U0001f600", "realtime"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)


def _content(kind: str) -> dict:
    if kind == "input_audio":
        return {"type": "input_audio", "audio": AUDIO_B64[0]}
    return {"type": kind, "text": "What time do you open?"}


def templates() -> st.SearchStrategy[dict]:
    """Well-formed events of every client type (the fakes behind them answer quickly)."""
    item = st.builds(lambda role, kinds, iid: {"type": "message", "role": role, "id": iid,
                                               "content": [_content(k) for k in kinds]},
                     st.sampled_from(["user", "assistant", "system"]),
                     st.lists(st.sampled_from(["input_text", "text", "input_audio", "output_text"]), max_size=3),
                     st.sampled_from(ITEM_IDS[:2]))
    session = st.fixed_dictionaries({}, optional={
        "type": st.just("realtime"), "instructions": st.text(max_size=30),
        "output_modalities": st.sampled_from([["audio"], ["text"]]),
        "max_output_tokens": st.sampled_from([1, 8, "inf", 4096]), "temperature": st.floats(0, 2),
        "audio": st.fixed_dictionaries({}, optional={
            "input": st.fixed_dictionaries({}, optional={
                "format": st.sampled_from([{"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcmu"}]),
                "turn_detection": st.one_of(st.none(), st.fixed_dictionaries(
                    {"type": st.sampled_from(["server_vad", "semantic_vad"])},
                    optional={"silence_duration_ms": st.integers(50, 2000), "create_response": st.booleans(),
                              "interrupt_response": st.booleans()})),
                "transcription": st.one_of(st.none(), st.fixed_dictionaries(
                    {}, optional={"model": st.sampled_from(["whisper-1", "gpt-4o-transcribe"]),
                                  "language": st.sampled_from(["en", None]), "prompt": st.text(max_size=20)}))}),
            "output": st.fixed_dictionaries({}, optional={"voice": st.sampled_from(["alloy", "marin"]),
                                                          "speed": st.floats(0.25, 1.5)})})})
    response = st.fixed_dictionaries({}, optional={
        "output_modalities": st.sampled_from([["text"], ["audio"]]), "max_output_tokens": st.integers(1, 8),
        "instructions": st.text(max_size=30), "conversation": st.sampled_from(["auto", "none"]),
        "voice": st.sampled_from(["alloy", "marin"])})
    return st.one_of(
        st.builds(lambda s: {"type": "session.update", "session": s}, session),
        st.builds(lambda a: {"type": "input_audio_buffer.append", "audio": a}, st.sampled_from(AUDIO_B64)),
        st.just({"type": "input_audio_buffer.commit"}), st.just({"type": "input_audio_buffer.clear"}),
        st.builds(lambda it, prev: {"type": "conversation.item.create", "item": it,
                                    **({"previous_item_id": prev} if prev else {})},
                  item, st.sampled_from([None, "root", "item_a", "missing"])),
        st.builds(lambda iid, ms: {"type": "conversation.item.truncate", "item_id": iid, "content_index": 0,
                                   "audio_end_ms": ms}, st.sampled_from(ITEM_IDS), st.integers(-5, 10**6)),
        st.builds(lambda iid: {"type": "conversation.item.delete", "item_id": iid}, st.sampled_from(ITEM_IDS)),
        st.builds(lambda iid: {"type": "conversation.item.retrieve", "item_id": iid}, st.sampled_from(ITEM_IDS)),
        st.builds(lambda r: {"type": "response.create", "response": r}, response),
        st.builds(lambda rid: {"type": "response.cancel", **({"response_id": rid} if rid else {})},
                  st.sampled_from([None, "resp_x"])),
        st.just({"type": "output_audio_buffer.clear"}))


@st.composite
def mutated(draw, base: st.SearchStrategy[dict]) -> dict:
    """A well-formed event with some fields (at any depth) replaced by random JSON, dropped, or added."""
    ev = json.loads(json.dumps(draw(base)))
    for _ in range(draw(st.integers(1, 3))):
        node = ev
        path = []
        while isinstance(node, dict) and node and draw(st.booleans()):
            k = draw(st.sampled_from(sorted(node)))
            if not isinstance(node[k], (dict, list)):
                break
            path.append(k)
            node = node[k] if isinstance(node[k], dict) else (node[k][0] if node[k] else {})
        if not isinstance(node, dict):
            continue
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "add" or not node:
            node[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "drop":
            node.pop(draw(st.sampled_from(sorted(node))))
        else:
            node[draw(st.sampled_from(sorted(node)))] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        ev["type"] = draw(st.one_of(st.sampled_from(sorted(CLIENT_EVENTS)), st.text(max_size=20), json_values))
    return ev


@st.composite
def raw_frames(draw) -> str | bytes:
    """Frames that are not a well-formed event: cut, spliced, deeply nested, not JSON, binary."""
    text = json.dumps(draw(templates()))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return text[:draw(st.integers(0, len(text)))]
    if kind == 1:
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.text(max_size=8)) + text[i:]
    if kind == 2:
        depth = draw(st.integers(1, 20_000))
        return "[" * depth + "]" * depth if draw(st.booleans()) else '{"type":' + "[" * depth
    if kind == 3:
        return draw(st.binary(max_size=64))
    if kind == 4:
        return json.dumps(draw(json_values))
    return json.dumps({"type": "input_audio_buffer.append", "audio": draw(st.text(max_size=40))})


def frames() -> st.SearchStrategy[str | bytes]:
    events = templates()
    return st.one_of(events.map(json.dumps), mutated(events).map(lambda e: json.dumps(e, allow_nan=True)),
                     raw_frames())
