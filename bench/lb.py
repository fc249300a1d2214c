"""Local replicas behind HAProxy (deploy/haproxy.cfg, unmodified: addresses come through its environment
variables), as child processes: the harness of tests/test_haproxy.py and `voicefast bench rolling`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
# The server names of deploy/haproxy.cfg's backend, in order.
SERVER_NAMES = ("r1", "r2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def wait_for(pred, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def fake_replica_cmd(name: str, port: int, drain_timeout_s: float = 120.0, *extra: str) -> list[str]:
    """A replica with the test fakes for the models (tests/fake_replica.py): routing and drain, not speed."""
    return [sys.executable, str(ROOT / "tests" / "fake_replica.py"), "--name", name, "--port", str(port),
            "--drain-timeout-s", str(drain_timeout_s), *extra]


def real_replica_cmd(name: str, port: int, drain_timeout_s: float = 120.0, *extra: str) -> list[str]:
    """`voicefast serve` with the real models."""
    return [sys.executable, "-m", "voicefast", "serve", "--port", str(port), "--drain-timeout-s",
            str(drain_timeout_s), *extra]


class Replica:
    """One replica process on 127.0.0.1:`port`; its output goes to `log_path`."""

    def __init__(self, name: str, port: int, cmd: list[str], log_path: Path):
        self.name, self.port, self.cmd, self.log_path = name, port, cmd, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 120.0) -> Replica:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wait_for(lambda: self._exited() or self.readyz()[0] == 200, ready_timeout_s, f"replica {self.name} ready")
        if self._exited():
            raise RuntimeError(f"replica {self.name} exited with {self.proc.returncode}: {self.log_tail()}")
        return self

    def readyz(self) -> tuple[int, dict]:
        status, body = http_get(f"http://{self.addr}/readyz")
        try:
            return status, json.loads(body) if body else {}
        except json.JSONDecodeError:
            return status, {}

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def terminate(self) -> None:
        """SIGTERM: the replica drains (voicefast.serve)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class LoadBalancer:
    """HAProxy in the foreground with deploy/haproxy.cfg; `replicas` fill its servers r1, r2."""

    def __init__(self, replicas: list[str], log_path: Path, port: int | None = None):
        if len(replicas) != len(SERVER_NAMES):
            raise ValueError(f"deploy/haproxy.cfg names {len(SERVER_NAMES)} servers, got {len(replicas)} replicas")
        self.port, self.stats_port = port or free_port(), free_port()
        self.replicas, self.log_path = replicas, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, VOICEFAST_LB_BIND=f"127.0.0.1:{self.port}",
                   VOICEFAST_LB_STATS_BIND=f"127.0.0.1:{self.stats_port}")
        for i, addr in enumerate(self.replicas, 1):
            env[f"VOICEFAST_REPLICA_{i}"] = addr
        return env

    def start(self, timeout_s: float = 30.0) -> LoadBalancer:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([exe, "-db", "-f", str(HAPROXY_CFG)], stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env())
        wait_for(lambda: self.proc.poll() is not None or http_get(self.stats_url())[0] == 200, timeout_s,
                 "haproxy stats page")
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        return self

    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}/stats;csv"

    def server_status(self) -> dict[str, str]:
        """Backend server name -> "UP" | "DOWN" | ... from HAProxy's CSV stats."""
        status, body = http_get(self.stats_url())
        out = {}
        if status != 200:
            return out
        lines = body.decode().splitlines()
        cols = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(cols, line.split(","), strict=False))
            if row.get("pxname") == "voicefast" and row.get("svname") in SERVER_NAMES:
                out[row["svname"]] = row.get("status", "")
        return out

    def wait_status(self, want: dict[str, str], timeout_s: float = 30.0) -> None:
        wait_for(lambda: all(self.server_status().get(k, "").startswith(v) for k, v in want.items()), timeout_s,
                 f"haproxy servers {want}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
