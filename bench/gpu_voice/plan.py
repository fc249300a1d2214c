"""The device call plan for the voice stack on a GPU machine: one call per staged chunk (each carries one chunk
folder into /tmp/vfstage, which persists while the machine stays warm, ~30 s after a call), the install with the
ASR placement measurement in the last chunk's call, then the runs. Every command fits the tool's 2,000 characters
and every call's chunk plus the repository stays under 64 MiB; `scripts/gpu_stage.sh` prints it after staging.

    python3 -m bench.gpu_voice.plan --stage .stage [--groups base,cublas12] [--commit SHA] [--write .stage/plan.md]"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_COMMAND = 2000
MAX_TRAVEL = 64 << 20
ENV = "export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1"
STAGE = "python3 -m bench.gpu_voice.stage"
HOST_FACTS = ("{ nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -V; "
              "python3 -m pip show torch triton numpy onnxruntime tokenizers safetensors jinja2 prometheus-client "
              "matplotlib huggingface-hub tqdm pyyaml requests nvidia-ml-py 2>/dev/null | grep -E '^(Name|Version)';"
              " ldconfig -p | grep -E 'libcublas|libcudnn' | head; df -h /tmp | tail -1; free -g | head -2; } "
              "> $OUT/host.txt 2>&1; cat $OUT/host.txt")


@dataclass
class Call:
    name: str
    command: str
    carry: list[str] = field(default_factory=list)
    timeout_s: int = 600
    expect_s: int = 30  # device seconds this call is expected to hold, transfers included
    optional: bool = False
    note: str = ""

    def check(self) -> None:
        if len(self.command) > MAX_COMMAND:
            raise ValueError(f"call {self.name}: command is {len(self.command)} characters (max {MAX_COMMAND})")
        if len(self.carry) > 8:
            raise ValueError(f"call {self.name}: {len(self.carry)} carry paths (max 8)")

    def to_tool(self) -> dict:
        return {"command": self.command, "carry": self.carry, "timeout_s": self.timeout_s}


def _manifest(stage: Path, group: str) -> dict:
    p = stage / f"{group}.manifest.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run scripts/gpu_stage.sh" + (" --cublas12" if group == "cublas12"
                                                                               else ""))
    return json.loads(p.read_text())


def chunk_calls(stage: Path, group: str, last_command: str, last_expect_s: int, *, optional: bool = False,
                first_extra: str = "") -> list[Call]:
    m = _manifest(stage, group)
    calls = []
    n = len(m["chunks"])
    for k, c in enumerate(m["chunks"], 1):
        path = f"{stage.name}/{c['folder']}"
        cmd = f"{STAGE} receive {path}"
        if k == 1 and first_extra:
            cmd = f"{first_extra}; {cmd}"
        expect = 25 + (60 if k == 1 and not optional and first_extra else 0)
        if k == n:
            cmd += f" && {last_command}"
            expect += last_expect_s
        calls.append(Call(f"{group} {k}/{n}", cmd, [path], 600 if k == n else 180, expect, optional,
                          f"chunk {c['name']} ({c['bytes'] / 2**20:.1f} MiB)"))
    return calls


def run_command(model: str, levels: str, tag: str, commit: str, extra: str = "") -> str:
    return (f"{ENV}; python3 -m bench.gpu_voice.run --model {model} --levels {levels} --out $OUT --tag {tag} "
            f"--commit {commit}{extra} 2>&1 | tee $OUT/{tag}_run.log")


def build_plan(stage: Path, commit: str, groups: list[str]) -> list[Call]:
    """The staging calls, then the runs. With the cuBLAS group (Whisper on the GPU: the measured choice, docs/gpu.md)
    its chunks follow the base ones and its install measures the ASR pools; without it the base install does."""
    gpu_asr = "cublas12" in groups
    install_base = f"{STAGE} install --group base" + ("" if gpu_asr else (
        f" && {ENV} && python3 -m bench.gpu_voice.asr_host --out $OUT/asr_host.json --seconds 12 2>&1 | "
        f"tee $OUT/asr_host.log"))
    calls = chunk_calls(stage, "base", install_base, 20 if gpu_asr else 120, first_extra=HOST_FACTS)
    if gpu_asr:
        install_cublas = (f"{STAGE} install --group cublas12 && {ENV} && python3 -m bench.gpu_voice.asr_host "
                          f"--out $OUT/asr_host_cuda.json --seconds 12 --configs cpu:6x2,cuda:2x1 2>&1 | "
                          f"tee $OUT/asr_host_cuda.log")
        calls += chunk_calls(stage, "cublas12", install_cublas, 60)
    where = "Whisper on the GPU" if gpu_asr else "Whisper on a CPU pool"
    calls += [
        Call("embedded 1,8,32,64", run_command("embedded", "1,8,32,64", "emb", commit), [], 600, 360,
             note=f"SmolLM2-135M on the GPU, {where}, Piper on CPU threads (host defaults). A level that would not "
                  "fit the call's 540 s budget is skipped and listed in emb.md: run it with the next call's "
                  "pattern (--levels <skipped> --tag emb_b)"),
        Call("glm4-9b 1,8,32,64", run_command("glm4-9b", "1,8,32,64", "glm", commit), [], 600, 450,
             note="writes the random checkpoint to /tmp/vf_glm4_9b (~1 min), then every level; skipped levels as "
                  "above with --tag glm_b (the checkpoint is reused while the machine is warm)"),
    ]
    for c in calls:
        c.check()
    return calls


def travel_bytes(repo: Path = ROOT) -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    total = 0
    for name in filter(None, out.split(b"\0")):
        p = repo / name.decode()
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def markdown(calls: list[Call], stage: Path, repo_bytes: int) -> str:
    biggest = max((_chunk_bytes(stage, c) for c in calls), default=0)
    lines = ["# Device call plan: the voice stack on a GPU machine (nvidia-h200)", "",
             f"Repository sent with each call: {repo_bytes / 2**20:.1f} MiB; largest chunk {biggest / 2**20:.1f} MiB; "
             f"together {(repo_bytes + biggest) / 2**20:.1f} MiB of the 64 MiB a call may carry.", "",
             "Make the calls back to back: the machine stays warm ~30 s after each, and /tmp/vfstage, /tmp/site and "
             "/tmp/vf_glm4_9b live only as long as it does. A `receive` that finds a fresh machine, or an `install` "
             "missing chunks, says so: start again from call 1.", ""]
    total = 0
    for i, c in enumerate(calls, 1):
        total += 0 if c.optional else c.expect_s
        lines += [f"## {i}. {c.name}{' (optional)' if c.optional else ''}: ~{c.expect_s} s", ""]
        if c.note:
            lines += [c.note, ""]
        lines += ["```json", json.dumps(c.to_tool(), indent=1), "```", ""]
    lines.insert(4, f"Expected device time, required calls: ~{total / 60:.0f} min plus the machine's start "
                    f"(1-2 min).\n")
    return "\n".join(lines)


def _chunk_bytes(stage: Path, call: Call) -> int:
    return sum(f.stat().st_size for p in call.carry for f in (ROOT / p).glob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_voice.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default=".stage")
    ap.add_argument("--groups", default="base")
    ap.add_argument("--commit", help="recorded in the results (default: git rev-parse --short HEAD)")
    ap.add_argument("--write", help="also write the plan (markdown) here")
    a = ap.parse_args(argv)
    stage = Path(a.stage)
    commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or "unknown"
    try:
        calls = build_plan(stage, commit, a.groups.split(","))
    except (FileNotFoundError, ValueError) as e:
        print(f"[plan] {e}", file=sys.stderr)
        return 1
    repo = travel_bytes()
    text = markdown(calls, stage, repo)
    over = [c.name for c in calls if repo + _chunk_bytes(stage, c) > MAX_TRAVEL - (1 << 20)]
    if over:
        print(f"[plan] calls {over} would send more than 63 MiB: stage with a smaller --chunk-mib", file=sys.stderr)
        return 1
    if a.write:
        Path(a.write).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
