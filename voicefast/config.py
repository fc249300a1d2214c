"""Server-wide configuration: flags and VOICEFAST_* environment variables -> ServerConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(slots=True)
class ServerConfig:
    # Network
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty -> no auth, and only a loopback host is allowed (unless insecure)
    insecure: bool = False  # allow a non-loopback host without API keys
    allowed_origins: tuple[str, ...] = ()  # browser Origin allowlist ("*" = any); same-origin always allowed
    demo_dir: str | None = None  # None -> <repo>/demo
    # Models (None -> embedded defaults)
    llm_model: str | None = None
    asr_model: str | None = None
    tts_voice: str | None = None
    vad_model: str | None = None
    device: str = "auto"
    # Engine limits
    max_num_seqs: int = 16
    max_model_len: int | None = None
    num_kv_blocks: int | None = None
    max_waiting: int = 64
    # Session limits
    max_sessions: int = 16
    max_message_bytes: int = 1 << 21  # websockets max_size; one append of 15 MiB is OpenAI's cap, ours is lower
    max_input_buffer_s: float = 60.0  # per-session uncommitted input audio
    idle_timeout_s: float = 300.0  # no client frame for this long -> close
    max_send_queue: int = 256  # outgoing events buffered per session before the reader is deemed hopeless
    # Turn-taking and output
    barge_in_min_ms: int = 300  # user speech during a response must last this long to interrupt it
    speculative_start: bool = True  # start ASR final + LLM at the VAD's early silence, hold output
    output_frame_ms: int = 100  # audio per response.output_audio.delta
    output_lead_ms: int = 300  # how far ahead of real-time playout audio may be sent
    tts_first_phrase_words: int = 4  # the first phrase goes to TTS after at most this many words (speech starts early)
    asr_partial_interval_ms: int = 800  # streaming partials at most this often per speaking session (0: off)
    max_output_tokens: int = 96  # default per response
    tool_call_max_tokens: int = 256  # a tool call's own budget (forced: the whole reply; auto: from the call on)
    temperature: float = 0.3  # the small default model wanders at higher temperatures
    instructions: str | None = None  # None -> the built-in persona (voicefast/persona.py)
    # CPU budget per stage (threads)
    torch_threads: int = 1
    asr_cpu_threads: int = 1
    tts_threads: int = 1
    vad_threads: int = 1
    # Logging
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.output_lead_ms < 0 or self.output_frame_ms < 10:
            raise ValueError("output_lead_ms must be >= 0 and output_frame_ms >= 10")
        if self.tts_first_phrase_words < 1:
            raise ValueError(f"tts_first_phrase_words must be >= 1, got {self.tts_first_phrase_words}")
        if not 16 <= self.tool_call_max_tokens <= 4096:
            raise ValueError(f"tool_call_max_tokens must be in [16, 4096], got {self.tool_call_max_tokens}")
        if self.barge_in_min_ms < 0:
            raise ValueError(f"barge_in_min_ms must be >= 0, got {self.barge_in_min_ms}")
        self.api_keys = tuple(k for k in self.api_keys if k)
        self.allowed_origins = tuple(o.rstrip("/") for o in self.allowed_origins if o)

    @property
    def loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def check_security(self) -> None:
        """Refuse to expose an unauthenticated server beyond this machine unless explicitly told to."""
        if not self.api_keys and not self.loopback_only and not self.insecure:
            raise ValueError(f"refusing to listen on {self.host!r} without API keys: set --api-key / "
                             f"VOICEFAST_API_KEYS, or pass --insecure to allow it")


def _convert(kind: str, raw: str):
    if "tuple" in kind:
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if "bool" in kind:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if "int" in kind and raw.strip().lower() in ("", "none"):
        return None
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw


def env_overrides(environ: dict[str, str] | None = None) -> dict:
    """VOICEFAST_<FIELD> (upper case) for every ServerConfig field, e.g. VOICEFAST_PORT, VOICEFAST_API_KEYS=a,b."""
    env = os.environ if environ is None else environ
    out = {}
    for f in fields(ServerConfig):
        key = "VOICEFAST_" + f.name.upper()
        if key in env:
            try:
                out[f.name] = _convert(str(f.type), env[key])
            except ValueError:
                raise ValueError(f"{key}={env[key]!r} is not a valid {f.type}") from None
    return out


