"""Per-session settings as the client sees them (`session.update` in, `session.created/updated` out), in both
the GA shape (nested `audio.input/output`) and the beta shape (flat fields). Only fields present change."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat
from voicefast.tools import ToolSettings
from voicefast.turns import TurnPolicy

EAGERNESS_VALUES = ("low", "medium", "high", "auto")


@dataclass(slots=True)
class TurnDetection:
    """`turn_detection` as the client sees it. server_vad ends a turn after silence_duration_ms of silence;
    semantic_vad asks the end-of-turn model and the transcript at each pause (eagerness sets when and how long it
    waits, voicefast.turns.EAGERNESS): silence_duration_ms is not part of it. threshold and prefix_padding_ms keep
    their VAD meaning in both modes; idle_timeout_ms works in both (OpenAI documents it for server_vad)."""

    type: str = "semantic_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500  # server_vad only (kept across a switch to semantic_vad and back)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    eagerness: str = "auto"  # semantic_vad only

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    def policy(self, **kw) -> TurnPolicy:
        """The turn-taking policy (voicefast.turns) this setting means; kw: the server's own turn settings."""
        return TurnPolicy.for_mode(self.type, eagerness=self.eagerness, silence_duration_ms=self.silence_duration_ms,
                                   create_response=self.create_response, interrupt_response=self.interrupt_response,
                                   idle_timeout_ms=self.idle_timeout_ms, **kw)

    def to_dict(self) -> dict:
        d = {"type": self.type}
        if self.semantic:
            d["eagerness"] = self.eagerness
        d |= {"threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms}
        if not self.semantic:
            d["silence_duration_ms"] = self.silence_duration_ms
        return d | {"create_response": self.create_response, "interrupt_response": self.interrupt_response,
                    "idle_timeout_ms": self.idle_timeout_ms}

    @staticmethod
    def parse(value: object, base: TurnDetection | None, param: str) -> TurnDetection | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ProtocolError("turn_detection must be an object or null", param=param)
        t = value.get("type", "server_vad")
        if t not in ("server_vad", "semantic_vad"):
            raise ProtocolError(f"unsupported turn_detection.type {t!r} (use 'server_vad' or 'semantic_vad')",
                                param=f"{param}.type")
        td = copy.copy(base) if base is not None else TurnDetection()
        td.type = t
        if t == "semantic_vad" and "silence_duration_ms" in value:
            raise ProtocolError("turn_detection.silence_duration_ms is not part of semantic_vad (its eagerness sets "
                                "how long it waits); use eagerness, or type server_vad for a fixed silence window",
                                param=f"{param}.silence_duration_ms")
        if "eagerness" in value:
            if t != "semantic_vad":
                raise ProtocolError("turn_detection.eagerness is only part of semantic_vad",
                                    param=f"{param}.eagerness")
            if value["eagerness"] not in EAGERNESS_VALUES:
                raise ProtocolError(f"turn_detection.eagerness must be one of {', '.join(EAGERNESS_VALUES)}, got "
                                    f"{value['eagerness']!r}", param=f"{param}.eagerness")
            td.eagerness = value["eagerness"]
        for name, kind, lo, hi in (("threshold", float, 0.0, 1.0), ("prefix_padding_ms", int, 0, 5000),
                                   ("silence_duration_ms", int, 50, 10_000), ("idle_timeout_ms", int, 1000, 3_600_000)):
            if name in value:
                v = value[name]
                if v is None and name == "idle_timeout_ms":
                    td.idle_timeout_ms = None
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) \
                        or not lo <= v <= hi:
                    raise ProtocolError(f"turn_detection.{name} must be a number in [{lo}, {hi}], got {v!r}",
                                        param=f"{param}.{name}")
                setattr(td, name, kind(v))
        for name in ("create_response", "interrupt_response"):
            if name in value:
                if not isinstance(value[name], bool):
                    raise ProtocolError(f"turn_detection.{name} must be a boolean", param=f"{param}.{name}")
                setattr(td, name, value[name])
        return td


# Names of OpenAI's voices: stock clients send them, and they map onto the server's default (first) voice.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
                           "sage", "shimmer", "verse"})
# Transcription model names a client may ask for: all of them run the server's ASR (its loaded Whisper).
TRANSCRIPTION_MODELS = ("whisper", "whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
MAX_TRANSCRIPTION_PROMPT_CHARS = 2000  # Whisper keeps the last 223 tokens of a prompt anyway
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")


def resolve_voice(v: object, param: str, voices: list[str]) -> str:
    """A local voice name -> itself; an OpenAI voice name -> the default (first) local voice; anything else is
    rejected naming `param`. session.update and response.create both resolve voices here."""
    if isinstance(v, dict):
        v = v.get("id")
    if not isinstance(v, str):
        raise ProtocolError(f"{param} must be a string", param=param)
    if v in voices or not voices:
        return v
    if v in OPENAI_VOICES:
        return voices[0]
    raise ProtocolError(f"unknown voice {v[:64]!r}: use one of {', '.join(voices)} (see /v1/voices) or an OpenAI "
                        f"voice name, which maps to {voices[0]}", param=param)


@dataclass(slots=True)
class Transcription:
    """input_audio_transcription: what the user's audio items report (`...input_audio_transcription.*` events).
    None on the session = off: no transcription events and no transcript on items, though the server still
    transcribes to understand the turn (the LLM hears through the ASR)."""

    model: str = "whisper"
    language: str | None = None  # None: the model's own ("en" for tiny.en; detected by a multilingual model)
    prompt: str = ""  # words that steer the ASR's spelling (names, jargon)

    def to_dict(self) -> dict:
        return {"model": self.model, "language": self.language, "prompt": self.prompt}

    @staticmethod
    def parse(value: object, base: Transcription | None, param: str,
              languages: tuple[str, ...] | None) -> Transcription | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ProtocolError(f"{param} must be an object or null", param=param)
        t = copy.copy(base) if base is not None else Transcription()
        if "model" in value:
            if value["model"] not in TRANSCRIPTION_MODELS:
                raise ProtocolError(f"{param}.model must be one of {', '.join(TRANSCRIPTION_MODELS)} (all run the "
                                    f"server's Whisper)", param=f"{param}.model")
            t.model = value["model"]
        if "language" in value:
            lang = value["language"]
            if lang is not None and (not isinstance(lang, str) or not _LANGUAGE.match(lang)
                                     or languages is not None and lang not in languages):
                known = f": one of {', '.join(languages[:12])}{', ...' if len(languages) > 12 else ''}" \
                    if languages else ""
                raise ProtocolError(f"{param}.language must be a language code the ASR model transcribes{known}",
                                    param=f"{param}.language")
            t.language = lang
        if "prompt" in value:
            prompt = value["prompt"] if value["prompt"] is not None else ""
            if not isinstance(prompt, str) or len(prompt) > MAX_TRANSCRIPTION_PROMPT_CHARS:
                raise ProtocolError(f"{param}.prompt must be a string of at most {MAX_TRANSCRIPTION_PROMPT_CHARS} "
                                    f"characters", param=f"{param}.prompt")
            t.prompt = prompt
        return t


def _modalities(v: object, param: str) -> list[str]:
    if not isinstance(v, list) or not v or any(m not in ("text", "audio") for m in v):
        raise ProtocolError(f"{param} must be ['audio'] or ['text'], got {v!r}", param=param)
    return ["audio"] if "audio" in v else ["text"]


def max_output_tokens(v: object, param: str) -> int | str:
    if v == "inf" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096):
        return v
    raise ProtocolError(f"{param} must be an integer in [1, 4096] or 'inf', got {v!r}", param=param)


def _string(v: object, param: str, max_len: int = 100_000) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError(f"{param} must be a string of at most {max_len} characters", param=param)
    return v


@dataclass(slots=True)
class SessionConfig:
    id: str = ""
    model: str = "voicefast"
    instructions: str = ""
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    input_format: AudioFormat = field(default_factory=AudioFormat)
    output_format: AudioFormat = field(default_factory=AudioFormat)
    voice: str = "default"
    speed: float = 1.0
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    temperature: float = 0.7
    max_output_tokens: int | str = 128
    transcription: Transcription | None = field(default_factory=Transcription)
    tools: ToolSettings = field(default_factory=ToolSettings)  # tools, tool_choice, parallel_tool_calls

    def copy(self) -> SessionConfig:
        return copy.deepcopy(self)

    def apply(self, s: dict, *, beta: bool, voices: list[str], languages: tuple[str, ...] | None = None
              ) -> SessionConfig:
        """Return a new config with `s` (a GA or beta `session` object) applied; raise ProtocolError on bad fields
        (the session is then left unchanged). `languages`: what the ASR transcribes (None: not checked)."""
        if not isinstance(s, dict):
            raise ProtocolError("session must be an object", param="session")
        c = self.copy()
        t = s.get("type")
        if t is not None and t != "realtime":
            raise ProtocolError(f"session.type {t!r} is not supported (use 'realtime')", param="session.type")
        if "instructions" in s:
            c.instructions = _string(s["instructions"], "session.instructions")
        if "model" in s and s["model"] is not None:
            c.model = _string(s["model"], "session.model", 200)
        if "output_modalities" in s:
            c.output_modalities = _modalities(s["output_modalities"], "session.output_modalities")
        if "modalities" in s:
            c.output_modalities = _modalities(s["modalities"], "session.modalities")
        if "max_output_tokens" in s:
            c.max_output_tokens = max_output_tokens(s["max_output_tokens"], "session.max_output_tokens")
        if "max_response_output_tokens" in s:
            c.max_output_tokens = max_output_tokens(s["max_response_output_tokens"],
                                                    "session.max_response_output_tokens")
        if any(k in s for k in ("tools", "tool_choice", "parallel_tool_calls")):
            c.tools = c.tools.apply(s, "session")
        if "temperature" in s:
            v = s["temperature"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 2.0:
                raise ProtocolError("session.temperature must be a number in [0, 2]", param="session.temperature")
            c.temperature = float(v)
        # beta flat fields
        if "input_audio_format" in s:
            c.input_format = AudioFormat.parse(s["input_audio_format"], "session.input_audio_format")
        if "output_audio_format" in s:
            c.output_format = AudioFormat.parse(s["output_audio_format"], "session.output_audio_format")
        if "voice" in s:
            c.voice = resolve_voice(s["voice"], "session.voice", voices)
        if "speed" in s:
            c.speed = self._speed(s["speed"], "session.speed")
        if "turn_detection" in s:
            c.turn_detection = TurnDetection.parse(s["turn_detection"], c.turn_detection, "session.turn_detection")
        if "input_audio_transcription" in s:
            c.transcription = Transcription.parse(s["input_audio_transcription"], c.transcription,
                                                  "session.input_audio_transcription", languages)
        # GA nested audio config
        audio = s.get("audio")
        if audio is not None:
            if not isinstance(audio, dict):
                raise ProtocolError("session.audio must be an object", param="session.audio")
            inp, out = audio.get("input") or {}, audio.get("output") or {}
            if not isinstance(inp, dict) or not isinstance(out, dict):
                raise ProtocolError("session.audio.input/output must be objects", param="session.audio")
            if "format" in inp:
                c.input_format = AudioFormat.parse(inp["format"], "session.audio.input.format")
            if "turn_detection" in inp:
                c.turn_detection = TurnDetection.parse(inp["turn_detection"], c.turn_detection,
                                                       "session.audio.input.turn_detection")
            if "transcription" in inp:
                c.transcription = Transcription.parse(inp["transcription"], c.transcription,
                                                      "session.audio.input.transcription", languages)
            if "format" in out:
                c.output_format = AudioFormat.parse(out["format"], "session.audio.output.format")
            if "voice" in out:
                c.voice = resolve_voice(out["voice"], "session.audio.output.voice", voices)
            if "speed" in out:
                c.speed = self._speed(out["speed"], "session.audio.output.speed")
        return c

    @staticmethod
    def _speed(v: object, param: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.25 <= v <= 1.5:
            raise ProtocolError(f"{param} must be a number in [0.25, 1.5]", param=param)
        return float(v)

    def to_dict(self, *, beta: bool) -> dict:
        td = self.turn_detection.to_dict() if self.turn_detection else None
        tr = self.transcription.to_dict() if self.transcription else None
        if beta:
            return {"id": self.id, "object": "realtime.session", "model": self.model, "modalities":
                    ["text", "audio"] if self.output_modalities == ["audio"] else ["text"],
                    "instructions": self.instructions, "voice": self.voice,
                    "input_audio_format": self.input_format.to_beta(),
                    "output_audio_format": self.output_format.to_beta(),
                    "input_audio_transcription": tr,
                    "turn_detection": td, "temperature": self.temperature,
                    "max_response_output_tokens": self.max_output_tokens, "speed": self.speed,
                    **self.tools.to_dict()}
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
                "output_modalities": list(self.output_modalities), "instructions": self.instructions,
                "audio": {"input": {"format": self.input_format.to_ga(), "turn_detection": td,
                                    "transcription": tr,
                                    "noise_reduction": None},
                          "output": {"format": self.output_format.to_ga(), "voice": self.voice,
                                     "speed": self.speed}},
                "max_output_tokens": self.max_output_tokens, **self.tools.to_dict(),
                "tracing": None, "truncation": "auto", "prompt": None, "include": None}
