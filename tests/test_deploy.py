"""deploy/ is not built here (no Docker daemon, no systemd in CI), so this checks that every file, command, flag and
setting the Dockerfiles, compose files, systemd unit, scripts and docs name exists and means what they say."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from voicefast.cli import SUBCOMMANDS
from voicefast.config import ServerConfig, env_overrides
from voicefast.serve import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
SERVER_ENV = {"VOICEFAST_" + f.name.upper() for f in fields(ServerConfig)}
LB_ENV = set(re.findall(r"VOICEFAST_LB_\w+|VOICEFAST_REPLICA_\d", (DEPLOY / "haproxy.cfg").read_text()))
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def env_pairs(arg: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in shlex.split(arg))


def check_serve_args(args: list[str]) -> None:
    """`voicefast serve ARGS` parses and yields a valid ServerConfig."""
    ns = build_parser().parse_args(args)
    ServerConfig(**{k: v for k, v in vars(ns).items() if v is not None and k != "api_key"})


def test_there_are_cpu_cuda_and_haproxy_images():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.haproxy"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_names_only_what_exists(dockerfile):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ops = instructions(dockerfile)
    assert ops[0][0] == "FROM"
    for op, arg in ops:
        if op == "COPY":
            *srcs, _dest = shlex.split(arg)
            for src in srcs:  # the build context is the repository root
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
        elif op == "RUN":
            for script in re.findall(r"(?<![\w/])(scripts/[\w./-]+)", arg):
                assert (ROOT / script).is_file() and os.access(ROOT / script, os.X_OK), script
            for cfg in re.findall(r"-f (\S+)", arg):
                assert cfg.startswith("/etc/haproxy/") or (ROOT / cfg).exists(), cfg
        elif op == "ENV":
            for k, v in env_pairs(arg).items():
                if k.startswith("VOICEFAST_LB_") or k.startswith("VOICEFAST_REPLICA"):
                    assert k in LB_ENV, f"{dockerfile.name}: {k} is not read by deploy/haproxy.cfg"
                elif k.startswith("VOICEFAST_") and k != "VOICEFAST_TORCH":
                    assert k in SERVER_ENV, f"{dockerfile.name}: {k} is no `voicefast serve` setting"
                    ServerConfig(**env_overrides({k: v}))  # the value parses
                elif k == "VOICEFAST_TORCH":
                    assert "VOICEFAST_TORCH" in (ROOT / "scripts" / "setup.sh").read_text()
        elif op == "CMD":
            cmd = yaml.safe_load(arg)  # exec form: a JSON list
            if cmd[0] == "voicefast":
                assert "voicefast" in scripts and cmd[1] in SUBCOMMANDS
                check_serve_args(cmd[2:])
            else:
                assert cmd[0] == "haproxy" and "haproxy" in dockerfile.name
                assert cmd[cmd.index("-f") + 1] == "/etc/haproxy/haproxy.cfg"
        elif op == "HEALTHCHECK":
            assert "/healthz" in arg
    if "haproxy" not in dockerfile.name:
        assert ("STOPSIGNAL", "SIGTERM") in ops  # SIGTERM starts the drain


def test_compose_files_build_existing_images_with_real_settings():
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    for doc in (base, gpu):
        for name, svc in doc["services"].items():
            if "build" in svc:
                ctx = (DEPLOY / svc["build"]["context"]).resolve()
                assert ctx == ROOT, name
                assert (ctx / svc["build"]["dockerfile"]).is_file(), name
            for k in svc.get("environment", {}):
                assert k in SERVER_ENV, f"{name}: {k} is no `voicefast serve` setting"
    assert gpu["services"]["voicefast"]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    vf = base["services"]["voicefast"]
    # HAProxy's per-server maxconn must match the replicas' session limit
    maxconn = re.search(r"default-server .*maxconn (\d+)", (DEPLOY / "haproxy.cfg").read_text()).group(1)
    assert vf["environment"]["VOICEFAST_MAX_SESSIONS"] == maxconn == str(ServerConfig().max_sessions)
    grace_s = int(vf["stop_grace_period"].rstrip("s"))
    assert grace_s > float(vf["environment"]["VOICEFAST_DRAIN_TIMEOUT_S"])
    assert base["services"]["haproxy"]["depends_on"] == ["voicefast"]


def test_systemd_unit_runs_a_real_serve_command_and_outlasts_the_drain():
    unit = (DEPLOY / "voicefast@.service").read_text()
    kv = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    cmd = shlex.split(kv["ExecStart"].replace("%i", "8001"))
    assert cmd[0].endswith("/.venv/bin/voicefast") and cmd[1] == "serve"
    check_serve_args(cmd[2:])
    assert kv["KillSignal"] == "SIGTERM" and kv["KillMode"] == "mixed"
    assert int(kv["TimeoutStopSec"]) > ServerConfig().drain_timeout_s
    assert "NCCL_NVLS_ENABLE=0" in kv["Environment"] and "TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in kv["Environment"]


def test_rolling_restart_script_is_valid_bash_and_waits_for_readiness():
    script = DEPLOY / "rolling-restart.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "systemctl restart \"voicefast@${port}\"" in text and "/readyz" in text


@pytest.mark.skipif(HAPROXY is None, reason="Debian's haproxy is not installed (scripts/setup.sh test)")
@pytest.mark.parametrize("docker", [False, True], ids=["hosts", "compose"])
def test_haproxy_config_is_valid(docker):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEFAST_")}
    if docker:
        env["VOICEFAST_LB_DOCKER"] = "1"
    r = subprocess.run([HAPROXY, "-c", "-f", str(DEPLOY / "haproxy.cfg")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_deploy_doc_names_existing_files_and_flags():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"(?<![\w/])((?:deploy|scripts|tests|bench)/[\w@./-]*\w)", doc))
    assert named >= {"deploy/haproxy.cfg", "deploy/compose.yaml", "deploy/voicefast@.service"}
    for p in named - {"bench/out/rolling"}:  # an output folder the benchmark creates
        assert (ROOT / p).exists(), f"docs/deploy.md names {p}, which does not exist"
    flags = set(re.findall(r"voicefast serve[^`\n]*", doc))
    for line in flags:
        args = [a for a in shlex.split(line)[2:] if a.startswith("--")]
        for a in args:
            assert any(a == "--" + f.name.replace("_", "-") for f in fields(ServerConfig)) or a == "--api-key", a
