"""Sans-I/O Twilio Media Streams wire protocol (bidirectional `<Connect><Stream>`): one JSON text frame in ->
one typed event out; outbound `media` / `mark` / `clear` frames built from values. No sockets, no asyncio.

Inbound (Twilio -> us): connected, start, media, dtmf, mark (the echo of one of our marks once the audio queued
before it has played, or been cleared), stop. Anything else parses to `Unknown` (ignored by the caller); a frame
that is not a well-formed message raises TwilioMessageError and nothing else. Shapes:
https://www.twilio.com/docs/voice/media-streams/websocket-messages (see shared reference realtime-protocol.md)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

MEDIA_ENCODING = "audio/x-mulaw"
MEDIA_RATE_HZ = 8000
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_PARAMETERS = 64  # customParameters kept per call (Twilio allows far fewer in practice)
MAX_PARAMETER_CHARS = 500
# One media message is processed inline on the event loop (VAD, resampling): at most 200 ms of audio, like a
# Realtime append's slice (ServerConfig.inline_audio_ms); Twilio's own are 20 ms.
MAX_MEDIA_BYTES = 1600


class TwilioMessageError(ValueError):
    """A frame that is not a well-formed Media Streams message (the caller logs it and carries on)."""


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str] = field(default_factory=dict)
    encoding: str = MEDIA_ENCODING
    sample_rate_hz: int = MEDIA_RATE_HZ
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Media:
    payload: bytes  # mu-law 8 kHz, no header
    track: str = "inbound"
    chunk: int | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Stop:
    call_sid: str


@dataclass(frozen=True, slots=True)
class Unknown:
    event: str


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop | Unknown


def _obj(d: dict, key: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise TwilioMessageError(f"'{d.get('event')}' message needs an object '{key}'")
    return v


def _str(d: dict, key: str, what: str, *, required: bool = True, max_len: int = 256) -> str:
    v = d.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not v and required or len(v) > max_len:
        raise TwilioMessageError(f"{what}.{key} must be a non-empty string of at most {max_len} characters")
    return v


def _int(v: object) -> int | None:
    """Twilio sends counters as decimal strings ("chunk": "2"); accept ints too."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.isdigit() and len(v) < 20:
        return int(v)
    return None


def parse_message(frame: str | bytes) -> TwilioEvent:
    """One Twilio text frame -> event. Raises TwilioMessageError (and nothing else) for malformed frames."""
    if isinstance(frame, bytes):
        raise TwilioMessageError("binary frames are not part of the Media Streams protocol")
    try:
        d = json.loads(frame)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TwilioMessageError(f"malformed JSON: {e}") from None
    if not isinstance(d, dict):
        raise TwilioMessageError("a message must be a JSON object")
    ev = d.get("event")
    if not isinstance(ev, str):
        raise TwilioMessageError("missing 'event'")
    if ev == "connected":
        return Connected(str(d.get("protocol", "")), str(d.get("version", "")))
    if ev == "media":
        m = _obj(d, "media")
        payload = m.get("payload")
        if not isinstance(payload, str):
            raise TwilioMessageError("media.payload must be a base64 string")
        if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
            raise TwilioMessageError(f"media.payload is over {MAX_MEDIA_BYTES} bytes (Twilio sends 20 ms: 160)")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise TwilioMessageError("media.payload is not valid base64") from None
        if len(raw) > MAX_MEDIA_BYTES:
            raise TwilioMessageError(f"media.payload is over {MAX_MEDIA_BYTES} bytes (Twilio sends 20 ms: 160)")
        return Media(raw, str(m.get("track") or "inbound"), _int(m.get("chunk")), _int(m.get("timestamp")))
    if ev == "start":
        return _parse_start(d)
    if ev == "mark":
        return Mark(_str(_obj(d, "mark"), "name", "mark"))
    if ev == "dtmf":
        digit = _str(_obj(d, "dtmf"), "digit", "dtmf", max_len=1)
        if digit not in DTMF_DIGITS:
            raise TwilioMessageError(f"dtmf.digit {digit!r} is not a keypad digit")
        return Dtmf(digit)
    if ev == "stop":
        s = d.get("stop")
        return Stop(str(s.get("callSid", "")) if isinstance(s, dict) else "")
    return Unknown(ev[:64])


def _parse_start(d: dict) -> Start:
    s = _obj(d, "start")
    stream_sid = _str(s, "streamSid", "start", required=False) or _str(d, "streamSid", "start")
    fmt = s.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise TwilioMessageError("start.mediaFormat must be an object")
    params = s.get("customParameters") or {}
    if not isinstance(params, dict) or len(params) > MAX_PARAMETERS:
        raise TwilioMessageError(f"start.customParameters must be an object of at most {MAX_PARAMETERS} entries")
    custom = {}
    for k, v in params.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > MAX_PARAMETER_CHARS:
            raise TwilioMessageError(f"customParameters.{str(k)[:64]} must be a string of at most "
                                     f"{MAX_PARAMETER_CHARS} characters")
        custom[k] = v
    tracks = s.get("tracks") or ["inbound"]
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise TwilioMessageError("start.tracks must be a list of strings")
    rate, channels = _int(fmt.get("sampleRate", MEDIA_RATE_HZ)), _int(fmt.get("channels", 1))
    return Start(stream_sid=stream_sid, call_sid=_str(s, "callSid", "start", required=False),
                 account_sid=_str(s, "accountSid", "start", required=False), tracks=tuple(tracks),
                 custom_parameters=custom, encoding=str(fmt.get("encoding", MEDIA_ENCODING)),
                 sample_rate_hz=-1 if rate is None else rate, channels=-1 if channels is None else channels)


# -- outbound --------------------------------------------------------------------------------------------
def _frame(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


def media_message(stream_sid: str, ulaw: bytes) -> str:
    return _frame({"event": "media", "streamSid": stream_sid,
                   "media": {"payload": base64.b64encode(ulaw).decode("ascii")}})


def mark_message(stream_sid: str, name: str) -> str:
    return _frame({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    return _frame({"event": "clear", "streamSid": stream_sid})
