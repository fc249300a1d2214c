"""Client events into a session without stalling the event loop: the server/session boundary.

Every session shares one event loop, and the resampling of input audio runs on it (the VAD model on the stack's
VAD threads when it has them: Session.feed_audio_async). One append may carry
up to max_message_bytes of audio (2 MiB: ~44 s of 24 kHz PCM16, ~4 min of G.711); processed at once, that would
stall every other session for its whole duration. So an append is decoded (and validated) whole, then fed in
slices of `inline_audio_ms` with a turn of the event loop between them: the worst stall another session sees is
one slice's VAD + resampling (bench/stall.py measures it). The connection's events stay in order because its
reader awaits this before taking the next message."""

from __future__ import annotations

import asyncio

from voicefast.errors import ProtocolError
from voicefast.protocol import ClientEvent


async def deliver(session, ev: ClientEvent, *, inline_audio_ms: int) -> None:
    """Apply one validated client event to `session` (raises ProtocolError like Session.handle)."""
    if ev.type != "input_audio_buffer.append":
        session.handle(ev)
        return
    fmt = session.cfg.input_format
    try:
        x = fmt.decode(ev.data["audio_bytes"])  # all of it validated before any of it is used
    except ProtocolError as e:
        e.event_id = ev.event_id
        raise
    step = max(1, fmt.rate_hz * inline_audio_ms // 1000)
    for i in range(0, len(x), step):
        if i:
            await asyncio.sleep(0)  # let other sessions run between slices
            if session.closed:
                return
        await session.feed_audio_async(x[i:i + step], event_start=i == 0)
