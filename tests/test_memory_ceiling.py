"""Per-session memory ceiling: a client pushing past each limit gets an `error` (or its turn ended), and the memory
the session holds -- measured with tracemalloc, numpy buffers included -- stays under the worst case
voicefast.budget computes from the limits (the numbers docs/server.md prints), and stops growing."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from fakes import FakeASR, make_stack, silence, speech_like

from voicefast.budget import session_memory_budget
from voicefast.config import ServerConfig
from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat
from voicefast.intake import deliver
from voicefast.protocol import RealtimeProtocol
from voicefast.session import Session
from voicefast.session_config import SessionConfig

pytestmark = pytest.mark.anyio
OPTS = ServerConfig(output_lead_ms=0, max_input_buffer_s=4.0, max_utterance_s=2.0, max_item_bytes=20_000,
                    max_conversation_bytes=60_000, max_conversation_items=20, max_pending_transcriptions=2)


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Pusher:
    def __init__(self):
        self.seen: Counter[str] = Counter()  # event types and error codes; events themselves are not kept
        self.proto = RealtimeProtocol()
        self.session = Session(make_stack(asr=FakeASR(delay_s=0.05)), OPTS, emit=self._emit,
                               defaults=SessionConfig(instructions="Ceiling.", voice="fake"))

    def _emit(self, ev: dict) -> None:
        self.seen[ev["error"]["code"] if ev["type"] == "error" else ev["type"]] += 1

    async def send(self, **ev) -> None:
        try:
            await deliver(self.session, self.proto.receive_message(json.dumps(ev)), inline_audio_ms=500)
        except ProtocolError as e:
            self._emit(e.to_event())

    async def audio(self, x: np.ndarray, chunk_ms: int = 100) -> None:
        n = 24 * chunk_ms
        for i in range(0, len(x), n):
            await self.send(type="input_audio_buffer.append",
                            audio=base64.b64encode(AudioFormat().encode(x[i:i + n])).decode())

    async def push_everything(self, k: int, base: int) -> int:
        """Push each limit `k` times over; returns the most memory held (over `base`) between the pushes."""
        most = 0
        await self.send(type="session.update", session={"audio": {"input": {"turn_detection": None}}})
        await self.audio(speech_like(int(OPTS.max_input_buffer_s * 1000) * k))  # manual mode: buffer cap
        most = max(most, held_bytes() - base)  # the input buffer is full here
        await self.send(type="input_audio_buffer.clear")
        await self.send(type="session.update", session={"audio": {"input": {"turn_detection": {
            "type": "server_vad", "create_response": False}}}})
        await self.audio(speech_like(int(OPTS.max_utterance_s * 1000) * k))  # continuous speech: turn ends
        await self.audio(silence(700))
        for i in range(10 * k):  # text items past the byte and item caps
            await self.send(type="conversation.item.create", item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": f"{i}" + "x" * 19_000}]})
        for _ in range(3 * k):  # audio items past the pending-transcription cap
            await self.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": [
                {"type": "input_audio", "audio": base64.b64encode(AudioFormat().encode(speech_like(1500))).decode()}]})
        most = max(most, held_bytes() - base)  # conversation full, transcriptions pending
        await asyncio.sleep(0.3)  # transcriptions finish
        return max(most, held_bytes() - base)


def held_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_pushing_past_every_limit_holds_at_most_the_budget_and_stops_growing():
    budget = session_memory_budget(OPTS)
    ceiling = sum(budget[k] for k in ("input_buffer", "transcriber", "asr_jobs", "conversation", "responses"))
    tracemalloc.start()
    try:
        p = Pusher()
        p.session.start()
        await asyncio.sleep(0)
        base = held_bytes()
        once = await p.push_everything(3, base)
        again = await p.push_everything(9, base)  # three times as much again
        session = p.session
        await session.close()
        conv_bytes, conv_items = session.conv.text_bytes, len(session.conv.items)
        del p.session, session
        after_close = held_bytes() - base
    finally:
        tracemalloc.stop()
    print(f"\nmost held pushing 3x: {once / 2**20:.2f} MiB, 9x: {again / 2**20:.2f} MiB, after close "
          f"{after_close / 2**20:.2f} MiB; ceiling {ceiling / 2**20:.2f} MiB; {dict(p.seen)}")
    # every limit was hit and said so
    for code in ("input_audio_buffer_full", "conversation_limit_reached", "too_many_pending_transcriptions"):
        assert p.seen[code] > 0, code
    assert p.seen["input_audio_buffer.speech_stopped"] >= 3 * 2  # continuous speech ended turns
    assert 0 < once <= ceiling and again <= ceiling
    assert again - once < 0.25 * ceiling  # bounded: nine times the pushing, no matching growth
    assert after_close < 0.25 * once  # closing gives the buffers back
    assert conv_bytes <= OPTS.max_conversation_bytes and conv_items <= OPTS.max_conversation_items


def test_the_documented_ceiling_is_the_computed_one():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text()
    table = doc[doc.index("### Memory one session can hold"):].split("\n\n")[1]
    documented = [float(row.split("|")[2].strip("*~ ").removesuffix(" MiB")) for row in table.splitlines()[2:]]
    b = session_memory_budget(ServerConfig())
    assert documented[:-1] == [round(v / 2**20, 1) for v in b.values()]
    assert documented[-1] == round(sum(b.values()) / 2**20)
