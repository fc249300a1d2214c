"""The engine process of ProcessLLMEngine (llm_engine/engine_process.py): builds LLMEngine(config) itself (so its
CUDA context, graphs and tensor-parallel ranks live here) and runs AsyncLLMEngine's loop with no other Python
thread of the server competing for its GIL.

Pipes, one way each. Parent -> here (read by a small thread into a locked list, as AsyncLLMEngine's callers do, so
the parent never waits on a step): ("add", request_id, prompt_ids, params, arrival_s) | ("abort", request_id) |
("call", call_id, name) | ("stop",). Here -> parent: ("ready", info) or ("init_error", exception, traceback) once;
then per step that has something to say ONE ("step", outputs, failed_adds, waiting, adds_seen, stats | None);
("result", call_id, ok, value); ("log", record fields). The parent going away (its pipe ends) stops the engine."""

from __future__ import annotations

import logging
import pickle
import signal
import threading
import time
import traceback
from typing import Any

log = logging.getLogger("llm_engine")
STATS_INTERVAL_S = 0.1  # a stats snapshot rides with a step's outputs at most this often (and whenever idle)


def portable(e: BaseException) -> BaseException:
    """e itself if it survives pickling (its type and message reach the parent), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Sender:
    """The pipe to the parent; any thread of this process may send (the loop, a log record from another thread)."""

    def __init__(self, conn: Any):
        self.conn, self.lock, self.broken = conn, threading.Lock(), False

    def send(self, msg: tuple) -> bool:
        with self.lock:
            if self.broken:
                return False
            try:
                self.conn.send(msg)
                return True
            except (OSError, ValueError):  # the parent is gone
                self.broken = True
                return False


class _LogForwarder(logging.Handler):
    """This process's llm_engine log records (slow steps, warm-up, errors) go to the parent's logging."""

    def __init__(self, sender: _Sender):
        super().__init__()
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.sender.send(("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                                      "msg": msg, "created": record.created, "threadName": record.threadName,
                                      "processName": record.processName}))
        except Exception:  # logging must never break the engine
            self.handleError(record)


def worker_main(config: Any, cmd_conn: Any, out_conn: Any, log_level: int) -> None:
    """The engine process's entry point (multiprocessing spawn target)."""
    # Ctrl-C (the terminal's process group) and a SIGTERM to the whole group (systemd's control-group kill) would
    # end the engine under a draining server: the parent decides when it stops; its exit alone (EOF) stops it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sender = _Sender(out_conn)
    root = logging.getLogger("llm_engine")
    root.addHandler(_LogForwarder(sender))
    root.setLevel(log_level)
    root.propagate = False
    try:
        from llm_engine.engine import LLMEngine

        eng = LLMEngine(config)
    except BaseException as e:  # the parent's constructor raises it
        sender.send(("init_error", portable(e), traceback.format_exc()))
        return
    bm = eng.block_manager
    info = {"device": str(eng.device), "dtype": str(eng.dtype).removeprefix("torch."), "config": eng.config,
            "model_config": eng.model_config, "max_model_len": eng.max_model_len, "vocab_size":
            eng.model_config.vocab_size, "eos_token_ids": eng.eos_token_ids, "has_tokenizer": eng.tokenizer is not None,
            "num_kv_blocks": bm.num_blocks, "kv_block_size": bm.block_size,
            "num_speculative_tokens": eng.num_speculative_tokens, "stats": eng.stats()}
    if not sender.send(("ready", info)):
        eng.close()
        return
    _Loop(eng, cmd_conn, sender).run()


class _Loop:
    def __init__(self, eng: Any, cmd_conn: Any, sender: _Sender):
        self.eng, self.conn, self.sender = eng, cmd_conn, sender
        self._lock = threading.Lock()
        self._cmds: list[tuple] = []
        self._wake = threading.Event()
        self.adds_seen = 0
        self._reported_adds = 0
        self._stats_s = 0.0
        threading.Thread(target=self._read, name="llm-engine-commands", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: stop
                msg = ("stop",)
            with self._lock:
                self._cmds.append(msg)
            self._wake.set()
            if msg[0] == "stop":
                return

    def run(self) -> None:
        eng = self.eng
        while True:
            if not eng.has_unfinished() and not self._cmds:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                cmds, self._cmds = self._cmds, []
            failed: list[tuple[str, BaseException]] = []
            stopping = False
            try:
                for msg in cmds:
                    kind = msg[0]
                    if kind == "add":
                        self._add(msg, failed)
                    elif kind == "abort":
                        eng.abort(msg[1])
                    elif kind == "call":
                        self._call(msg[1], msg[2])
                    elif kind == "stop":
                        stopping = True
                if stopping or self.sender.broken:
                    self._report(eng.stop(), failed, final=True)
                    return
                outs = eng.step()
            except Exception as e:  # a bug outside the model step: fail in-flight requests, keep looping
                log.error("engine loop failed", exc_info=True)
                outs = eng.fail_all(f"{type(e).__name__}: {e}")
            self._report(outs, failed)

    def _add(self, msg: tuple, failed: list) -> None:
        _, rid, ids, params, arrival_s = msg
        self.adds_seen += 1
        try:
            seq = self.eng.make_sequence(rid, ids, params)  # the parent validated; a grammar compiles here
            seq.arrival_s = arrival_s  # the parent's generate() (perf_counter is the system-wide monotonic clock)
            self.eng.add_sequence(seq)
        except Exception as e:  # e.g. EngineOverloaded lost a race: the consumer sees the exception
            failed.append((rid, portable(e)))

    def _call(self, call_id: int, name: str) -> None:
        eng = self.eng
        try:
            if name == "warm_up":
                value = eng.warm_up()
            elif name == "grammar_compiler":  # build it now (0.5-3 s), not inside the first constrained request
                eng.grammar_compiler()
                value = None
            elif name == "stats":
                value = eng.stats()
            else:
                raise ValueError(f"unknown engine call {name!r}")
            self.sender.send(("result", call_id, True, value))
        except Exception as e:  # the caller re-raises it
            self.sender.send(("result", call_id, False, portable(e)))

    def _report(self, outs: list, failed: list, final: bool = False) -> None:
        """One message per step: its outputs, failed adds, the waiting count the parent's admission control reads,
        and a stats snapshot when one is due (every STATS_INTERVAL_S while busy, always when idle)."""
        eng = self.eng
        now = time.perf_counter()
        stats = None
        if final or now - self._stats_s >= STATS_INTERVAL_S or not eng.has_unfinished():
            stats, self._stats_s = eng.stats(), now
        if not (outs or failed or stats is not None or self.adds_seen != self._reported_adds):
            return
        self._reported_adds = self.adds_seen
        self.sender.send(("step", outs, failed, len(eng.scheduler.waiting), self.adds_seen, stats))
