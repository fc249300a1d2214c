"""The most memory one session can hold, per component, from the server's limits (docs/server.md prints the
defaults; tests/test_memory_ceiling.py pushes past each limit and measures against these numbers). Pure arithmetic,
worst cases: G.711 (one byte a sample, the most audio per message) and UCS-4 strings."""

from __future__ import annotations

from voicefast.config import ServerConfig

RATE_HZ = 16_000
F32 = 4
OUT_RATE_HZ = 24_000  # the highest output rate a client can choose
MAX_RESPONSES = 3  # running + queued + speculative (Session._supersede)
MAX_RESPONSE_TOKENS = 4096
SPEECH_AHEAD_S = 10.0 + 10.0  # SpeechOutput.max_queued_ms plus one long phrase
INPUT_ARRIVALS = 4096 * 100  # InputBuffer's arrival-time deque, ~100 B an entry
PREFIX_PAD_S = 5.0  # the longest prefix_padding_ms a session may set


def session_memory_budget(opts: ServerConfig) -> dict[str, int]:
    """Component -> worst-case bytes held by one session under `opts`."""
    utterance_s = min(opts.max_utterance_s, opts.max_input_buffer_s)
    msg_samples = opts.max_message_bytes * 3 // 4  # base64 -> bytes -> G.711 samples
    return {
        # websockets holds up to max_receive_queue frames (str) before TCP backpressure
        "receive_queue": opts.max_receive_queue * opts.max_message_bytes,
        # the frame being handled: its str and JSON object, the decoded bytes and float32 samples (fed in slices),
        # or an item's audio resampled whole (at most max_utterance_s)
        "message_in_flight": 2 * opts.max_message_bytes + msg_samples + msg_samples * F32
        + int(utterance_s * RATE_HZ * F32),
        "input_buffer": int(opts.max_input_buffer_s * RATE_HZ * F32) + INPUT_ARRIVALS,
        "transcriber": int((utterance_s + PREFIX_PAD_S + 2) * RATE_HZ * F32),
        # queued finals: the client's commits/items, the VAD turn's final and a speculative one
        "asr_jobs": int((opts.max_pending_transcriptions + 2) * (utterance_s + PREFIX_PAD_S) * RATE_HZ * F32),
        "conversation": opts.max_conversation_bytes * 4 + opts.max_conversation_items * 600,
        "send_queue": opts.max_send_queue_bytes,
        "responses": MAX_RESPONSES * (int(SPEECH_AHEAD_S * OUT_RATE_HZ * F32) + MAX_RESPONSE_TOKENS * 16),
    }


def format_budget(opts: ServerConfig) -> str:
    b = session_memory_budget(opts)
    rows = [f"| {k} | {v / 2**20:.1f} MiB |" for k, v in b.items()]
    return "\n".join(["| component | worst case |", "|---|---|", *rows,
                      f"| **total per session** | **{sum(b.values()) / 2**20:.1f} MiB** |"])
