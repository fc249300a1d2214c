"""One GPU call, every figure: the stages below run one after another as subprocesses (a crash or a hang in one
loses only its own figures), each under a time budget, all of them inside one overall deadline, writing under
--out (at most 8 files come back from a device call):

  checks    bench/gpu_check.py --skip-timing: every Triton kernel vs its torch reference at real shapes, compiled
  decode    bench/decode_gpu.py: GLM-4-9B bf16 (batch 1, 8, 32, 64; graph replay; cached-persona TTFT; the same
            with cuBLAS only, before vs after) / int4 / int8, SmolLM2-135M bf16; graph == eager greedy check
  peers     bench/gpu_peers.py: transformers eager, static cache + torch.compile, int4 tinygemm, same shapes
  spec      bench/spec_gpu.py: speculative decoding, the real-model acceptance trace replayed at the GPU shapes
  timings   bench/gpu_check.py --linears-only: per-kernel times vs byte floors (linears before/after, norms)
  pytest    the GPU tests, compiled kernels (tests/test_gpu_runner.py, test_kernels.py, test_quant.py)

    python3 bench/gpu_suite.py --out $OUT [--deadline-s 530] [--commit SHA]"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stages(out: str, commit: str) -> list[tuple[str, list[str], float]]:
    py = sys.executable
    return [
        ("checks", [py, "bench/gpu_check.py", "--skip-timing", "--skip-graph", "--json", f"{out}/gpu_check.json"],
         100),
        ("decode", [py, "bench/decode_gpu.py", "--check", "--ab-gemv", "--models",
                    "glm4-9b:bf16+int4+int8,smollm2-135m:bf16", "--commit", commit, "--out",
                    f"{out}/decode_gpu.json"], 180),
        ("peers", [py, "bench/gpu_peers.py", "--out", f"{out}/peers.jsonl", "--budget-s", "170"], 210),
        ("fold", [py, "bench/decode_gpu.py", "--peers", f"{out}/peers.jsonl", "--out", f"{out}/decode_gpu.json",
                  "--commit", commit], 20),
        ("spec", [py, "bench/spec_gpu.py", "--turns", "12", "--out", f"{out}/spec_gpu.json"], 80),
        ("timings", [py, "bench/gpu_check.py", "--skip-checks", "--skip-graph", "--linears-only",
                     "--json", f"{out}/gpu_timings.json"], 60),
        ("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_runner.py",
                    "tests/test_kernels.py", "tests/test_quant.py"], 60),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--deadline-s", type=float, default=530.0, help="all stages end by then (a call allows 600)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--only", default=None, help="comma-separated stage names")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    t0 = time.time()
    summary = []
    for name, cmd, budget in stages(args.out, args.commit):
        if args.only and name not in args.only.split(","):
            continue
        left = args.deadline_s - (time.time() - t0)
        if left < 15:
            summary.append(f"{name:8s} SKIPPED (deadline)")
            continue
        limit = min(budget, left)
        print(f"\n===== {name} (budget {limit:.0f} s): {' '.join(cmd[1:])}", flush=True)
        s = time.time()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=max(10.0, limit)).returncode
            status = f"rc={rc}"
        except subprocess.TimeoutExpired:
            status = "TIMEOUT (partial results kept)"
        summary.append(f"{name:8s} {status:32s} {time.time() - s:6.1f} s")
    print("\n===== suite summary (total %.0f s)" % (time.time() - t0))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
