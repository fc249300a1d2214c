"""`voicefast serve`: flags / VOICEFAST_* env -> ServerConfig -> load the models -> serve until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import fields

from voicefast.config import ServerConfig, env_overrides

log = logging.getLogger("voicefast.serve")

_HELP = {
    "host": "interface to bind (no API keys -> loopback only unless --insecure)",
    "port": "TCP port (0: any free port)",
    "api_keys": "comma-separated API keys accepted as Bearer token or openai-insecure-api-key.<key> subprotocol",
    "allowed_origins": "comma-separated browser origins allowed besides same-origin ('*' = any)",
    "allowed_hosts": "without API keys: comma-separated Host names served besides loopback (DNS-rebinding guard)",
    "max_utterance_s": "continuous speech this long ends the turn (server VAD); longer item audio is refused",
    "inline_audio_ms": "audio of one append processed per event-loop turn (bigger appends are sliced)",
    "connect_rate_per_address_per_min": "connection attempts per client address per minute (0 = off; HTTP 429)",
    "connect_rate_per_key_per_min": "connections per API key per minute (0 = off; HTTP 429)",
    "max_session_s": "a session this old gets error session_expired and close 1008 (0 = off)",
    "llm_model": "LLM: HF checkpoint dir or .gguf (default: embedded SmolLM2)",
    "asr_model": "ASR: faster-whisper model dir or name (default: embedded tiny.en)",
    "tts_voice": "TTS: Piper .onnx voice (default: embedded voice)",
    "vad_model": "VAD: Silero ONNX file (default: bundled with faster-whisper)",
    "drain_timeout_s": "after SIGTERM: seconds live sessions may go on before each is closed (1001) once its "
                       "response in progress is finished (docs/deploy.md)",
    "ready_max_waiting": "/readyz fails while more LLM requests than this wait for a batch slot",
    "tensor_parallel": "split the LLM over this many GPUs of this host (tensor parallelism, NCCL; docs/gpu.md)",
    "llm_prefix_warm": "while a caller speaks, prefill the reply's likely prompt (the conversation + the partial "
                       "transcript) in idle engine time, so the reply prefills only what the final changed "
                       "(default: off; docs/benchmarks.md)",
    "engine_process": "run the LLM engine in its own process, so its steps never wait for the server's GIL "
                      "(default: on where the LLM runs on a GPU, a thread of the server on a CPU host; docs/gpu.md)",
    "turn_model": "end-of-turn model for semantic_vad: Smart Turn v3 .onnx (default: embedded Smart Turn v3.2)",
    "turn_witness": "semantic_vad ends a turn when 'both' the end-of-turn model and the transcript say so, or "
                    "'audio' / 'text' alone (for measuring)",
    "turn_transcript_ms": "semantic_vad: ms of silence before a pause's ASR final and held reply start, ahead of the "
                          "end-of-turn model (default: per eagerness, 64 for auto; 0: with the model)",
    "backchannel_max_ms": "speech during a reply longer than this interrupts it even if it is a backchannel",
    "asr_context_prompt": "give Whisper the conversation (names in the instructions, the last reply) as its prompt",
    "twilio_auth_token": "phone calls on /twilio: validate X-Twilio-Signature with this Twilio auth token",
    "twilio_public_url": "the wss://host Twilio connects to, when a proxy terminates TLS (signature check)",
    "twilio_secret": "phone calls on /twilio: shared secret (/twilio/<secret> or <Parameter name=\"secret\">)",
    "personas_dir": "directory of <name>.toml / <name>.txt personas a phone call selects by name",
    "asr_device": "where Whisper runs: auto (CUDA if CTranslate2 can use it: a GPU and CUDA 12 cuBLAS), cpu, cuda",
    "asr_workers": "concurrent ASR decodes (default: sized for this host, voicefast/host.py)",
    "tts_workers": "concurrent Piper syntheses (default: sized for this host)",
    "gil_switch_interval_us": "sys.setswitchinterval in microseconds: how long a thread may keep the GIL from one "
                              "waiting for it (default: 500 with the LLM on a GPU, Python's 5000 otherwise)",
    "turn_workers": "concurrent end-of-turn model inferences for semantic_vad (default: sized for this host)",
    "vad_threads": "threads running the Silero VAD off the event loop; 0 runs it on the loop (default: sized for "
                   "this host)",
    "max_sessions": "concurrent sessions (default: sized for this host: 4 per core with the LLM on a GPU)",
    "max_num_seqs": "LLM sequences in one batch (default: max_sessions on a GPU, 16 on a CPU)",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="voicefast serve", description="Start the realtime voice server "
                                 "(OpenAI Realtime API at /v1/realtime, demo page at /). Every flag also reads "
                                 "VOICEFAST_<FLAG> from the environment (e.g. VOICEFAST_PORT, VOICEFAST_API_KEYS).")
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=_HELP.get(f.name))
        elif "tuple" in kind:
            ap.add_argument(flag, dest=f.name, default=None, help=_HELP.get(f.name),
                            type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()))
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            ap.add_argument(flag, dest=f.name, type=conv, default=None, help=_HELP.get(f.name, kind))
    ap.add_argument("--api-key", dest="api_key", action="append", help="one API key (repeatable)")
    return ap


def explicit_values(argv: list[str], environ=None) -> dict:
    """The settings given by flag or VOICEFAST_* env (flags win), nothing else."""
    args = build_parser().parse_args(argv)
    values = env_overrides(environ)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "api_key"})
    if args.api_key:
        values["api_keys"] = tuple(values.get("api_keys", ())) + tuple(args.api_key)
    return values


def config_from(argv: list[str], environ=None) -> ServerConfig:
    """ServerConfig from flags and env over the dataclass defaults (no host sizing: see resolve_config)."""
    return ServerConfig(**explicit_values(argv, environ))


def resolve_config(argv: list[str], environ=None, detect=None):
    """(ServerConfig, HostReport): flags and env, then this host's defaults (voicefast.host) for the thread
    counts, worker pools and limits left unset. `detect(device) -> HostFacts` (default: detect_host)."""
    from voicefast.host import detect_host, resolve_host

    values = explicit_values(argv, environ)
    ServerConfig(**values)  # a bad flag or env value fails before the host is probed
    facts = (detect or detect_host)(values.get("device", "auto"))
    values, report = resolve_host(values, facts)
    return ServerConfig(**values), report


async def _run(opts: ServerConfig, host_report=None) -> int:
    from voicefast.loader import freeze_heap, load_stack, log_gc_pauses, warm_up
    from voicefast.persona import DEFAULT_INSTRUCTIONS
    from voicefast.server import RealtimeServer, session_defaults

    sys.setswitchinterval(opts.gil_switch_interval_us / 1e6)
    stack = await asyncio.to_thread(load_stack, opts)
    voice = stack.voice_names[0]
    server = RealtimeServer(stack, opts, defaults=session_defaults(opts, opts.instructions or DEFAULT_INSTRUCTIONS,
                                                                  voice))
    server.models_loaded = False  # /readyz says "loading" until the warm-up is done
    await server.start()
    await warm_up(stack, opts.instructions or DEFAULT_INSTRUCTIONS)
    frozen = freeze_heap()
    log.info("start-up heap frozen: %d objects out of the garbage collector's full passes", frozen)
    log_gc_pauses()
    server.models_loaded = True
    for stage, what in stack.description.items():
        print(f"  {stage.upper():4} {what}")
    if host_report is not None:
        print(f"  {host_report.describe()}")
    print(f"voicefast serving on {server.url}  (Realtime API: ws://{server.url[7:]}v1/realtime)")
    if not opts.api_keys:
        print("  no API keys configured: listening on loopback only; set --api-key / VOICEFAST_API_KEYS to expose it")
    sys.stdout.flush()
    try:
        await serve_until_signalled(server)
    finally:
        stack.shutdown()
    return 0


async def serve_until_signalled(server) -> None:
    """Serve until SIGTERM or SIGINT, then drain (docs/deploy.md): /readyz fails and new upgrades get 503 at
    once, live sessions go on for --drain-timeout-s, then each is closed (1001) after its response in progress.
    A second signal skips the rest of the drain."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    drain: list[asyncio.Task] = []

    def on_signal() -> None:
        if signalled.is_set() and drain:
            print("second signal: closing now", flush=True)
            drain[0].cancel()
        signalled.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await signalled.wait()
    print(f"draining: {len(server.sessions)} live session(s), up to {server.opts.drain_timeout_s:.0f} s", flush=True)
    drain.append(asyncio.create_task(server.drain()))
    with contextlib.suppress(asyncio.CancelledError):
        await drain[0]
    print("shutting down", flush=True)
    await server.close()


def main(argv: list[str] | None = None) -> int:
    try:
        opts, host_report = resolve_config(list(sys.argv[1:] if argv is None else argv))
        opts.check_security()
    except ValueError as e:
        print(f"voicefast serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if opts.log_level.upper() != "DEBUG":
        # websockets logs every plain HTTP request (the demo page, /healthz, /metrics) at INFO as
        # "connection rejected (200 OK)": true for its handshake, misleading in a server log.
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
    from voicefast.assets import MissingAssetError

    try:
        return asyncio.run(_run(opts, host_report))
    except MissingAssetError as e:
        print(f"voicefast serve: a model is missing.\n{e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"voicefast serve: cannot listen on {opts.host}:{opts.port}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
