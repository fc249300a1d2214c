"""Per-call configuration from a Twilio `start` message (pure): customParameters `persona`, `voice`, `language`
and `secret` -> CallSetup, or CallRefused naming what is wrong. Other customParameters (CRM fields and the like)
are the operator's metadata and pass through untouched; `instructions` is refused, because a call may only pick
one of the server's personas by name."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field

from voicefast.personas import DEFAULT_NAME, Persona
from voicefast.twilio import MEDIA_ENCODING, MEDIA_RATE_HZ, Start

_LANG_RE = re.compile(r"[a-z]{2,3}")
FORBIDDEN_PARAMETERS = ("instructions", "prompt", "system")


class CallRefused(Exception):
    """The call cannot be served as asked. `code` is short and stable (logs, metrics); `message` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True, slots=True)
class Catalog:
    """What the server can offer a call."""

    personas: dict[str, Persona]
    voices: list[str]
    asr_language: str | None  # the one language the ASR transcribes; None: a multilingual model detecting it
    asr_languages: frozenset[str] | None = None  # languages a multilingual ASR knows (None: not known)
    default_greeting: str = ""
    secret: str | None = None  # required in customParameters.secret unless the URL already carried it


@dataclass(frozen=True, slots=True)
class CallSetup:
    stream_sid: str
    call_sid: str
    persona: Persona
    voice: str
    language: str
    greeting: str
    parameters: dict[str, str] = field(default_factory=dict)  # every customParameter except the secret


def normalize_language(value: str) -> str:
    """'en-US' / 'EN_gb' / 'en' -> 'en'. Raises CallRefused for anything that is not a language tag."""
    base = value.strip().lower().replace("_", "-").split("-")[0]
    if not _LANG_RE.fullmatch(base):
        raise CallRefused("invalid_language", f"language {value[:32]!r} is not a language code such as 'en'")
    return base


def resolve_call(start: Start, catalog: Catalog, *, secret_verified: bool) -> CallSetup:
    """The call's setup, or CallRefused (the call is then ended without a session)."""
    if start.encoding != MEDIA_ENCODING or start.sample_rate_hz != MEDIA_RATE_HZ or start.channels != 1:
        raise CallRefused("unsupported_media_format",
                          f"media format {start.encoding} {start.sample_rate_hz} Hz x{start.channels} is not "
                          f"supported (Twilio's {MEDIA_ENCODING} {MEDIA_RATE_HZ} Hz mono is)")
    p = dict(start.custom_parameters)
    presented = p.pop("secret", None)
    if catalog.secret is not None and not secret_verified and (
            presented is None or not hmac.compare_digest(presented.encode(), catalog.secret.encode())):
        raise CallRefused("invalid_secret", "missing or wrong shared secret (customParameters.secret)")
    bad = [k for k in FORBIDDEN_PARAMETERS if k in p]
    if bad:
        raise CallRefused("instructions_not_allowed", f"customParameters.{bad[0]} is not accepted: a call selects "
                          f"a server-side persona by name (customParameters.persona)")
    name = p.get("persona") or DEFAULT_NAME
    persona = catalog.personas.get(name)
    if persona is None:
        raise CallRefused("unknown_persona", f"persona {name[:64]!r} is not configured on this server "
                          f"(configured: {sorted(catalog.personas)})")
    voice = p.get("voice") or persona.voice or catalog.voices[0]
    if voice not in catalog.voices:
        raise CallRefused("unknown_voice", f"voice {voice[:64]!r} is not loaded (loaded: {catalog.voices})")
    asked = p.get("language") or persona.language
    language = catalog.asr_language or "en"
    if asked:
        language = normalize_language(asked)
        if catalog.asr_language is not None and language != catalog.asr_language:
            raise CallRefused("unsupported_language", f"language {asked[:32]!r} is not supported: the loaded ASR "
                              f"transcribes {catalog.asr_language!r} only")
        if catalog.asr_language is None and catalog.asr_languages is not None \
                and language not in catalog.asr_languages:
            raise CallRefused("unsupported_language", f"language {asked[:32]!r} is not one the loaded ASR knows")
    greeting = persona.greeting if persona.greeting is not None else catalog.default_greeting
    return CallSetup(stream_sid=start.stream_sid, call_sid=start.call_sid, persona=persona, voice=voice,
                     language=language, greeting=greeting.strip(), parameters=p)
