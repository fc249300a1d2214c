"""One simulated phone caller on /twilio: Twilio's Media Streams messages (connected, start, 20 ms mu-law 8 kHz
media frames at real time, stop) and a handset that plays what comes back and echoes each mark when its audio
has played, all pending ones at a `clear` (bench.voice.handset), as Twilio does.

The anchor and e2e are defined as for the Realtime caller (bench/voice/caller.py): the real-time send slot of
the frame holding the utterance's last voiced sample, to the first reply audio byte received. A reply ends at
its `end:<status>:<n>` mark; the caller hears it out (handset playback) and pauses think_ms before speaking
again. At the start it waits for a greeting (if the server says one) to be heard out. Twilio carries no
transcripts or server timings, so those columns stay empty for this transport."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time

import numpy as np

from bench.voice.caller import CallerConfig, TurnRecord, wait_turn
from bench.voice.handset import Handset
from bench.voice.utterances import RATE_HZ, Utterance

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
GREETING_WAIT_S = 3.0  # how long to listen for a greeting before the first turn


def ulaw_frames(utt: Utterance) -> tuple[list[bytes], int]:
    """The utterance as 20 ms mu-law 8 kHz frames (anti-aliased), and the index of the frame holding its last
    voiced sample."""
    from audio.codecs import ulaw_encode
    from audio.resample import resample

    x = np.frombuffer(utt.pcm, "<i2").astype(np.float32) / 32768.0
    y = resample(x, RATE_HZ, 8000)
    y = np.concatenate([y, np.zeros(-len(y) % FRAME_BYTES, np.float32)])
    b = ulaw_encode(y)
    end8 = -(-utt.speech_end_sample * 8000 // RATE_HZ)  # ceil: the sample holding the end of speech
    return [b[i:i + FRAME_BYTES] for i in range(0, len(b), FRAME_BYTES)], max(0, end8 - 1) // FRAME_BYTES


class _Turn:
    def __init__(self, rec: TurnRecord):
        self.rec = rec
        self.t_anchor: float | None = None
        self.t_first_audio: float | None = None
        self.audio_bytes = 0
        self.done = asyncio.Event()


class TwilioCaller:
    """`await TwilioCaller(cfg, session_id).run(utterances, turns, concurrency_fn, on_turn, wer_fn)`."""

    def __init__(self, cfg: CallerConfig, session_id: int, params: dict | None = None):
        self.cfg, self.session_id = cfg, session_id
        self.params = params or {}
        self.stream_sid = f"MZbench{session_id:026d}"
        self.handset = Handset()
        self._seq = itertools.count(1)
        self._mic: asyncio.Queue = asyncio.Queue()
        self._turn: _Turn | None = None
        self._greeting_end: float | None = None  # when the greeting will have played
        self._heard_any = asyncio.Event()
        self.errors: list[str] = []

    def _msg(self, event: str, **body) -> str:
        return json.dumps({"event": event, "sequenceNumber": str(next(self._seq)), "streamSid": self.stream_sid,
                           **body})

    async def run(self, utterances: list[Utterance], turns: int, concurrency_fn, on_turn, wer_fn) -> list[TurnRecord]:
        from websockets.asyncio.client import connect

        ws = await connect(self.cfg.url, max_size=None, open_timeout=self.cfg.open_timeout_s, compression=None)
        records: list[TurnRecord] = []
        try:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(self._msg("start", start={
                "accountSid": "AC" + "0" * 32, "streamSid": self.stream_sid, "callSid": f"CAbench{self.session_id}",
                "tracks": ["inbound"], "customParameters": self.params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}))
            tasks = [asyncio.create_task(self._mic_loop(ws)), asyncio.create_task(self._echo_loop(ws))]
            listener = asyncio.create_task(self._listen(ws))
            try:
                await self._hear_greeting()
                for k in range(turns):
                    utt = utterances[(self.session_id + k) % len(utterances)]
                    rec = TurnRecord(self.session_id, k, concurrency_fn(), utt.text, utterance_ms=utt.duration_ms)
                    await self._one_turn(utt, rec, listener)
                    records.append(rec)
                    on_turn(rec)
                    if rec.status != "ok":
                        break
                await ws.send(self._msg("stop", stop={"accountSid": "AC" + "0" * 32,
                                                      "callSid": f"CAbench{self.session_id}"}))
            finally:
                for t in [*tasks, listener]:
                    t.cancel()
                await asyncio.gather(*tasks, listener, return_exceptions=True)
        finally:
            await ws.close()
        return records

    async def _hear_greeting(self) -> None:
        """A greeting, if any, starts within GREETING_WAIT_S; the first question waits until it has played."""
        try:
            await asyncio.wait_for(self._heard_any.wait(), GREETING_WAIT_S)
        except TimeoutError:
            return
        deadline = time.monotonic() + self.cfg.turn_timeout_s
        while self._greeting_end is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._greeting_end is not None:
            await asyncio.sleep(max(0.0, self._greeting_end - time.monotonic()) + self.cfg.think_ms / 1000)

    async def _one_turn(self, utt: Utterance, rec: TurnRecord, listener: asyncio.Task) -> None:
        turn = _Turn(rec)
        self._turn = turn
        frames, last = ulaw_frames(utt)
        await self._mic.put((frames, last, turn))
        status = await wait_turn(turn.done, listener, self.cfg.turn_timeout_s + utt.duration_ms / 1000)
        if status is not None:
            rec.status = status
        if turn.t_first_audio is not None:
            rec.reply_audio_ms = round(turn.audio_bytes / 8, 1)
            end = self.handset.playing_until_s() or time.monotonic()
            await asyncio.sleep(max(0.0, end - time.monotonic()) + self.cfg.think_ms / 1000)
        self._turn = None

    async def _mic_loop(self, ws) -> None:
        """One 20 ms frame per 20 ms of wall clock, forever: queued utterances, else mu-law silence."""
        from audio.codecs import ulaw_encode

        silence = ulaw_encode(np.zeros(FRAME_BYTES, np.float32))
        t_next = time.perf_counter()
        frames: list[bytes] = []
        last, i, turn, ts = -1, 0, None, 0
        while True:
            if not frames and not self._mic.empty():
                frames, last, turn = self._mic.get_nowait()
                i = 0
            frame = frames[i] if frames else silence
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(self._msg("media", media={"track": "inbound", "chunk": str(ts // 20 + 1),
                                                    "timestamp": str(ts), "payload": base64.b64encode(frame).decode()}))
            ts += 20
            if frames:
                if i == last and turn is not None:
                    turn.t_anchor = t_next  # the frame's real-time slot (see bench/voice/caller.py)
                    turn.rec.anchor_lag_ms = round((time.perf_counter() - t_next) * 1000, 2)
                i += 1
                if i == len(frames):
                    frames, turn = [], None
            t_next += 0.02
            if t_next < time.perf_counter() - 0.2:  # fell far behind (overloaded client): don't burst
                t_next = time.perf_counter()

    async def _echo_loop(self, ws) -> None:
        while True:
            for name in self.handset.due(time.monotonic()):
                await ws.send(self._msg("mark", mark={"name": name}))
            await asyncio.sleep(0.005)

    async def _listen(self, ws) -> None:
        async for raw in ws:
            now = time.monotonic()
            msg = json.loads(raw)
            ev = msg.get("event")
            for name in self.handset.on_frame(msg, now):  # a clear: the pending marks are echoed at once
                await ws.send(self._msg("mark", mark={"name": name}))
            turn = self._turn
            if ev == "media":
                self._heard_any.set()
                if turn is None:
                    continue
                if turn.t_anchor is None:
                    turn.rec.early_audio = True
                    continue
                if turn.t_first_audio is None:
                    turn.t_first_audio = now
                    turn.rec.e2e_ms = round((time.perf_counter() - turn.t_anchor) * 1000, 2)
                turn.audio_bytes += len(base64.b64decode(msg["media"]["payload"]))
            elif ev == "mark" and msg["mark"]["name"].startswith("end:"):
                status = msg["mark"]["name"].split(":")[1]
                if status == "prompt" and turn is None:
                    self._greeting_end = self.handset.playing_until_s() or now
                elif turn is not None and turn.t_first_audio is not None and status != "cancelled":
                    turn.rec.response_status = status
                    if status not in ("completed", "incomplete"):
                        turn.rec.status = f"response {status}"
                    turn.done.set()
