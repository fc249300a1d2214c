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
    allowed_hosts: tuple[str, ...] = ()  # with no API key, Host names served besides loopback (DNS-rebinding guard)
    demo_dir: str | None = None  # None -> <repo>/demo
    # Models (None -> embedded defaults)
    llm_model: str | None = None
    asr_model: str | None = None
    tts_voice: str | None = None
    vad_model: str | None = None
    turn_model: str | None = None  # end-of-turn model (.onnx) for semantic_vad; None -> embedded Smart Turn v3.2
    device: str = "auto"  # the LLM's (and, with asr_device auto, the ASR's): auto | cpu | cuda
    asr_device: str = "auto"  # auto: CUDA where CTranslate2 can use it (a GPU and CUDA 12 cuBLAS), else CPU
    # Engine limits
    max_num_seqs: int = 16
    max_model_len: int | None = None
    num_kv_blocks: int | None = None
    max_waiting: int = 64
    tensor_parallel: int = 1  # GPUs one model is split over (Megatron-style, one process per GPU; llm_engine.parallel)
    # The engine in its own process (llm_engine.engine_process): its steps never wait for this process's GIL.
    # voicefast.host turns it on where the LLM runs on a GPU (measured: docs/gpu.md); a thread here (the 2-core value)
    engine_process: bool = False
    # Session limits
    max_sessions: int = 16
    max_message_bytes: int = 1 << 21  # websockets max_size; one append of 15 MiB is OpenAI's cap, ours is lower
    max_input_buffer_s: float = 60.0  # per-session uncommitted input audio
    idle_timeout_s: float = 300.0  # no client frame for this long -> close
    max_send_queue: int = 256  # outgoing events buffered per session before the reader is deemed hopeless
    max_send_queue_bytes: int = 4 << 20  # ... or this many bytes of them
    max_receive_queue: int = 4  # incoming frames buffered per connection (each <= max_message_bytes)
    max_utterance_s: float = 30.0  # continuous speech (or noise) this long ends the turn (at most max_input_buffer_s)
    max_item_bytes: int = 100_000  # UTF-8 text of one conversation item (client-created)
    max_conversation_items: int = 500  # items per session (server turns evict the oldest, client items get an error)
    max_conversation_bytes: int = 1_000_000  # text of all items of a session (same policy)
    max_pending_transcriptions: int = 2  # queued audio-item/commit transcriptions per session (more: an error)
    inline_audio_ms: int = 200  # audio of one append processed per event-loop turn (a big append is sliced)
    # Readiness and drain (docs/deploy.md)
    drain_timeout_s: float = 120.0  # after SIGTERM, live sessions may go on this long; then each is closed (1001)
    ready_max_waiting: int = 8  # /readyz fails while more LLM requests than this wait for a batch slot
    # Abuse limits (0 = off)
    connect_rate_per_address_per_min: int = 120  # connection attempts per client address (HTTP 429 beyond)
    connect_rate_per_key_per_min: int = 600  # connections per API key (HTTP 429 beyond)
    max_session_s: float = 3600.0  # a session this old gets `session_expired` and close 1008
    # Turn-taking and output
    barge_in_min_ms: int = 300  # user speech during a response must last this long to interrupt it
    backchannel_max_ms: int = 900  # ... and interrupts whatever it says once it lasts this long ("mm-hm" does not)
    turn_witness: str = "both"  # semantic_vad: "both" (model and transcript agree), "audio" or "text" alone
    asr_context_prompt: bool = True  # the conversation (names, last reply) as Whisper's prompt
    speculative_start: bool = True  # start ASR final + LLM at the VAD's early silence, hold output
    # semantic_vad: silence before a pause's transcript (and the held reply on it) starts, ahead of the end-of-turn
    # model (None: the eagerness' own, voicefast.turns.EAGERNESS; 0: together with the model; capped at its check)
    turn_transcript_ms: int | None = None
    output_frame_ms: int = 100  # audio per response.output_audio.delta
    output_lead_ms: int = 300  # how far ahead of real-time playout audio may be sent
    # The first phrase goes to TTS after at most this many words (speech starts early; a dangling "the"/"to" waits
    # for the next word). 2, not 4: once the end-of-turn check answers within ~150 ms of silence, the LLM tokens
    # and Piper time of two more words are most of what is left of the chain (docs/benchmarks.md).
    tts_first_phrase_words: int = 2
    asr_partial_interval_ms: int = 800  # streaming partials at most this often per speaking session (0: off)
    # prefill the likely reply prompt (conversation + published partial words) while the caller speaks, in idle
    # engine time, so the reply prefills only what the final changed (voicefast.prefix_warm; needs partials).
    # Off by default: on the 2-core VM it cut LLM TTFT p50 142 -> 110 ms but the end-to-end p50 stayed within
    # noise (docs/benchmarks.md); off until it is shown to win end to end
    llm_prefix_warm: bool = False
    max_output_tokens: int = 96  # default per response
    tool_call_max_tokens: int = 256  # a tool call's own budget (forced: the whole reply; auto: from the call on)
    temperature: float = 0.3  # the small default model wanders at higher temperatures
    instructions: str | None = None  # None -> the built-in persona (voicefast/persona.py)
    # Phone calls: Twilio Media Streams at /twilio (docs/phone.md)
    personas_dir: str | None = None  # <name>.toml / <name>.txt personas a call selects by name
    twilio_secret: str | None = None  # shared secret: /twilio/<secret>, ?secret= or customParameters.secret
    twilio_auth_token: str | None = None  # validate X-Twilio-Signature on the upgrade with this auth token
    twilio_public_url: str | None = None  # the URL Twilio connects to (wss://host), when a proxy terminates TLS
    twilio_greeting: str = "Thank you for calling. How can I help you today?"  # "" = none; personas override
    twilio_busy_text: str = "All of our lines are busy right now. Please call again in a few minutes."
    twilio_reprompt_after_s: float = 10.0  # caller silence before a re-prompt (0: never)
    twilio_reprompt_text: str = "Are you still there?"
    twilio_max_reprompts: int = 2  # unanswered re-prompts before the goodbye and hang-up
    twilio_goodbye_text: str = "I can't hear anyone on the line, so I will end the call now. Goodbye."
    twilio_dtmf_pause_ms: int = 1500  # keypad digits closer together than this are one group ('#' ends one too)
    twilio_chunk_ms: int = 100  # assistant audio between two marks (the precision of what-was-heard)
    # Silero hears phone-band speech less surely, worst after a long silence (the caller listening): late, split
    # or missed (`voicefast bench phone`, docs/phone.md). Phone calls use a lower threshold and keep more audio
    # before the detected start for the ASR.
    twilio_vad_threshold: float = 0.4
    twilio_prefix_padding_ms: int = 1000
    # CPU budget per stage (threads) and worker pools. `voicefast serve` sizes these (and max_sessions,
    # max_num_seqs, max_waiting) for its host unless set (voicefast/host.py); these are the 2-core values.
    torch_threads: int = 1
    asr_cpu_threads: int = 1
    asr_workers: int = 1  # concurrent ASR decodes (finals before partials; voicefast.host sizes it per host)
    tts_threads: int = 1
    tts_workers: int = 1  # concurrent Piper syntheses shared by every session
    vad_threads: int = 1  # threads running the Silero VAD off the event loop (0: on the event loop)
    turn_workers: int = 1  # concurrent end-of-turn model inferences (semantic_vad checks), one thread each
    # how long a Python thread may hold the GIL while another waits for it (sys.setswitchinterval); Python's 5 ms
    # here, 0.5 ms with the LLM on a GPU (voicefast/host.py: the engine thread's eager prefill waited for it)
    gil_switch_interval_us: int = 5000
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
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.ready_max_waiting < 0:
            raise ValueError(f"ready_max_waiting must be >= 0, got {self.ready_max_waiting}")
        if not 50 <= self.gil_switch_interval_us <= 100_000:
            raise ValueError(f"gil_switch_interval_us must be in [50, 100000], got {self.gil_switch_interval_us}")
        if self.turn_workers < 1:
            raise ValueError(f"turn_workers must be >= 1, got {self.turn_workers}")
        if self.vad_threads < 0:
            raise ValueError(f"vad_threads must be >= 0 (0: the VAD runs on the event loop), got {self.vad_threads}")
        for name in ("torch_threads", "asr_cpu_threads", "asr_workers", "tts_threads", "tts_workers",
                     "max_num_seqs", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.asr_device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"asr_device must be 'auto', 'cpu' or 'cuda', got {self.asr_device!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if not 16 <= self.tool_call_max_tokens <= 4096:
            raise ValueError(f"tool_call_max_tokens must be in [16, 4096], got {self.tool_call_max_tokens}")
        if self.barge_in_min_ms < 0:
            raise ValueError(f"barge_in_min_ms must be >= 0, got {self.barge_in_min_ms}")
        if self.backchannel_max_ms < self.barge_in_min_ms:
            raise ValueError(f"backchannel_max_ms ({self.backchannel_max_ms}) must be >= barge_in_min_ms "
                             f"({self.barge_in_min_ms})")
        if self.turn_transcript_ms is not None and not 0 <= self.turn_transcript_ms <= 2000:
            raise ValueError(f"turn_transcript_ms must be in [0, 2000], got {self.turn_transcript_ms}")
        if self.turn_witness not in ("both", "audio", "text"):
            raise ValueError(f"turn_witness must be 'both', 'audio' or 'text', got {self.turn_witness!r}")
        if self.twilio_reprompt_after_s < 0 or self.twilio_max_reprompts < 0 or self.twilio_dtmf_pause_ms < 100:
            raise ValueError("twilio_reprompt_after_s and twilio_max_reprompts must be >= 0 and "
                             "twilio_dtmf_pause_ms >= 100")
        if not 0.0 < self.twilio_vad_threshold < 1.0 or not 0 <= self.twilio_prefix_padding_ms <= 5000:
            raise ValueError(f"twilio_vad_threshold must be in (0, 1) and twilio_prefix_padding_ms in [0, 5000], got "
                             f"{self.twilio_vad_threshold}, {self.twilio_prefix_padding_ms}")
        if not 20 <= self.twilio_chunk_ms <= 1000 or self.twilio_chunk_ms % 20:
            raise ValueError(f"twilio_chunk_ms must be a multiple of 20 in [20, 1000], got {self.twilio_chunk_ms}")
        if self.twilio_public_url and not self.twilio_public_url.startswith(("wss://", "ws://")):
            raise ValueError(f"twilio_public_url must be a wss:// URL, got {self.twilio_public_url!r}")
        for name in ("max_send_queue", "max_send_queue_bytes", "max_receive_queue", "max_item_bytes",
                     "max_conversation_items", "max_conversation_bytes", "max_pending_transcriptions",
                     "inline_audio_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_utterance_s <= 0 or self.max_input_buffer_s <= 0:
            raise ValueError("max_utterance_s and max_input_buffer_s must be > 0")
        if self.max_item_bytes > self.max_conversation_bytes:
            raise ValueError("max_item_bytes must be <= max_conversation_bytes")
        self.api_keys = tuple(k for k in self.api_keys if k)
        self.allowed_origins = tuple(o.rstrip("/") for o in self.allowed_origins if o)
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())

    @property
    def loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def turn_policy_kw(self) -> dict:
        """The server's settings of voicefast.turns.TurnPolicy that also decide the VAD's early silence."""
        return {} if self.turn_transcript_ms is None else {"transcript_ms": self.turn_transcript_ms}

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


