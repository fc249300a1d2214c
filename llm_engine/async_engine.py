"""AsyncLLMEngine: the engine loop on its own thread; asyncio callers get a per-request async iterator of
StreamOutput and never wait on a model step. Commands (add, abort) cross threads through a locked list;
outputs come back with loop.call_soon_threadsafe, one call per event loop per step."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from typing import Any

from llm_engine.config import EngineConfig
from llm_engine.engine import LLMEngine
from llm_engine.outputs import EngineStats, RequestResult, StreamOutput
from llm_engine.sampling_params import SamplingParams
from llm_engine.scheduler import EngineOverloaded

__all__ = ["AsyncLLMEngine", "EngineOverloaded", "EngineStats", "RequestResult", "RequestStream", "StreamOutput"]
log = logging.getLogger("llm_engine")


class RequestStream:
    """Async iterator of one request's StreamOutputs; the last has finished=True and a RequestResult.
    Leaving early (break + drop, aclose(), task cancellation) aborts the request and frees its blocks."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: nobody will read this request any more
            self._close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._close()


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None):
        self.engine: LLMEngine = engine  # type: ignore[assignment]  # set by the engine thread if None
        self._lock = threading.Lock()
        self._cmds: list[tuple[str, Any]] = []
        self._num_pending_adds = 0
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._stopping = False
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        # The engine is built on the thread that runs it: on CPU, torch's OpenMP pool belongs to the thread that
        # first used it, and running the steps from a second thread measured ~40% slower decode.
        self._thread = threading.Thread(target=self._main, args=(config,), name="llm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> AsyncLLMEngine:
        return cls(engine=engine)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def tool_dialect(self) -> Any:
        """How this model writes tool calls (llm_engine.tool_format.ToolDialect)."""
        return self.engine.tool_dialect

    # ---- caller side (any thread / event loop) --------------------------------------------------------
    def generate(self, params: SamplingParams | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 request_id: str | None = None, tools: list | None = None) -> RequestStream:
        """Submit a request; returns its stream. Raises EngineOverloaded (too many waiting) or ValueError (bad
        request) right here, before anything is queued. Call from a running event loop. With `tools`
        (llm_engine.tool_format.Tool), `messages` may hold tool calls and results and are rendered in the
        model's tool dialect (`tool_dialect`)."""
        if sum(x is not None for x in (messages, prompt, prompt_token_ids)) != 1:
            raise ValueError("pass exactly one of messages=, prompt=, prompt_token_ids=")
        if self._stopping:
            raise RuntimeError("AsyncLLMEngine is shut down")
        if prompt_token_ids is None:
            prompt_token_ids = tokenize(self.engine.tokenizer, self.tool_dialect, messages, prompt, tools)
        seq = self.engine.make_sequence(request_id, prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            waiting = len(self.engine.scheduler.waiting) + self._num_pending_adds
            limit = self.engine.config.max_waiting
            if waiting >= limit:
                raise EngineOverloaded(f"engine overloaded: {waiting} requests waiting (max_waiting={limit})")
            self._num_pending_adds += 1
            self._cmds.append(("add", (seq, loop, queue)))
        self._wake.set()
        return RequestStream(self, seq.request_id, queue)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent: the request stops at the next step boundary, its blocks are freed then,
        and its stream ends with finish_reason "abort"."""
        with self._lock:
            self._cmds.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def warm_up(self) -> Any:
        """LLMEngine.warm_up (a no-op off CUDA) run on the engine thread, which owns the engine; blocks until it is
        done (call it through asyncio.to_thread). Requests submitted meanwhile wait for it; with requests already in
        flight it raises RuntimeError (the warm-up needs an idle engine)."""
        if self._stopping:
            raise RuntimeError("AsyncLLMEngine is shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._cmds.append(("call", (self.engine.warm_up, fut)))
        self._wake.set()
        return fut.result()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # ---- engine thread --------------------------------------------------------------------------------
    def _main(self, config: EngineConfig | None) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(config)
        except BaseException as e:  # surfaces in the constructor
            self._init_error = e
            return
        finally:
            self._ready.set()
        self._loop()

    def _loop(self) -> None:
        eng = self.engine
        while True:
            if not eng.has_unfinished() and not self._cmds and not self._stopping:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                cmds, self._cmds = self._cmds, []
            try:
                for kind, arg in cmds:
                    if kind == "add":
                        self._add(*arg)
                    elif kind == "call":
                        self._call(*arg)
                    else:
                        eng.abort(arg)
                if self._stopping:
                    self._deliver(eng.stop())
                    return
                outs = eng.step()
            except Exception as e:  # a bug outside the model step: fail in-flight requests, keep looping
                log.error("engine loop failed", exc_info=True)
                outs = eng.fail_all(f"{type(e).__name__}: {e}")
            self._deliver(outs)

    def _add(self, seq: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        with self._lock:
            self._num_pending_adds -= 1
        try:
            self.engine.add_sequence(seq)
        except Exception as e:  # e.g. EngineOverloaded lost a race: the consumer sees the exception
            self._post(loop, [(queue, e)])
            return
        self._sinks[seq.request_id] = (loop, queue)

    @staticmethod
    def _call(fn: Any, fut: concurrent.futures.Future) -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # the caller re-raises it
            fut.set_exception(e)

    def _deliver(self, outs: list[StreamOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                by_loop.setdefault(sink[0], []).append((sink[1], out))
        for loop, items in by_loop.items():
            self._post(loop, items)

    def _post(self, loop: asyncio.AbstractEventLoop, items: list) -> None:
        post_outputs(loop, items, self.engine.abort)


def tokenize(tok: Any, dialect: Any, messages: list[dict] | None, prompt: str | None, tools: list | None) -> list[int]:
    """A request's prompt ids: messages through the chat template (in the tool dialect with tools), or the text."""
    if tok is None:
        raise ValueError("this engine has no tokenizer: pass prompt_token_ids=")
    if messages is not None and tools is not None:
        return dialect.render(tok, messages, tools)
    if messages is not None:
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(prompt)


def post_outputs(loop: asyncio.AbstractEventLoop, items: list, abort: Any) -> None:
    """Put items [(asyncio.Queue, StreamOutput or exception)] on their queues from another thread: one call into
    `loop`. If that loop is closed nobody listens: abort(request_id) stops those requests."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:
        for _, out in items:
            if isinstance(out, StreamOutput) and not out.finished:
                abort(out.request_id)


def _put_all(items: list) -> None:
    for queue, out in items:
        queue.put_nowait(out)
