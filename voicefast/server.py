"""The only file that awaits a socket: the Realtime WebSocket endpoint and the HTTP routes on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voicefast import auth
from voicefast.config import ServerConfig
from voicefast.drain import Close, Drain, SessionView, Stop
from voicefast.errors import ProtocolError
from voicefast.http import HttpReply, static_file
from voicefast.intake import deliver
from voicefast.limits import ConnectionLimits, receive_timeout
from voicefast.metrics import ServerMetrics
from voicefast.protocol import RealtimeProtocol
from voicefast.readiness import Readiness, readiness
from voicefast.session import Session
from voicefast.session_config import SessionConfig
from voicefast.twilio_auth import is_twilio_path
from voicefast.twilio_endpoint import TwilioEndpoint

log = logging.getLogger("voicefast.server")
REALTIME_PATHS = ("/v1/realtime", "/realtime")
DEFAULT_DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"


class Outbox:
    """A connection's bounded queue of outgoing frames (at most `max_frames` of them and `max_bytes` in all). Its
    own sender task drains it, so a slow reader only ever fills its own queue; once full the reader is hopeless
    (`hopeless` is set, frames are dropped) and the connection is closed instead of buffering without bound or
    stalling other sessions."""

    def __init__(self, proto: RealtimeProtocol, max_frames: int, max_bytes: int = 1 << 62):
        self.proto = proto
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=max_frames)
        self.max_bytes = max_bytes
        self.queued_bytes = 0  # characters of the frames in the queue (ASCII JSON: bytes)
        self.hopeless = asyncio.Event()
        self.dropped = 0

    def put(self, event: dict) -> None:
        for frame in self.proto.events_to_send(event):
            if self.hopeless.is_set():
                self.dropped += 1
                continue
            if self.queued_bytes + len(frame) > self.max_bytes:
                self.dropped += 1
                self.hopeless.set()
                continue
            try:
                self.queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.dropped += 1
                self.hopeless.set()
                continue
            self.queued_bytes += len(frame)

    async def get(self) -> str:
        frame = await self.queue.get()
        self.queued_bytes -= len(frame)
        return frame


class RealtimeServer:
    def __init__(self, stack, opts: ServerConfig, *, defaults: SessionConfig | None = None):
        self.stack, self.opts = stack, opts
        self.defaults = defaults or SessionConfig()
        self.metrics = ServerMetrics()
        self.metrics.bind_engine(stack.engine)
        self.demo_dir = Path(opts.demo_dir) if opts.demo_dir else DEFAULT_DEMO_DIR
        self.sessions: set[Session] = set()
        self._links: dict[Session, tuple[ServerConnection, asyncio.Queue]] = {}  # socket + send queue: drain
        self.models_loaded = True  # `voicefast serve` clears it until the warm-up is done (readiness)
        self.drain_state = Drain(opts.drain_timeout_s)
        self._closing: set[asyncio.Task] = set()
        self.twilio = TwilioEndpoint(self)  # phone calls on /twilio: same sessions, own transport (docs/phone.md)
        self.limits = ConnectionLimits(opts.connect_rate_per_address_per_min, opts.connect_rate_per_key_per_min)
        self._server = None

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await serve(
            self._handle, self.opts.host, self.opts.port,
            process_request=self._process_request, select_subprotocol=self._select_subprotocol,
            compression=None,  # audio in base64 JSON barely compresses; deflate would only cost CPU
            # Limits: an oversized frame closes that connection with 1009; others are unaffected.
            # At most max_receive_queue frames wait per connection (then TCP backpressure): a per-session bound.
            max_size=self.opts.max_message_bytes, max_queue=self.opts.max_receive_queue,
            ping_interval=20, ping_timeout=20, close_timeout=5)
        log.info("listening on %s", self.url)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self.opts.host if ":" not in self.opts.host else f"[{self.opts.host}]"
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    # -- HTTP ------------------------------------------------------------------------------------------
    def _select_subprotocol(self, conn: ServerConnection, offered) -> str | None:
        return auth.choose_subprotocol(list(offered))

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        twilio = is_twilio_path(path)
        # DNS-rebinding guard: without a credential, only loopback or the configured names. /twilio's own
        # credentials (its shared secret, Twilio's signature) gate it like an API key (voicefast/twilio_auth.py).
        gates = self.opts.api_keys + ((self.opts.twilio_secret or "", self.opts.twilio_auth_token or "")
                                      if twilio else ())
        if not auth.host_ok(request.headers.get("Host"), tuple(g for g in gates if g), self.opts.allowed_hosts):
            self.metrics.rejected_total.labels("host").inc()
            return self._response(HttpReply.json({"error": {
                "type": "invalid_request_error", "code": "host_not_allowed",
                "message": "this server has no API key and answers only on loopback or its configured "
                           "--allowed-hosts"}}, 403))
        if path in REALTIME_PATHS:
            return self._check_handshake(conn, request)
        if path == "/readyz":
            r = self.readiness()
            return self._response(HttpReply.json(r.body, r.http_status))
        if twilio:
            if not self.drain_state.accepting:
                self.metrics.rejected_total.labels("draining").inc()
                return self._response(HttpReply.text("this replica is shutting down", 503))
            refused = self._rate_address(conn)
            if refused is not None:
                return refused
            reply = self.twilio.check_handshake(request)
            return None if reply is None else self._response(reply)
        if path == "/healthz":
            reply = HttpReply.json({"status": "ok", "sessions": len(self.sessions),
                                    "max_sessions": self.opts.max_sessions, "models": self.stack.description})
        elif path == "/metrics":
            reply = HttpReply(200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render())
        elif path == "/v1/voices":
            reply = HttpReply.json({"object": "list", "default": self.defaults.voice,
                                    "data": [{"id": v, "name": v} for v in self.stack.voice_names]})
        else:
            reply = static_file(self.demo_dir, request.path)
        return self._response(reply)

    @staticmethod
    def _response(reply: HttpReply) -> Response:
        headers = Headers([("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                           ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")])
        return Response(reply.status, HTTPStatus(reply.status).phrase, headers, reply.body)

    def _refused(self, reason: str, status: int, code: str, message: str,
                 retry_after_s: float | None = None) -> Response:
        self.metrics.rejected_total.labels(reason).inc()
        r = self._response(HttpReply.json({"error": {"type": "invalid_request_error", "code": code,
                                                     "message": message}}, status))
        if retry_after_s is not None:
            r.headers["Retry-After"] = str(max(1, int(retry_after_s + 0.999)))
        return r

    def _rate_address(self, conn: ServerConnection) -> Response | None:
        """Connection attempts per client address (either transport): None, or the 429 refusing this one."""
        address = (conn.remote_address or ("?",))[0]
        refusal = self.limits.check_address(str(address), time.monotonic())
        if refusal is None:
            return None
        return self._refused(refusal.reason, 429, refusal.code, refusal.message, refusal.retry_after_s)

    def _check_handshake(self, conn: ServerConnection, request: Request) -> Response | None:
        h = request.headers
        if not self.drain_state.accepting:  # a load balancer retries this upgrade on another replica
            self.metrics.rejected_total.labels("draining").inc()
            return self._response(HttpReply.json({"error": {"type": "server_error", "code": "server_draining",
                                                            "message": "this replica is shutting down"}}, 503))
        refused = self._rate_address(conn)
        if refused is not None:
            return refused
        offered = auth.offered_subprotocols(", ".join(h.get_all("Sec-WebSocket-Protocol")))
        key = auth.presented_key(h.get("Authorization"), offered)
        if not auth.key_ok(key, self.opts.api_keys):
            return self._refused("auth", 401, "invalid_api_key", "missing or invalid API key")
        if auth.key_only_subprotocols(offered):
            return self._refused("subprotocol", 400, "realtime_subprotocol_required",
                                 "offer the 'realtime' subprotocol alongside the API-key subprotocol")
        refusal = self.limits.check_key(key if self.opts.api_keys else None, time.monotonic())
        if refusal is not None:
            return self._refused(refusal.reason, 429, refusal.code, refusal.message, refusal.retry_after_s)
        if not auth.origin_ok(h.get("Origin"), h.get("Host"), self.opts.allowed_origins):
            return self._refused("origin", 403, "origin_not_allowed", f"origin {h.get('Origin')} is not allowed")
        if h.get("Upgrade", "").lower() != "websocket":
            return self._response(HttpReply.text("this endpoint speaks WebSocket (OpenAI Realtime protocol)", 426))
        return None

    # -- WebSocket -------------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        if is_twilio_path(urlsplit(ws.request.path).path):
            return await self.twilio.handle(ws)
        beta = "realtime=v1" in (ws.request.headers.get("OpenAI-Beta") or "")
        proto = RealtimeProtocol(beta=beta)
        if len(self.sessions) >= self.opts.max_sessions:
            self.metrics.rejected_total.labels("session_limit").inc()
            err = ProtocolError(f"the server is at its limit of {self.opts.max_sessions} sessions",
                                code="session_limit_reached", type="session_limit_reached")
            with contextlib.suppress(ConnectionClosed):
                for f in proto.events_to_send(err.to_event()):
                    await ws.send(f)
                await ws.close(1008, "session limit reached")
            return
        outbox = Outbox(proto, self.opts.max_send_queue, self.opts.max_send_queue_bytes)

        def emit(event: dict) -> None:
            if event["type"] == "error":
                self.metrics.errors_total.labels(event["error"].get("code") or "?").inc()
            outbox.put(event)

        session = Session(self.stack, self.opts, emit=emit, beta=beta, defaults=self.defaults, metrics=self.metrics)
        self.sessions.add(session)
        self.link(session, ws, outbox.queue)
        self.metrics.active_sessions.inc()
        self.metrics.sessions_total.inc()
        log.info("session %s opened (%s)", session.cfg.id, "beta" if beta else "GA")
        sender = asyncio.create_task(self._sender(ws, outbox), name=f"sender-{session.cfg.id}")
        watchdog = asyncio.create_task(self._watch(ws, outbox.hopeless), name=f"watch-{session.cfg.id}")
        started = time.monotonic()
        try:
            session.start()
            while True:
                timeout_s, why = receive_timeout(time.monotonic(), started, idle_timeout_s=self.opts.idle_timeout_s,
                                                 max_session_s=self.opts.max_session_s)
                try:
                    if timeout_s <= 0:
                        raise TimeoutError
                    msg = await asyncio.wait_for(ws.recv(), timeout_s)
                except TimeoutError:
                    await self._end_session(ws, session, emit, why)
                    break
                try:
                    await deliver(session, proto.receive_message(msg), inline_audio_ms=self.opts.inline_audio_ms)
                except ProtocolError as e:
                    emit(e.to_event())
                except Exception:  # a bug must cost one event, not the session; its details stay in the log
                    log.error("session %s: handling a client event failed", session.cfg.id, exc_info=True)
                    emit(ProtocolError("internal error", code="server_error", type="server_error").to_event())
        except ConnectionClosed:
            pass
        except Exception:
            log.error("session %s failed", session.cfg.id, exc_info=True)
            with contextlib.suppress(Exception):
                await ws.close(1011, "internal error")
        finally:
            await session.close()
            for t in (sender, watchdog):
                t.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)
            self.sessions.discard(session)
            self.unlink(session)
            self.metrics.active_sessions.dec()
            log.info("session %s closed", session.cfg.id)

    async def _end_session(self, ws: ServerConnection, session: Session, emit, why: str) -> None:
        if why == "session_expired":
            log.info("session %s reached max_session_s %.0f s: closing", session.cfg.id, self.opts.max_session_s)
            emit(ProtocolError(f"the session reached its maximum length of {self.opts.max_session_s:.0f} s",
                               code="session_expired").to_event())
            code, reason = 1008, "maximum session length reached"
        else:
            log.info("session %s idle for %.0f s: closing", session.cfg.id, self.opts.idle_timeout_s)
            emit(ProtocolError("idle timeout", code="idle_timeout").to_event())
            code, reason = 1000, "idle timeout"
        await asyncio.sleep(0.05)
        await ws.close(code, reason)

    # -- readiness and drain (voicefast/readiness.py, voicefast/drain.py) ---------------------------------
    def readiness(self) -> Readiness:
        waiting = running = None
        try:
            st = self.stack.engine.stats()
            waiting, running = st.waiting, st.running
        except Exception:  # readiness must answer even when stats fail
            log.warning("engine stats failed", exc_info=True)
        return readiness(models_loaded=self.models_loaded, draining=not self.drain_state.accepting,
                         sessions=len(self.sessions), max_sessions=self.opts.max_sessions, engine_waiting=waiting,
                         engine_running=running, ready_max_waiting=self.opts.ready_max_waiting,
                         drain_remaining_s=self.drain_state.remaining_s(time.monotonic()),
                         engine_error=getattr(self.stack.engine, "error", None))

    def link(self, session: Session, ws: ServerConnection, send_queue: asyncio.Queue) -> None:
        """A live session's socket and outgoing queue (either transport), so a drain can close it once idle."""
        self._links[session] = (ws, send_queue)

    def unlink(self, session: Session) -> None:
        self._links.pop(session, None)

    async def drain(self, poll_s: float = 0.1) -> None:
        """Refuse new sessions at once, let live ones go on for `drain_timeout_s`, then close each (1001) as soon
        as its response in progress is finished and sent. Returns when no session is left."""
        if self.drain_state.begin(time.monotonic()):
            log.info("draining: %d live session(s), grace %.0f s", len(self.sessions), self.opts.drain_timeout_s)
        while True:
            views = [SessionView(s.cfg.id, _responding(s), self._links[s][1].empty())
                     for s in self.sessions if s in self._links]
            by_id = {s.cfg.id: s for s in self.sessions}
            for action in self.drain_state.poll(time.monotonic(), views):
                if isinstance(action, Stop):
                    log.info("drained: no session left")
                    return
                if isinstance(action, Close) and by_id.get(action.session_id) in self._links:
                    ws = self._links[by_id[action.session_id]][0]
                    log.info("session %s: closing (%d %s)", action.session_id, action.code, action.reason)
                    t = asyncio.create_task(ws.close(action.code, action.reason), name=f"drain-{action.session_id}")
                    self._closing.add(t)
                    t.add_done_callback(self._closing.discard)
            await asyncio.sleep(poll_s)

    @staticmethod
    async def _sender(ws: ServerConnection, outbox: Outbox) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(await outbox.get())

    @staticmethod
    async def _watch(ws: ServerConnection, hopeless: asyncio.Event) -> None:
        await hopeless.wait()
        log.warning("closing a connection whose reader fell too far behind")
        with contextlib.suppress(Exception):
            await ws.close(1008, "client too slow reading events")
        ws.transport.abort() if ws.transport is not None else None


def _responding(session: Session) -> bool:
    r = session.active
    return r is not None and not r.done.is_set()


def session_defaults(opts: ServerConfig, instructions: str, voice: str) -> SessionConfig:
    return SessionConfig(instructions=instructions, voice=voice, temperature=opts.temperature,
                         max_output_tokens=opts.max_output_tokens)

