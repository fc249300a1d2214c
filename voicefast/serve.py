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


def config_from(argv: list[str], environ=None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    values = env_overrides(environ)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "api_key"})
    if args.api_key:
        values["api_keys"] = tuple(values.get("api_keys", ())) + tuple(args.api_key)
    return ServerConfig(**values)


async def _run(opts: ServerConfig) -> int:
    from voicefast.loader import load_stack, warm_up
    from voicefast.persona import DEFAULT_INSTRUCTIONS
    from voicefast.server import RealtimeServer, session_defaults

    stack = await asyncio.to_thread(load_stack, opts)
    voice = stack.voice_names[0]
    await warm_up(stack, opts.instructions or DEFAULT_INSTRUCTIONS)
    server = RealtimeServer(stack, opts, defaults=session_defaults(opts, opts.instructions or DEFAULT_INSTRUCTIONS,
                                                                  voice))
    await server.start()
    for stage, what in stack.description.items():
        print(f"  {stage.upper():4} {what}")
    print(f"voicefast serving on {server.url}  (Realtime API: ws://{server.url[7:]}v1/realtime)")
    if not opts.api_keys:
        print("  no API keys configured: listening on loopback only; set --api-key / VOICEFAST_API_KEYS to expose it")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down")
    await server.close()
    stack.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        opts = config_from(list(sys.argv[1:] if argv is None else argv))
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
        return asyncio.run(_run(opts))
    except MissingAssetError as e:
        print(f"voicefast serve: a model is missing.\n{e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"voicefast serve: cannot listen on {opts.host}:{opts.port}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
