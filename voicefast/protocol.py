"""Sans-I/O Realtime wire protocol: text frames in -> validated ClientEvents out; server event dicts in ->
JSON text frames out (renamed for beta clients). No sockets, no asyncio: tested with strings."""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from dataclasses import dataclass, field

from voicefast.errors import ProtocolError

CLIENT_EVENTS = frozenset({
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.truncate", "conversation.item.delete",
    "conversation.item.retrieve", "response.create", "response.cancel", "output_audio_buffer.clear"})

# GA server event name -> beta name (None: not sent to beta clients).
_BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": None,
    "conversation.item.done": None,
}
_BETA_CONTENT = {"output_text": "text", "output_audio": "audio"}


@dataclass(slots=True)
class ClientEvent:
    type: str
    event_id: str | None
    data: dict = field(default_factory=dict)  # the raw event object; `audio_bytes` added for append


def _req(obj: dict, key: str, kind: type | tuple, event_id: str | None, what: str) -> object:
    if key not in obj:
        raise ProtocolError(f"missing required field '{key}' in {what}", code="missing_required_parameter",
                            param=key, event_id=event_id)
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise ProtocolError(f"field '{key}' of {what} has the wrong type", code="invalid_type", param=key,
                            event_id=event_id)
    return v


class RealtimeProtocol:
    """One per connection. `beta` selects the `OpenAI-Beta: realtime=v1` event and field names."""

    def __init__(self, *, beta: bool = False, emit_item_created: bool = True):
        self.beta = beta
        self.emit_item_created = emit_item_created
        self._ids = itertools.count(1)

    # -- inbound ---------------------------------------------------------------------------------------
    def receive_message(self, message: str | bytes) -> ClientEvent:
        """Parse and validate one client frame. Raises ProtocolError (-> an `error` event); never anything else."""
        if isinstance(message, bytes):
            raise ProtocolError("binary frames are not supported; send JSON text frames", code="invalid_frame")
        try:
            obj = json.loads(message)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ProtocolError(f"malformed JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ProtocolError("a client event must be a JSON object", code="invalid_event")
        eid = obj.get("event_id")
        if eid is not None and not isinstance(eid, str):
            raise ProtocolError("event_id must be a string", code="invalid_type", param="event_id")
        t = obj.get("type")
        if not isinstance(t, str):
            raise ProtocolError("missing required field 'type'", code="missing_required_parameter", param="type",
                                event_id=eid)
        if t not in CLIENT_EVENTS:
            raise ProtocolError(f"unknown event type {t!r}", code="invalid_event_type", param="type", event_id=eid)
        ev = ClientEvent(t, eid, obj)
        getattr(self, "_check_" + t.replace(".", "_"), lambda e: None)(ev)
        return ev

    def _check_session_update(self, ev: ClientEvent) -> None:
        _req(ev.data, "session", dict, ev.event_id, ev.type)

    def _check_input_audio_buffer_append(self, ev: ClientEvent) -> None:
        audio = _req(ev.data, "audio", str, ev.event_id, ev.type)
        try:
            ev.data["audio_bytes"] = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("audio is not valid base64", code="invalid_base64", param="audio",
                                event_id=ev.event_id) from None

    def _check_conversation_item_create(self, ev: ClientEvent) -> None:
        item = _req(ev.data, "item", dict, ev.event_id, ev.type)
        if item.get("type", "message") in ("function_call", "function_call_output"):
            return  # fields checked against the conversation (voicefast.tools.client_tool_item)
        if item.get("type", "message") != "message":
            raise ProtocolError(f"item.type {item.get('type')!r} is not supported (only 'message', 'function_call' "
                                f"and 'function_call_output')", code="unsupported_item_type", param="item.type",
                                event_id=ev.event_id)
        if item.get("role") not in ("user", "assistant", "system"):
            raise ProtocolError("item.role must be 'user', 'assistant' or 'system'", code="invalid_value",
                                param="item.role", event_id=ev.event_id)
        content = _req(item, "content", list, ev.event_id, "item")
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in (
                    "input_text", "text", "output_text", "input_audio", "audio", "output_audio"):
                raise ProtocolError(f"item.content[{i}] has an unsupported type", code="invalid_value",
                                    param=f"item.content[{i}].type", event_id=ev.event_id)

    def _check_conversation_item_truncate(self, ev: ClientEvent) -> None:
        _req(ev.data, "item_id", str, ev.event_id, ev.type)
        ms = _req(ev.data, "audio_end_ms", int, ev.event_id, ev.type)
        if ms < 0:
            raise ProtocolError("audio_end_ms must be >= 0", param="audio_end_ms", event_id=ev.event_id)
        if ev.data.get("content_index", 0) != 0:
            raise ProtocolError("content_index must be 0", param="content_index", event_id=ev.event_id)

    def _check_conversation_item_delete(self, ev: ClientEvent) -> None:
        _req(ev.data, "item_id", str, ev.event_id, ev.type)

    _check_conversation_item_retrieve = _check_conversation_item_delete

    def _check_response_create(self, ev: ClientEvent) -> None:
        r = ev.data.get("response")
        if r is not None and not isinstance(r, dict):
            raise ProtocolError("response must be an object", code="invalid_type", param="response",
                                event_id=ev.event_id)

    def _check_response_cancel(self, ev: ClientEvent) -> None:
        rid = ev.data.get("response_id")
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError("response_id must be a string", code="invalid_type", param="response_id",
                                event_id=ev.event_id)

    # -- outbound --------------------------------------------------------------------------------------
    def events_to_send(self, event: dict) -> list[str]:
        """One server event (GA names) -> the JSON frames to send (0, 1 or 2 of them)."""
        out = []
        t = event["type"]
        if self.beta:
            if t in _BETA_NAMES:
                t = _BETA_NAMES[t]
                if t is None:
                    if event["type"] == "conversation.item.added":
                        out.append(self._frame(self._beta_item({**event, "type": "conversation.item.created"})))
                    return out
                event = {**event, "type": t}
            return [self._frame(self._beta_item(event))]
        out.append(self._frame(event))
        if t == "conversation.item.added" and self.emit_item_created:
            out.append(self._frame({**event, "type": "conversation.item.created"}))
        return out

    def _frame(self, event: dict) -> str:
        event = {"event_id": f"event_{next(self._ids)}", **event}
        return json.dumps(event, separators=(",", ":"))

    @staticmethod
    def _beta_item(event: dict) -> dict:
        """Beta items say content type 'text'/'audio' where GA says 'output_text'/'output_audio'."""
        def fix_part(p: dict) -> dict:
            return {**p, "type": _BETA_CONTENT.get(p.get("type"), p.get("type"))}

        def fix_item(it: dict) -> dict:
            return {**it, "content": [fix_part(p) for p in it.get("content", [])]} if "content" in it else it

        if isinstance(event.get("item"), dict):
            event = {**event, "item": fix_item(event["item"])}
        if isinstance(event.get("part"), dict):
            event = {**event, "part": fix_part(event["part"])}
        if isinstance(event.get("response"), dict) and event["response"].get("output"):
            event = {**event, "response": {**event["response"],
                                           "output": [fix_item(i) for i in event["response"]["output"]]}}
        return event
