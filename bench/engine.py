"""`voicefast bench engine`: serving latency of the LLM engine, vLLM-benchmark style. For each concurrency level
(closed loop) and each Poisson request rate (open loop) it streams requests through AsyncLLMEngine and reports
TTFT, TPOT, ITL p50/p99 and throughput; `--out DIR` writes engine.json. `--compare-transformers` runs
bench/engine_cpu.py instead (batch-1 engine vs transformers on the same weights, plus batch-8)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RequestTrace:
    ok: bool = False
    rejected: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(label: str, traces: list[RequestTrace], wall_s: float) -> dict:
    ok = [t for t in traces if t.ok]
    ttft = [t.ttft_s * 1000 for t in ok]
    tpot = [(t.e2e_s - t.ttft_s) / (t.output_tokens - 1) * 1000 for t in ok if t.output_tokens > 1]
    itl = [x * 1000 for t in ok for x in t.itl_s]
    out_tok = sum(t.output_tokens for t in ok)
    return {
        "label": label, "completed": len(ok), "rejected": sum(t.rejected for t in traces), "wall_s": wall_s,
        "request_throughput_rps": len(ok) / wall_s, "output_throughput_tok_s": out_tok / wall_s,
        "ttft_ms": {"mean": statistics.fmean(ttft) if ttft else float("nan"), "p50": pct(ttft, 50),
                    "p99": pct(ttft, 99)},
        "tpot_ms": {"mean": statistics.fmean(tpot) if tpot else float("nan"), "p50": pct(tpot, 50),
                    "p99": pct(tpot, 99)},
        "itl_ms": {"mean": statistics.fmean(itl) if itl else float("nan"), "p50": pct(itl, 50), "p99": pct(itl, 99)},
    }


async def one_request(aeng, ids: list[int], params) -> RequestTrace:
    from llm_engine import EngineOverloaded

    tr = RequestTrace(prompt_tokens=len(ids))
    t0 = time.perf_counter()
    try:
        stream = aeng.generate(params, prompt_token_ids=ids)
    except EngineOverloaded:
        tr.rejected = True
        return tr
    last = None
    async for out in stream:
        now = time.perf_counter()
        if out.token_ids:
            if last is None:
                tr.ttft_s = now - t0
            else:
                tr.itl_s.append(now - last)
            last = now
            tr.output_tokens += len(out.token_ids)
        if out.finished:
            tr.ok = out.result.finish_reason in ("stop", "length")
    tr.e2e_s = time.perf_counter() - t0
    return tr


async def run_concurrency(aeng, prompts, params, concurrency: int) -> tuple[list[RequestTrace], float]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(ids):
        async with sem:
            return await one_request(aeng, ids, params)

    t0 = time.perf_counter()
    traces = await asyncio.gather(*(guarded(p) for p in prompts))
    return list(traces), time.perf_counter() - t0


async def run_rate(aeng, prompts, params, rate_rps: float, seed: int) -> tuple[list[RequestTrace], float]:
    rng = random.Random(seed)
    tasks = []
    t0 = time.perf_counter()
    for ids in prompts:
        tasks.append(asyncio.create_task(one_request(aeng, ids, params)))
        await asyncio.sleep(rng.expovariate(rate_rps))
    traces = await asyncio.gather(*tasks)
    return list(traces), time.perf_counter() - t0


def make_prompts(n: int, input_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token prompts (vLLM's random dataset), distinct from the first token so no prefix is shared."""
    rng = random.Random(seed)
    lo = min(1000, vocab // 2)
    return [[rng.randrange(lo, vocab) for _ in range(input_tokens)] for _ in range(n)]


def print_table(rows: list[dict]) -> None:
    hdr = (f"{'run':>12} {'done':>5} {'rej':>4} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['label']:>12} {r['completed']:5d} {r['rejected']:4d} {r['request_throughput_rps']:6.2f} "
              f"{r['output_throughput_tok_s']:9.1f} {r['ttft_ms']['p50']:9.1f} {r['ttft_ms']['p99']:9.1f} "
              f"{r['tpot_ms']['p50']:9.1f} {r['tpot_ms']['p99']:9.1f} {r['itl_ms']['p50']:8.1f} "
              f"{r['itl_ms']['p99']:8.1f}")
    print("(latencies in ms; TPOT = (e2e - TTFT) / (output tokens - 1); ITL = gaps between streamed tokens)")


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if "--compare-transformers" in argv:
        from bench.engine_cpu import main as cpu_main

        argv.remove("--compare-transformers")
        return cpu_main(argv)
    ap = argparse.ArgumentParser(prog="voicefast bench engine", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--concurrency", default="1,2,4,8", help="closed-loop levels ('' to skip)")
    ap.add_argument("--rates", default="2,4", help="Poisson request rates in req/s ('' to skip)")
    ap.add_argument("--num-prompts", type=int, default=16, help="requests per run")
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for engine.json")
    ap.add_argument("--compare-transformers", action="store_true", help="see bench/engine_cpu.py")
    args = ap.parse_args(argv)

    from llm_engine import AsyncLLMEngine, EngineConfig, SamplingParams

    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=4 * args.num_prompts)
    aeng = AsyncLLMEngine(cfg)
    vocab = aeng.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    rows: list[dict] = []
    try:
        async def go() -> None:
            # warm-up: one request of each shape
            await one_request(aeng, make_prompts(1, args.input_tokens, vocab, 999)[0], params)
            levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
            for i, c in enumerate(levels):
                prompts = make_prompts(args.num_prompts, args.input_tokens, vocab, args.seed + i)
                traces, wall = await run_concurrency(aeng, prompts, params, c)
                rows.append(summarize(f"conc={c}", traces, wall))
            for j, r in enumerate(float(x) for x in args.rates.split(",") if x.strip()):
                prompts = make_prompts(args.num_prompts, args.input_tokens, vocab, args.seed + 100 + j)
                traces, wall = await run_rate(aeng, prompts, params, r, args.seed + j)
                rows.append(summarize(f"rate={r:g}", traces, wall))

        asyncio.run(go())
        stats = aeng.stats()
    finally:
        aeng.shutdown()
    print(f"model={cfg.model_path().name} device={aeng.engine.device} dtype={aeng.engine.dtype} "
          f"input={args.input_tokens} "
          f"output={args.output_tokens} prompts/run={args.num_prompts} max_num_seqs={args.max_num_seqs}")
    print_table(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"config": vars(args), "device": str(aeng.engine.device), "dtype": str(aeng.engine.dtype),
                  "runs": rows,
                  "engine_stats": asdict(stats)}
        (out / "engine.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'engine.json'}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
