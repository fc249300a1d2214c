"""A scripted OpenAI-Realtime (GA) server with KNOWN timings, for testing the latency harness and the demo page.

It isolates the client side: no models. End of speech is detected exactly, by energy per received chunk
(a chunk is voiced when its peak |sample| exceeds `energy_threshold`); once `silence_ms` of unvoiced audio has
arrived after the last voiced chunk, the turn ends and the reply follows after exactly the scripted stage
delays (asr_final_ms + llm_ttft_ms + tts_first_audio_ms). The reply is a 440 Hz tone paced in real time, so a
client can barge in; a voiced chunk during the reply stops it (speech_started, response.done cancelled).

Every turn's true server-side timestamps (time.perf_counter, same clock as an in-process client) are kept in
`FakeRealtimeServer.turns`, and every client event in `.received`, so tests can compare a client's
measurements with what really happened.

Like `voicefast serve`, it also serves the demo page (GET / from demo/), GET /v1/voices and GET /healthz.
Run it by hand for demo development: `python tests/fake_realtime_server.py --port 8765`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

RATE_HZ = 24_000
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"


@dataclass
class FakeScript:
    silence_ms: int = 300  # end-of-turn window: unvoiced audio after the last voiced chunk
    asr_final_ms: int = 40  # end of turn -> transcription.completed
    llm_ttft_ms: int = 60  # transcription.completed -> first transcript delta
    tts_first_audio_ms: int = 50  # first transcript delta -> first output_audio.delta
    reply_audio_ms: int = 600  # length of the reply tone
    reply_chunk_ms: int = 40
    reply_text: str = "Sure, I can help with that."
    transcripts: list[str] = field(default_factory=lambda: ["hello there"])  # cycled per turn
    energy_threshold: float = 0.02
    api_key: str | None = None  # when set, the key must come as Bearer header or browser subprotocol
    report_timings: bool = True
    close_at_turn: int | None = None  # close the socket (1011) at this turn's end of speech instead of replying


@dataclass
class FakeTurn:
    t_speech_end_recv: float = 0.0  # perf_counter when the chunk completing the silence window arrived
    speech_start_sample: int = 0  # start of the first voiced chunk, in session input samples
    speech_end_sample: int = 0  # end (exclusive) of the last voiced chunk, in session input samples
    t_first_audio_sent: float | None = None
    cancelled: bool = False


class _Session:
    def __init__(self, server: FakeRealtimeServer, ws: ServerConnection):
        self.srv, self.ws, self.s = server, ws, server.script
        self.samples = 0
        self.in_speech = False
        self.last_voiced_end = 0
        self.speech_start = 0
        self.reply: asyncio.Task | None = None
        self.n = 0

    async def send(self, type_: str, **fields) -> None:
        self.n += 1
        await self.ws.send(json.dumps({"type": type_, "event_id": f"evt_{self.n}", **fields}))

    async def run(self) -> None:
        await self.send("session.created", session=self.srv.session_config())
        try:
            async for raw in self.ws:
                ev = json.loads(raw)
                self.srv.received.append(ev)
                t = ev.get("type")
                if t == "input_audio_buffer.append":
                    await self.on_audio(base64.b64decode(ev["audio"]))
                elif t == "session.update":
                    self.srv.session_updates.append(ev.get("session", {}))
                    await self.send("session.updated", session=self.srv.session_config())
                elif t == "conversation.item.truncate":
                    await self.send("conversation.item.truncated", item_id=ev.get("item_id"),
                                    content_index=0, audio_end_ms=ev.get("audio_end_ms"))
        except ConnectionClosed:
            pass
        finally:
            if self.reply:
                self.reply.cancel()

    async def on_audio(self, pcm: bytes) -> None:
        x = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
        start = self.samples
        self.samples += len(x)
        voiced = len(x) > 0 and float(np.abs(x).max()) > self.s.energy_threshold
        if voiced:
            if not self.in_speech:
                self.in_speech = True
                self.speech_start = start
                if self.reply and not self.reply.done():
                    self.reply.cancel()  # barge-in: the reply task sends response.done(cancelled)
                    await asyncio.gather(self.reply, return_exceptions=True)
                await self.send("input_audio_buffer.speech_started", audio_start_ms=start * 1000 // RATE_HZ,
                                item_id=f"item_user_{len(self.srv.turns)}")
            self.last_voiced_end = self.samples
        elif self.in_speech and self.samples - self.last_voiced_end >= self.s.silence_ms * RATE_HZ // 1000:
            self.in_speech = False
            turn = FakeTurn(t_speech_end_recv=time.perf_counter(), speech_start_sample=self.speech_start,
                            speech_end_sample=self.last_voiced_end)
            self.srv.turns.append(turn)
            if self.s.close_at_turn == len(self.srv.turns) - 1:
                await self.ws.close(1011, "scripted failure")
                return
            self.reply = asyncio.create_task(self.respond(turn, len(self.srv.turns) - 1))

    async def respond(self, turn: FakeTurn, k: int) -> None:
        s = self.s
        user_item, item, resp = f"item_user_{k}", f"item_asst_{k}", f"resp_{k}"
        # Deliberately report speech_stopped at the END of the silence window, not the true end of speech:
        # a harness that anchored on this event would be off by silence_ms.
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=self.samples * 1000 // RATE_HZ,
                        item_id=user_item)
        await self.send("input_audio_buffer.committed", item_id=user_item, previous_item_id=None)
        t0 = turn.t_speech_end_recv
        text = s.transcripts[k % len(s.transcripts)]
        await _sleep_until(t0 + s.asr_final_ms / 1000)
        await self.send("conversation.item.input_audio_transcription.delta", item_id=user_item, content_index=0,
                        delta=text)
        await self.send("conversation.item.input_audio_transcription.completed", item_id=user_item,
                        content_index=0, transcript=text)
        await self.send("response.created", response={"id": resp, "object": "realtime.response",
                                                      "status": "in_progress", "output": []})
        words = s.reply_text.split(" ")
        try:
            await _sleep_until(t0 + (s.asr_final_ms + s.llm_ttft_ms) / 1000)
            await self.send("response.output_audio_transcript.delta", response_id=resp, item_id=item,
                            output_index=0, content_index=0, delta=words[0])
            t_audio0 = t0 + (s.asr_final_ms + s.llm_ttft_ms + s.tts_first_audio_ms) / 1000
            await _sleep_until(t_audio0)
            n_chunks = max(1, s.reply_audio_ms // s.reply_chunk_ms)
            for i in range(n_chunks):
                await _sleep_until(t_audio0 + i * s.reply_chunk_ms / 1000)
                await self.send("response.output_audio.delta", response_id=resp, item_id=item, output_index=0,
                                content_index=0, delta=_tone_b64(i, s.reply_chunk_ms))
                if i == 0:
                    turn.t_first_audio_sent = time.perf_counter()
                for w in range(_word_at(i - 1, words, n_chunks) + 1, _word_at(i, words, n_chunks) + 1):
                    await self.send("response.output_audio_transcript.delta", response_id=resp, item_id=item,
                                    output_index=0, content_index=0, delta=" " + words[w])
            await self.send("response.output_audio.done", response_id=resp, item_id=item)
            await self.send("response.output_audio_transcript.done", response_id=resp, item_id=item,
                            transcript=s.reply_text)
            await self.send("response.done", response=self._response(resp, "completed", turn, len(words)))
        except asyncio.CancelledError:
            turn.cancelled = True
            await self.send("response.done", response=self._response(resp, "cancelled", turn, 1))
            raise

    def _response(self, resp: str, status: str, turn: FakeTurn, tokens: int) -> dict:
        s = self.s
        r: dict = {"id": resp, "object": "realtime.response", "status": status, "output": []}
        if status == "cancelled":
            r["status_details"] = {"type": "cancelled", "reason": "turn_detected"}
        if s.report_timings:
            r["metadata"] = {"voicefast_timings": {
                "end_of_turn_delay_ms": s.silence_ms, "asr_final_ms": s.asr_final_ms,
                "llm_ttft_ms": s.llm_ttft_ms, "tts_first_audio_ms": s.tts_first_audio_ms,
                "e2e_server_ms": s.silence_ms + s.asr_final_ms + s.llm_ttft_ms + s.tts_first_audio_ms,
                "speech_end_audio_ms": turn.speech_end_sample * 1000 // RATE_HZ,
                "llm_tokens": tokens, "llm_tok_s": 42.0}}
        return r


def _word_at(i: int, words: list[str], n_chunks: int) -> int:
    """Index of the last reply word spoken by the end of chunk i (word 0 goes out at TTFT)."""
    return 0 if i < 0 else min(len(words) - 1, (i + 1) * len(words) // n_chunks)


async def _sleep_until(t: float) -> None:
    d = t - time.perf_counter()
    if d > 0:
        await asyncio.sleep(d)


def _tone_b64(i: int, chunk_ms: int) -> str:
    n = RATE_HZ * chunk_ms // 1000
    t = (np.arange(n) + i * n) / RATE_HZ
    return base64.b64encode((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()).decode()


class FakeRealtimeServer:
    """Runs on its own thread and event loop: `with FakeRealtimeServer(FakeScript()) as srv: srv.url`."""

    def __init__(self, script: FakeScript | None = None, host: str = "127.0.0.1", port: int = 0):
        self.script = script or FakeScript()
        self.host, self.port = host, port
        self.turns: list[FakeTurn] = []
        self.received: list[dict] = []
        self.session_updates: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def session_config(self) -> dict:
        return {"type": "realtime", "id": "sess_fake", "model": "fake", "output_modalities": ["audio"],
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE_HZ},
                                    "turn_detection": {"type": "server_vad",
                                                       "silence_duration_ms": self.script.silence_ms}},
                          "output": {"format": {"type": "audio/pcm", "rate": RATE_HZ}, "voice": "joe"}}}

    def _select_subprotocol(self, conn: ServerConnection, offered):
        return "realtime" if "realtime" in offered else None

    def _authorized(self, request: Request) -> bool:
        key = self.script.api_key
        if key is None:
            return True
        if request.headers.get("Authorization") == f"Bearer {key}":
            return True
        offered = ",".join(request.headers.get_all("Sec-WebSocket-Protocol"))
        return f"openai-insecure-api-key.{key}" in [p.strip() for p in offered.split(",")]

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?")[0]
        if path == "/v1/realtime":
            return None if self._authorized(request) else conn.respond(401, "missing or wrong API key\n")
        if path == "/healthz":
            return conn.respond(200, "ok\n")
        if path == "/v1/voices":
            return _response(200, "application/json", json.dumps(
                {"object": "list", "data": [{"id": "joe", "name": "joe"}, {"id": "amy", "name": "amy"}]}).encode())
        rel = "index.html" if path == "/" else path.lstrip("/")
        f = (DEMO_DIR / rel).resolve()
        if DEMO_DIR.resolve() in f.parents and f.is_file():
            ctype = "text/javascript" if f.suffix in (".js", ".mjs") else (mimetypes.guess_type(f.name)[0]
                                                                          or "application/octet-stream")
            return _response(200, ctype, f.read_bytes())
        return conn.respond(404, "not found\n")

    async def _handler(self, ws: ServerConnection) -> None:
        await _Session(self, ws).run()

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         select_subprotocol=self._select_subprotocol, max_size=16 * 2**20) as server:
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await self._stop.wait()

    def start(self) -> FakeRealtimeServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(ready),), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake realtime server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> FakeRealtimeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _response(status: int, ctype: str, body: bytes) -> Response:
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return Response(status, "OK" if status == 200 else "Error", headers, body)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="scripted fake realtime server (serves demo/ too)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    srv = FakeRealtimeServer(port=args.port).start()
    print(f"fake realtime server on {srv.http_url}  (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
