"""All-reduce latency on the GPUs of one host, in the same call: our one-shot all-reduce over peer-to-peer buffers
(llm_engine/parallel/one_shot.py) vs NCCL, each eager (back-to-back calls from Python) and inside a CUDA graph
(100 chained calls captured, replayed: device time per call), bf16 messages from 8 KiB (a batch-1 GLM-4-9B hidden
vector) to 2 MiB. Also checks the one-shot result against NCCL's (same inputs, every rank).

    python3 bench/tp_allreduce.py [--ranks 2] [--out results.jsonl]      (NCCL_NVLS_ENABLE=0 is forced)"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

from llm_engine.parallel.group import TPGroup, no_multicast_env  # noqa: E402
from llm_engine.parallel.launch import dump_stacks_on_sigusr1  # noqa: E402

SIZES_BYTES = (8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20)
CHAIN = 100  # calls per captured graph


def _eager_us(fn, x, iters: int = 300) -> float:
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def _graph_us(fn, x, replays: int = 20) -> float:
    def chain():
        y = x
        for _ in range(CHAIN):
            y = fn(y)
        return y

    for _ in range(3):  # warm-up (compiles, NCCL channels) eagerly on every rank
        chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(replays):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / (replays * CHAIN)


def _rank(rank: int, world: int, port: int, out: str | None) -> None:
    dump_stacks_on_sigusr1()
    group = TPGroup.init(rank, world, torch.device("cuda", rank), f"tcp://127.0.0.1:{port}")
    custom_ok = group.enable_custom_all_reduce(max(SIZES_BYTES))
    if rank == 0 and not custom_ok:
        print(f"one-shot all-reduce off: {group.custom_reason}", flush=True)
    recs = []

    def nccl(t):
        dist.all_reduce(t)
        return t

    for nbytes in SIZES_BYTES:
        n = nbytes // 2
        g = torch.Generator(device=group.device).manual_seed(rank + 17)
        x = (torch.randn(n, device=group.device, generator=g) * 1e-3).to(torch.bfloat16)  # chained sums stay finite
        rec = {"impl": "all-reduce", "bytes": nbytes, "ranks": world, "device": torch.cuda.get_device_name(),
               "one_shot_off_reason": group.custom_reason}
        rec["nccl_eager_us"] = _eager_us(lambda t: nccl(t.clone()), x)
        rec["nccl_graph_us"] = _graph_us(nccl, x.clone())
        if custom_ok:
            ref = nccl(x.clone())
            got = group.custom(x)
            rec["one_shot_equals_nccl"] = bool(torch.equal(ref, got))
            rec["one_shot_max_abs_diff"] = float((ref.float() - got.float()).abs().max())
            rec["one_shot_eager_us"] = _eager_us(group.custom, x)
            rec["one_shot_graph_us"] = _graph_us(group.custom, x)
        recs.append(rec)
        if rank == 0:
            print(f"all-reduce {nbytes / 1024:7.0f} KiB x{world}: NCCL eager {rec['nccl_eager_us']:7.1f} us, graph "
                  f"{rec['nccl_graph_us']:6.1f} us | one-shot eager {rec.get('one_shot_eager_us', float('nan')):7.1f}"
                  f" us, graph {rec.get('one_shot_graph_us', float('nan')):6.1f} us, equal to NCCL: "
                  f"{rec.get('one_shot_equals_nccl')}", flush=True)
    if rank == 0 and out:
        with open(out, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    group.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < args.ranks:
        print(f"needs {args.ranks} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    no_multicast_env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_rank, args=(args.ranks, port, args.out), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
