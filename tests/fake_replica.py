"""One voicefast replica with the test fakes for the models (tests/fakes.py), for routing and drain tests and the
rolling-restart benchmark: the real RealtimeServer and the real `voicefast serve` lifecycle
(voicefast.serve.serve_until_signalled: SIGTERM -> drain -> exit), only ASR/LLM/TTS/VAD are fakes.

    python tests/fake_replica.py --name r1 --port 8001 [--drain-timeout-s 120] [--max-sessions 16]

Every reply names the replica ("This is r1. ..."), so a client can tell where its call landed. Prints
`READY <port>` on stdout once listening."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes import FakeEngine, FakeTTS, make_stack  # noqa: E402

from voicefast.config import ServerConfig  # noqa: E402
from voicefast.serve import serve_until_signalled  # noqa: E402
from voicefast.server import RealtimeServer  # noqa: E402
from voicefast.session_config import SessionConfig  # noqa: E402


def reply_of(name: str):
    return lambda msgs: f"This is {name}. We are open from nine to six, Monday to Saturday. Anything else?"


async def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--drain-timeout-s", type=float, default=120.0)
    ap.add_argument("--max-sessions", type=int, default=16)
    ap.add_argument("--token-s", type=float, default=0.02, help="fake LLM: seconds per token")
    ap.add_argument("--word-s", type=float, default=0.1, help="fake TTS: seconds of audio per word")
    args = ap.parse_args(argv)
    stack = make_stack(engine=FakeEngine(reply_of(args.name), token_s=args.token_s),
                       tts=FakeTTS(word_s=args.word_s))
    opts = ServerConfig(host=args.host, port=args.port, drain_timeout_s=args.drain_timeout_s,
                        max_sessions=args.max_sessions)
    server = RealtimeServer(stack, opts, defaults=SessionConfig(instructions="Test persona.", voice="fake"))
    await server.start()
    print(f"READY {server.port}", flush=True)
    await serve_until_signalled(server)
    stack.shutdown()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
    sys.exit(asyncio.run(main(sys.argv[1:])))
