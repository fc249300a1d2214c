"""Server-side named personas: a directory of persona files, selected per phone call by name (a Twilio
customParameter). A caller can only pick a persona the operator wrote; instructions never come from the call.

`<name>.toml` holds `instructions` (required) and optionally `greeting` ("" for none), `voice` and `language`;
`<name>.txt` holds instructions only. Names are file stems of [A-Za-z0-9_-] (at most 64 characters). A bad file
fails the server's start with a message naming the file and the field, never later during a call."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEFAULT_NAME = "default"
_FIELDS = {"instructions", "greeting", "voice", "language", "description"}
MAX_FILE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Persona:
    name: str
    instructions: str
    greeting: str | None = None  # None: the server's default greeting; "": no greeting
    voice: str | None = None  # None: the server's default voice
    language: str | None = None  # None: the server's ASR language
    description: str = ""


def load_persona(path: Path, voices: list[str] | None = None) -> Persona:
    """One persona file -> Persona. Raises ValueError naming the file and what is wrong."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"persona file {path} is larger than {MAX_FILE_BYTES} bytes")
    name = path.stem
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"persona file {path}: the name {name!r} must match {NAME_RE.pattern}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        data = {"instructions": text.strip()}
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"persona file {path}: {e}") from None
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"persona file {path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ValueError(f"persona file {path}: '{key}' must be a string")
    if not data.get("instructions", "").strip():
        raise ValueError(f"persona file {path}: 'instructions' is required and must not be empty")
    voice = data.get("voice")
    if voice is not None and voices is not None and voice not in voices:
        raise ValueError(f"persona file {path}: voice {voice!r} is not loaded (loaded: {voices})")
    return Persona(name=name, instructions=data["instructions"].strip(), greeting=data.get("greeting"),
                   voice=voice, language=data.get("language"), description=data.get("description", ""))


def load_personas(directory: str | Path | None, default: Persona, voices: list[str] | None = None
                  ) -> dict[str, Persona]:
    """Name -> Persona: the built-in `default` plus every *.toml / *.txt in `directory` (a file named
    default.* replaces the built-in one). Raises ValueError for a missing directory or a bad file."""
    personas = {default.name: default}
    if directory is None:
        return personas
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"personas directory {d} does not exist or is not a directory")
    seen: dict[str, Path] = {}
    for path in sorted(d.iterdir()):
        if path.suffix not in (".toml", ".txt") or not path.is_file():
            continue
        if path.stem in seen:
            raise ValueError(f"persona {path.stem!r} is defined twice: {seen[path.stem]} and {path}")
        seen[path.stem] = path
        personas[path.stem] = load_persona(path, voices)
    return personas
