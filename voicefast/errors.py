"""The one exception the protocol and session layers raise for a bad client event; it becomes an `error` event."""

from __future__ import annotations


class ProtocolError(Exception):
    """A client event that cannot be honoured. Carries the Realtime `error` fields."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 type: str = "invalid_request_error", event_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.event_id = event_id

    def to_event(self) -> dict:
        return {"type": "error", "error": {"type": self.type, "code": self.code, "message": self.message,
                                           "param": self.param, "event_id": self.event_id}}
