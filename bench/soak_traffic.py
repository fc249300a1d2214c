"""The soak's callers: each worker loops over the scenarios until the deadline, one session per scenario. Speech is
sent at real-time pace in 20 ms frames (bench/voice's Piper-spoken prompts), with silence frames after it, as a
microphone would."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from bench.voice.utterances import FRAME_MS, FRAME_SAMPLES

SILENCE = base64.b64encode(bytes(FRAME_SAMPLES * 2)).decode()
DONE = "response.done"
AUDIO = "response.output_audio.delta"


class Client:
    """One session: a reader task queues every event; helpers speak and wait for event types."""

    def __init__(self, ws):
        self.ws = ws
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())
        self.mic_quiet = asyncio.Event()

    @classmethod
    async def open(cls, url: str) -> Client:
        from websockets.asyncio.client import connect

        ws = await connect(url, subprotocols=["realtime"], max_size=None, open_timeout=30, compression=None)
        c = cls(ws)
        await c.wait("session.created")
        return c

    async def _read(self) -> None:
        async for msg in self.ws:
            await self.events.put(json.loads(msg))

    async def send(self, event: dict | str) -> None:
        await self.ws.send(event if isinstance(event, str) else json.dumps(event))

    async def speak(self, utt, trail_ms: int = 0) -> None:
        """The utterance at real-time pace, then trail_ms of silence."""
        frame_bytes = FRAME_SAMPLES * 2
        pcm = utt.pcm + bytes(frame_bytes * (trail_ms // FRAME_MS))
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), frame_bytes)):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(pcm[i:i + frame_bytes]).decode()})
            await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME_MS / 1000 - time.monotonic()))

    async def silence_until(self, stop: asyncio.Event) -> None:
        t0, k = time.monotonic(), 0
        while not stop.is_set():
            await self.send({"type": "input_audio_buffer.append", "audio": SILENCE})
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * FRAME_MS / 1000 - time.monotonic()))

    async def wait(self, t: str, timeout_s: float = 120.0) -> dict:
        async with asyncio.timeout(timeout_s):
            while True:
                ev = await self.events.get()
                if ev["type"] == t:
                    return ev

    async def turn(self, utt, until: str = DONE) -> dict:
        """Speak, keep the microphone open (silence) until `until` arrives."""
        await self.speak(utt)
        stop = asyncio.Event()
        mic = asyncio.create_task(self.silence_until(stop))
        try:
            return await self.wait(until)
        finally:
            stop.set()
            await mic

    async def close(self, abort: bool = False) -> None:
        if abort:
            self.ws.transport.abort()  # vanish without a closing handshake
        else:
            await self.ws.close()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def turns(c: Client, utts, k: int) -> str:
    for j in range(2):
        await c.turn(utts[(k + j) % len(utts)])
    return "turns"


async def barge_in(c: Client, utts, k: int) -> str:
    await c.turn(utts[k % len(utts)], until=AUDIO)
    await c.speak(utts[(k + 1) % len(utts)])  # talk over the answer
    stop = asyncio.Event()
    mic = asyncio.create_task(c.silence_until(stop))
    try:
        first = await c.wait(DONE)
        second = await c.wait(DONE)
    finally:
        stop.set()
        await mic
    return f"barge_in:{first['response']['status']}/{second['response']['status']}"


async def vanish(c: Client, utts, k: int) -> str:
    await c.turn(utts[k % len(utts)], until=AUDIO)
    await c.close(abort=True)
    return "vanished_mid_response"


async def manual(c: Client, utts, k: int) -> str:
    await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "turn_detection": None}}}})
    await c.wait("session.updated")
    await c.speak(utts[k % len(utts)])
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait(DONE)
    return f"manual:{done['response']['status']}"


BAD_INPUT = ["{not json", json.dumps({"type": "no.such.event"}), json.dumps({"type": "input_audio_buffer.append",
                                                                           "audio": "!!notbase64"}),
             json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                 {"type": "input_audio", "audio": "%%%"}]}}),
             json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                 {"type": "input_text", "text": "x" * 200_000}]}}),
             json.dumps({"type": "response.create", "response": {"voice": "no-such-voice"}}),
             json.dumps({"type": "session.update", "session": {"audio": {"input": {"transcription": {
                 "language": "zz"}}}}}),
             json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0,
                         "audio_end_ms": 10})]


async def bad_input(c: Client, utts, k: int) -> str:
    for frame in BAD_INPUT:
        await c.send(frame)
        await c.wait("error", 30)
    await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What time do you open on Saturday?"}]}})
    await c.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
    done = await c.wait(DONE)
    return f"bad_input:{done['response']['status']}"


SCENARIOS = [("turns", turns), ("barge_in", barge_in), ("vanish", vanish), ("manual", manual),
             ("bad_input", bad_input)]


async def run_worker(url: str, w: int, utts, deadline: float, tally: dict[str, int]) -> None:
    k = w
    while time.monotonic() < deadline:
        name, fn = SCENARIOS[k % len(SCENARIOS)]
        try:
            c = await Client.open(url)
            try:
                outcome = await fn(c, utts, k)
            finally:
                if not c.ws.transport.is_closing():
                    await c.close()
        except Exception as e:  # noqa: BLE001 - a failed scenario is a finding, recorded, and the soak goes on
            outcome = f"{name}:failed:{type(e).__name__}"
        tally[outcome] = tally.get(outcome, 0) + 1
        k += 1
