"""The real embedded stack behind a RealtimeServer on its own event-loop thread, for the modules that test against
the real models (test_server_real, test_twilio_real, test_fuzz_live): load, warm up, serve on 127.0.0.1:0, and
tear everything down (server, loop thread, engine, ASR pool) however the module ended."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from voicefast.config import ServerConfig


@contextlib.contextmanager
def running_real_server(opts: ServerConfig, name: str) -> Iterator[tuple]:
    """Yields (server, stack, loop): the server runs on `loop` in a daemon thread called `name`."""
    from voicefast.loader import load_stack, warm_up
    from voicefast.persona import DEFAULT_INSTRUCTIONS
    from voicefast.server import RealtimeServer, session_defaults

    stack = load_stack(opts)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        server = RealtimeServer(stack, opts,
                                defaults=session_defaults(opts, DEFAULT_INSTRUCTIONS, stack.voice_names[0]))
        asyncio.run_coroutine_threadsafe(warm_up(stack, DEFAULT_INSTRUCTIONS), loop).result(300)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        try:
            yield server, stack, loop
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        stack.shutdown()
        stack.asr.close()
