"""Twilio Media Streams messages in the exact recorded shapes Twilio sends (twilio.com/docs/voice/media-streams/
websocket-messages), and a scripted phone call over a real WebSocket: a microphone sending 20 ms mu-law frames at
real time and a handset (bench.voice.handset) that plays what it receives and echoes marks as Twilio does."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time

import numpy as np

from audio.codecs import ulaw_encode
from audio.resample import resample
from bench.voice.handset import Handset

ACCOUNT_SID = "AC" + "1" * 32
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law


class TwilioMessages:
    """Builds what Twilio sends for one stream, numbering messages like Twilio does."""

    def __init__(self, stream_sid: str = "MZ" + "a" * 32, call_sid: str = "CA" + "b" * 32):
        self.stream_sid, self.call_sid = stream_sid, call_sid
        self._seq = itertools.count(1)
        self._chunk = itertools.count(1)
        self.timestamp_ms = 0

    def connected(self) -> str:
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, params: dict | None = None, media_format: dict | None = None) -> str:
        return json.dumps({"event": "start", "sequenceNumber": str(next(self._seq)), "start": {
            "accountSid": ACCOUNT_SID, "streamSid": self.stream_sid, "callSid": self.call_sid, "tracks": ["inbound"],
            "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": params or {}}, "streamSid": self.stream_sid})

    def media(self, ulaw: bytes) -> str:
        msg = {"event": "media", "sequenceNumber": str(next(self._seq)), "media": {
            "track": "inbound", "chunk": str(next(self._chunk)), "timestamp": str(self.timestamp_ms),
            "payload": base64.b64encode(ulaw).decode()}, "streamSid": self.stream_sid}
        self.timestamp_ms += len(ulaw) // 8
        return json.dumps(msg)

    def mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "sequenceNumber": str(next(self._seq)), "streamSid": self.stream_sid,
                           "mark": {"name": name}})

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": str(next(self._seq)),
                           "dtmf": {"track": "inbound_track", "digit": digit}})

    def stop(self) -> str:
        return json.dumps({"event": "stop", "sequenceNumber": str(next(self._seq)), "streamSid": self.stream_sid,
                           "stop": {"accountSid": ACCOUNT_SID, "callSid": self.call_sid}})


def to_ulaw_frames(x: np.ndarray, rate_hz: int) -> list[bytes]:
    """float32 audio at rate_hz -> 20 ms mu-law 8 kHz frames (the last one padded with silence)."""
    y = resample(np.asarray(x, np.float32), rate_hz, 8000)
    y = np.concatenate([y, np.zeros(-len(y) % FRAME_BYTES, np.float32)])
    b = ulaw_encode(y)
    return [b[i:i + FRAME_BYTES] for i in range(0, len(b), FRAME_BYTES)]


SILENCE = ulaw_encode(np.zeros(FRAME_BYTES, np.float32))


class ScriptedCall:
    """One call over a real WebSocket. The microphone sends a 20 ms frame every 20 ms (queued speech, else
    silence); the handset echoes each mark when the audio before it has played (all pending ones at a clear).
    Everything the server sends is kept in `received` with its arrival time."""

    def __init__(self, ws, params: dict | None = None, msgs: TwilioMessages | None = None):
        self.ws = ws
        self.tw = msgs or TwilioMessages()
        self.params = params or {}
        self.handset = Handset()
        self.received: list[tuple[float, dict]] = []
        self.echoed: list[tuple[float, str]] = []  # marks this handset echoed as played (not the clear's)
        self._mic: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.closed = asyncio.Event()

    async def begin(self) -> None:
        await self.ws.send(self.tw.connected())
        await self.ws.send(self.tw.start(self.params))
        self._tasks = [asyncio.create_task(self._mic_loop()), asyncio.create_task(self._listen()),
                       asyncio.create_task(self._echo_loop())]

    def say(self, frames: list[bytes]) -> None:
        for f in frames:
            self._mic.put_nowait(f)

    async def send(self, frame: str) -> None:
        await self.ws.send(frame)

    async def _mic_loop(self) -> None:
        t_next = time.monotonic()
        while True:
            frame = self._mic.get_nowait() if not self._mic.empty() else SILENCE
            await self.ws.send(self.tw.media(frame))
            t_next += 0.02
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def _listen(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                msg = json.loads(raw)
                self.received.append((now, msg))
                for name in self.handset.on_frame(msg, now):  # a clear: Twilio echoes the pending marks
                    await self.ws.send(self.tw.mark(name))
        finally:
            self.closed.set()

    async def _echo_loop(self) -> None:
        while True:
            now = time.monotonic()
            for name in self.handset.due(now):
                self.echoed.append((now, name))
                await self.ws.send(self.tw.mark(name))
            await asyncio.sleep(0.005)

    def of(self, event: str) -> list[dict]:
        return [m for _, m in self.received if m.get("event") == event]

    def marks_sent(self) -> list[str]:
        return [m["mark"]["name"] for m in self.of("mark")]

    async def wait(self, predicate, timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.01)

    async def stop(self, send_stop: bool = True, timeout_s: float = 10.0) -> None:
        """Hang up (Twilio's `stop`) and wait until the server has closed the socket."""
        self._tasks[0].cancel()  # the microphone first: nothing after `stop`
        if send_stop and not self.closed.is_set():
            await self.ws.send(self.tw.stop())
            async with asyncio.timeout(timeout_s):
                await self.closed.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
