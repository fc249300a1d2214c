"""Which engine steps stall on first use, and why (issue 14: the first turn of a session waited 0.5-2 s for its
first token on the H200 while later turns took ~60 ms).

Builds the engine as `voicefast serve` does (embedded SmolLM2 unless --model; its own warm-up, LLMEngine.warm_up,
which --no-warm-up skips to show what it saves; the server's warm-up request),
then replays what callers do — one persona + user turn at a time with the server's sampling (temperature 0.3,
top-p 0.9), then 8, 16 and 32 turns at once — twice. Every step slower than --slow-ms is printed with what it
ran (sequences, prefill tokens) and the Triton kernels compiled during it (new entries in a fresh
TRITON_CACHE_DIR). The second pass shows what a warmed engine costs.

    python3 -m bench.gpu_voice.first_use --out $OUT/first_use.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

QUESTIONS = ["Hi.", "What time do you open on Saturday?", "Can I book a table for four people tomorrow at seven?",
             "Do you have any vegetarian dishes, and is there parking nearby for the evening?",
             "I'd like to change my reservation from Friday to Sunday, same time, under the name Alexander Ramirez, "
             "and could you also tell me whether the terrace will be open if the weather is good?",
             "Thanks, bye."]


def _cache_entries(d: Path) -> set[str]:
    """One entry per compiled kernel variant: `<hash dir>/<kernel>.json` (each specialization of a kernel gets its
    own hash directory holding the same file name, so the name alone would count a kernel once)."""
    return {str(p.relative_to(d)) for p in d.glob("*/*.json") if not p.name.startswith("__grp__")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="LLM (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slow-ms", type=float, default=30.0)
    ap.add_argument("--no-warm-up", action="store_true", help="skip the engine's own warm-up (shows its effect)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cache = Path(tempfile.mkdtemp(prefix="triton_cache_"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # fresh: every compile shows up as a new entry

    from llm_engine import EngineConfig, LLMEngine, SamplingParams
    from voicefast.persona import DEFAULT_INSTRUCTIONS

    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=a.model, device=a.device, max_num_seqs=64, max_model_len=4096))
    load_s = time.perf_counter() - t0
    warm = getattr(eng, "warm_up", None)
    warm_s = warm_report = None
    if warm is not None and not a.no_warm_up:
        t1 = time.perf_counter()
        report = warm()
        warm_s = time.perf_counter() - t1
        if report is not None:
            warm_report = {"requests": report.requests, "steps": report.steps, "errors": report.errors,
                           "compiled": len(_cache_entries(cache))}
            print(f"[first_use] engine warm-up: {warm_s:.2f} s, {warm_report}", flush=True)
    tok = eng.tokenizer
    system = {"role": "system", "content": DEFAULT_INSTRUCTIONS}
    steps: list[dict] = []
    seen = _cache_entries(cache)

    def run(label: str, prompts: list[list[int]], sp) -> dict:
        nonlocal seen
        t_add = time.perf_counter()
        rids = {eng.add_request(None, p, sp): None for p in prompts}
        first: dict[str, float] = {}
        done = 0
        while done < len(rids):
            sched = eng.scheduler.running if hasattr(eng, "scheduler") else None
            n_before = len(sched) if sched is not None else None
            ts = time.perf_counter()
            outs = eng.step()
            dt = (time.perf_counter() - ts) * 1000
            now = _cache_entries(cache)
            new = sorted(now - seen)
            seen = now
            if dt > a.slow_ms or new:
                steps.append({"phase": label, "step_ms": round(dt, 2), "running_before": n_before,
                              "compiled": new})
                print(f"[first_use] {label}: step {dt:.1f} ms, compiled {new}", flush=True)
            for o in outs:
                if o.request_id in rids and o.request_id not in first and o.token_ids:
                    first[o.request_id] = (time.perf_counter() - t_add) * 1000
                if o.result is not None and o.request_id in rids:
                    done += 1
        ttfts = sorted(first.values())
        return {"phase": label, "n": len(prompts), "ttft_ms_max": round(ttfts[-1], 2),
                "ttft_ms_min": round(ttfts[0], 2)}

    sp_greedy = SamplingParams(temperature=0.0, max_tokens=1)
    sp = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=40)
    results = []
    # the server's warm-up request (voicefast.loader.warm_up)
    results.append(run("server warm-up", [tok.apply_chat_template([system, {"role": "user", "content": "Hello"}],
                                                                   add_generation_prompt=True)], sp_greedy))
    for rep in (1, 2):
        for i, q in enumerate(QUESTIONS):
            ids = tok.apply_chat_template([system, {"role": "user", "content": q}], add_generation_prompt=True)
            results.append(run(f"pass {rep}: single {i} ({len(ids)} tokens)", [ids], sp))
        for n in (8, 16, 32):
            prompts = [tok.apply_chat_template([system, {"role": "user", "content": f"{QUESTIONS[k % 6]} ({rep}.{k})"}],
                                               add_generation_prompt=True) for k in range(n)]
            results.append(run(f"pass {rep}: {n} at once", prompts, sp))
    for r in results:
        print(f"[first_use] {r['phase']}: TTFT min/max {r['ttft_ms_min']}/{r['ttft_ms_max']} ms")
    Path(a.out).write_text(json.dumps({"load_s": load_s, "warm_up_s": warm_s, "warm_up": warm_report,
                                       "results": results, "slow_steps": steps, "compiled_total": sorted(seen)},
                                      indent=1))
    print(f"[first_use] load {load_s:.1f} s, warm-up {warm_s} s, {len(seen)} kernels compiled in all", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
