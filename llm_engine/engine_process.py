"""ProcessLLMEngine: AsyncLLMEngine's API with the engine in its own process (multiprocessing, spawn), so its steps
never wait for the GIL of a busy server (event loop, TTS, VAD, ASR threads). On the H200 at 32 callers, eager
prefill steps of the in-process engine thread (~470 torch calls, each releasing and re-taking the GIL) took
300-1,000 ms instead of ~20 ms (docs/gpu.md, "The engine in its own process").

The parent tokenizes (its own tokenizer, loaded as the engine loads its own) and validates a request exactly where
AsyncLLMEngine does, so generate() raises EngineOverloaded / ValueError synchronously; only token ids and
SamplingParams (a Grammar travels as its spec and compiles in the child) cross the pipe. The child
(llm_engine/engine_worker.py) sends one message per step with every output of that step; one reader thread here
posts them to each request's asyncio queue with call_soon_threadsafe, one call per event loop per step. stats()
is the latest snapshot the child pushed (with a step's outputs, at most every 100 ms while busy, and whenever it
goes idle): /metrics and /readyz never wait on a step. If the child dies, every open stream ends with an "error"
output and generate() raises RuntimeError saying why."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing as mp
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from llm_engine.async_engine import RequestStream, post_outputs, tokenize
from llm_engine.config import EngineConfig
from llm_engine.engine_worker import worker_main
from llm_engine.outputs import EngineStats, RequestResult, StreamOutput
from llm_engine.sampling_params import SamplingParams
from llm_engine.scheduler import EngineOverloaded, check_request_fits
from llm_engine.sequence import checked_prompt
from llm_engine.tool_format import ToolDialect, dialect_for

__all__ = ["EngineInfo", "ProcessLLMEngine"]
log = logging.getLogger("llm_engine")
_LIVE: weakref.WeakSet = weakref.WeakSet()  # engines not shut down yet
_ATEXIT_REGISTERED = False


def load_tokenizer(cfg: EngineConfig) -> Any:
    """The tokenizer LLMEngine(cfg) loads for itself (None for a RandomCheckpoint without one), loaded here."""
    from llm_engine.tokenizer import Tokenizer

    if cfg.model is not None and not isinstance(cfg.model, (str, Path)):  # a RandomCheckpoint
        path = getattr(cfg.model, "tokenizer", None)
        return Tokenizer.from_path(path) if path is not None else None
    return Tokenizer.from_path(cfg.model_path())


class EngineInfo:
    """What the server reads of `engine.engine` (model, device, limits), fetched once from the engine process,
    plus this process's own tokenizer and grammar compiler (requests are tokenized and validated here)."""

    def __init__(self, info: dict, tokenizer: Any, owner: ProcessLLMEngine):
        self.config: EngineConfig = info["config"]
        self.model_config = info["model_config"]
        self.device: str = info["device"]  # "cpu" | "cuda:0" (a string: this process needs no torch)
        self.dtype: str = info["dtype"]
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.eos_token_ids: frozenset[int] = info["eos_token_ids"]
        self.num_kv_blocks: int = info["num_kv_blocks"]
        self.kv_block_size: int = info["kv_block_size"]
        self.num_speculative_tokens: int = info["num_speculative_tokens"]
        self.tokenizer = tokenizer
        self._owner = weakref.ref(owner)
        self._grammar: Any = None
        self._grammar_lock = threading.Lock()

    def grammar_compiler(self) -> Any:
        """This process's compiler (validates grammars in generate()); the first call also has the engine process
        build its own, blocking, so neither is built inside a caller's request."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.tokenizer is None:
                    raise ValueError("constrained decoding needs a tokenizer")
                from llm_engine.grammar import GrammarCompiler

                self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
                owner = self._owner()
                if owner is not None:
                    owner._call("grammar_compiler")
            return self._grammar


class ProcessLLMEngine:
    """Drop-in for AsyncLLMEngine (generate / abort / stats / warm_up / shutdown / tokenizer / tool_dialect); `engine`
    is an EngineInfo, not a live LLMEngine. Start-up errors of the engine process raise here with its message."""

    def __init__(self, config: EngineConfig | None = None, *, start_timeout_s: float = 1800.0):
        self.config = config = config or EngineConfig()
        self._lock = threading.Lock()  # the request table and the child's reported counts
        # Reentrant: a dropped RequestStream's __del__ (run by a garbage collection that an allocation inside a send
        # triggered, on the same thread) aborts through _send; the nested message goes out whole before the outer
        # one's bytes (Connection.send pickles first, then writes with no tracked allocation in between).
        self._send_lock = threading.RLock()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids, self._call_ids = itertools.count(), itertools.count()
        self._adds_sent = self._adds_seen = self._child_waiting = 0
        self._dead: str | None = None  # why the engine process is gone (generate raises it)
        self._stopping = False
        self._reader: threading.Thread | None = None
        self._join_lock = threading.Lock()  # Process.join from two threads at once can lose the exit code
        ctx = mp.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
        cmd_recv, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_send = ctx.Pipe(duplex=False)
        # Not a daemon: a daemonic process may not start the tensor-parallel ranks. An atexit hook stops it.
        self._proc = ctx.Process(target=worker_main, name="llm-engine", daemon=False,
                                 args=(config, cmd_recv, out_send, logging.getLogger("llm_engine").getEffectiveLevel()))
        self._proc.start()
        global _ATEXIT_REGISTERED
        if not _ATEXIT_REGISTERED:
            atexit.register(_shutdown_all)
            _ATEXIT_REGISTERED = True
        cmd_recv.close()  # only the child holds these now: its exit closes the pipe (the reader sees EOF)
        out_send.close()
        _LIVE.add(self)
        try:
            tokenizer = tok_error = None
            try:  # meanwhile the child loads the model
                tokenizer = load_tokenizer(config)
            except Exception as e:
                tok_error = e
            info = self._wait_ready(start_timeout_s)
            if tok_error is not None:
                raise tok_error
        except BaseException:
            self._stop_child(5.0)
            raise
        self.engine = EngineInfo(info, tokenizer, self)
        self._stats: EngineStats = info["stats"]
        self._max_waiting = config.max_waiting
        self._kv_capacity = self.engine.num_kv_blocks * self.engine.kv_block_size
        self._reader = threading.Thread(target=self._read, name="llm-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if not self._out.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"the engine process did not start within {timeout_s:.0f} s")
                    continue
                msg = self._out.recv()
            except (EOFError, OSError):
                self._proc.join(5.0)
                raise RuntimeError(f"the engine process exited during start-up ({_exit_text(self._proc)})") from None
            if msg[0] == "log":
                _relog(msg[1])
            elif msg[0] == "ready":
                return msg[1]
            elif msg[0] == "init_error":
                err = msg[1]
                err.add_note(f"(in the engine process)\n{msg[2]}")
                raise err

    # ---- what the server reads --------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def tool_dialect(self) -> ToolDialect:
        """How this model writes tool calls, from its chat template (llm_engine.tool_format)."""
        ct = getattr(self.engine.tokenizer, "chat_template", None)
        return dialect_for(getattr(ct, "source", None))

    @property
    def pid(self) -> int | None:
        """The engine process's id (utilisation sampling, tests)."""
        return self._proc.pid

    @property
    def error(self) -> str | None:
        """Why the engine process is gone (None while it runs)."""
        return self._dead

    def stats(self) -> EngineStats:
        return self._stats

    # ---- caller side (any thread / event loop) ----------------------------------------------------------------
    def generate(self, params: SamplingParams | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 request_id: str | None = None, tools: list | None = None) -> RequestStream:
        """As AsyncLLMEngine.generate: raises EngineOverloaded or ValueError here, before anything is queued, and
        RuntimeError once the engine process is gone. Call from a running event loop."""
        if sum(x is not None for x in (messages, prompt, prompt_token_ids)) != 1:
            raise ValueError("pass exactly one of messages=, prompt=, prompt_token_ids=")
        self._check_alive()
        info = self.engine
        if prompt_token_ids is None:
            prompt_token_ids = tokenize(info.tokenizer, self.tool_dialect, messages, prompt, tools)
        params = params or SamplingParams()
        rid = request_id or f"req-{next(self._ids)}"
        ids = checked_prompt(prompt_token_ids, info.vocab_size)  # LLMEngine.make_sequence's checks, here
        if params.stop and info.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        check_request_fits(rid, len(ids), params, info.max_model_len, self._kv_capacity)
        if params.grammar is not None:
            info.grammar_compiler().compile(params.grammar)  # ValueError if invalid
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._check_alive()
            waiting = self._child_waiting + self._adds_sent - self._adds_seen
            if waiting >= self._max_waiting:
                raise EngineOverloaded(f"engine overloaded: {waiting} requests waiting "
                                       f"(max_waiting={self._max_waiting})")
            if rid in self._sinks:
                raise ValueError(f"request id {rid!r} is already in flight")
            self._sinks[rid] = (loop, queue)
            self._adds_sent += 1
        if not self._send(("add", rid, ids, params, time.perf_counter())):
            with self._lock:
                self._sinks.pop(rid, None)
            raise RuntimeError(self._dead or "the engine process is gone")
        return RequestStream(self, rid, queue)  # type: ignore[arg-type]  # it only calls abort()

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent: the request stops at the engine's next step boundary, its blocks are freed
        then, and its stream ends with finish_reason "abort"."""
        self._send(("abort", request_id))

    def warm_up(self) -> Any:
        """LLMEngine.warm_up run in the engine process; blocks until it is done (call it through asyncio.to_thread).
        Its exceptions (llm_engine.warm_up.EngineBusy with requests in flight) are raised here."""
        return self._call("warm_up")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process (open streams end with finish_reason "abort"), join it and the reader thread.
        Idempotent; a process that does not stop within timeout_s is killed."""
        if self._stopping:
            return
        self._stopping = True
        self._send(("stop",))
        self._stop_child(timeout_s)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout_s)
        _LIVE.discard(self)

    # ---- internals -------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._stopping:
            raise RuntimeError("ProcessLLMEngine is shut down")
        if self._dead is not None:
            raise RuntimeError(self._dead)

    def _send(self, msg: tuple) -> bool:
        with self._send_lock:
            try:
                self._cmd.send(msg)
                return True
            except (OSError, ValueError):  # the child is gone (the reader reports why)
                return False

    def _call(self, name: str) -> Any:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        cid = next(self._call_ids)
        with self._lock:
            self._check_alive()
            self._calls[cid] = fut
        if not self._send(("call", cid, name)):
            with self._lock:
                self._calls.pop(cid, None)
            raise RuntimeError(self._dead or "the engine process is gone")
        return fut.result()

    def _stop_child(self, timeout_s: float) -> None:
        p = self._proc
        with self._join_lock:
            p.join(timeout_s)
            if p.is_alive():  # it ignores SIGTERM (engine_worker.worker_main)
                log.warning("the engine process did not stop within %.0f s: killing it", timeout_s)
                p.kill()
                p.join(5.0)
        self._cmd.close()
        if self._reader is None:  # start-up failed: nobody else reads the pipe
            self._out.close()

    # ---- the reader thread -----------------------------------------------------------------------------------
    def _read(self) -> None:
        conn = self._out
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "step":
                self._on_step(*msg[1:])
            elif kind == "result":
                with self._lock:
                    fut = self._calls.pop(msg[1], None)
                if fut is not None:
                    if msg[2]:
                        fut.set_result(msg[3])
                    else:
                        fut.set_exception(msg[3])
            elif kind == "log":
                _relog(msg[1])
        conn.close()
        self._on_exit()

    def _on_step(self, outs: list[StreamOutput], failed: list, waiting: int, adds_seen: int,
                 stats: EngineStats | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            self._child_waiting, self._adds_seen = waiting, adds_seen
            if stats is not None:
                self._stats = stats
            sinks = self._sinks
            for rid, exc in failed:
                sink = sinks.pop(rid, None)
                if sink is not None:
                    by_loop.setdefault(sink[0], []).append((sink[1], exc))
            for out in outs:
                sink = sinks.pop(out.request_id, None) if out.finished else sinks.get(out.request_id)
                if sink is not None:
                    by_loop.setdefault(sink[0], []).append((sink[1], out))
        for loop, items in by_loop.items():
            post_outputs(loop, items, self.abort)

    def _on_exit(self) -> None:
        """The engine process is gone (stopped, killed, crashed): end every open stream and pending call."""
        with self._join_lock:
            self._proc.join(5.0)
        why = "ProcessLLMEngine is shut down" if self._stopping else \
            f"the engine process died ({_exit_text(self._proc)})"
        with self._lock:
            self._dead = why
            sinks, self._sinks = self._sinks, {}
            calls, self._calls = self._calls, {}
        if sinks and not self._stopping:
            log.error("%s: ending %d open request(s)", why, len(sinks))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, (loop, queue) in sinks.items():
            out = StreamOutput(rid, finished=True, result=RequestResult(
                request_id=rid, prompt_tokens=0, completion_tokens=0, cached_tokens=0, ttft_s=None,
                decode_tok_s=None, finish_reason="error", text="", error=why))
            by_loop.setdefault(loop, []).append((queue, out))
        for loop, items in by_loop.items():
            post_outputs(loop, items, lambda rid: None)  # a closed loop: nobody listens, nothing left to stop
        for fut in calls.values():
            fut.set_exception(RuntimeError(why))


def _exit_text(proc: Any) -> str:
    code = proc.exitcode
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _relog(fields: dict) -> None:
    """A log record of the engine process, handled by this process's logging (its handlers and format)."""
    record = logging.makeLogRecord(fields | {"args": None, "exc_info": None})
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def _shutdown_all() -> None:
    """At interpreter exit, stop engine processes nobody shut down (multiprocessing's exit hook would otherwise wait
    on them forever: they are not daemons). Registered after that hook (on the first start), so it runs first."""
    for eng in list(_LIVE):
        eng.shutdown(5.0)
