"""What schema-constrained decoding costs per decode step: the same batch decoded free and constrained, step times
side by side, plus the host time spent filling the masks.

    python -m bench.grammar_mask [--batches 1,8] [--steps 64]                       # CPU, embedded SmolLM2
    python3 bench/grammar_mask.py --device cuda --model glm4-9b --batches 1,64 --steps 200 --out $OUT/gm.json

CPU: the embedded SmolLM2-135M (49,152-token vocabulary). CUDA: GLM-4-9B's shape with random bf16 weights and a
synthetic byte-level BPE tokenizer of GLM-4's 151,552 tokens (bench/synthetic_tokenizer.py), through the engine's
GPU runner (whole-step CUDA graphs; constrained rows are masked and re-sampled outside the captured step while the
host filled their masks during the replay). Each request decodes `--steps` timed tokens after a warm-up (in
`--rounds` alternating free / constrained blocks, medians over rounds); the
constrained ones follow a JSON Schema that cannot end within them (an array of >= 1,000 small objects with an
enum, a bounded integer, a boolean and a short free string), so every timed step is masked. Reported per batch:
median step ms free vs constrained (= ms per token of each stream: both decode without speculative drafts, as a
constrained request always does), the added %, and the host mask-fill ms per step. A correctness check decodes a
few finite-schema requests and parses their JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "qty": {"type": "integer", "minimum": 1, "maximum": 500},
        "gift": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 24}},
    "required": ["size", "qty", "gift", "note"], "additionalProperties": False}}
FINITE = {"type": "object", "properties": {"size": {"type": "string", "enum": ["small", "large"]},
                                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["size", "qty"], "additionalProperties": False}


def cpu_engine():
    from llm_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(device="cpu", max_num_seqs=64, kv_cache_memory_mib=512, max_num_batched_tokens=512))


def gpu_engine(name: str):
    import torch

    from bench import decode_gpu as D
    from bench.synthetic_tokenizer import build_byte_bpe
    from llm_engine.tokenizer import Tokenizer

    tk = build_byte_bpe(D.SHAPES[name]["vocab_size"])
    tok = Tokenizer(tk, eos_token_ids=[tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|user|>"),
                                       tk.token_to_id("<|observation|>")])
    model = D.make_model(name, "bf16")
    eng = D.make_engine(model)
    eng.tokenizer = tok
    eng.eos_token_ids = frozenset(tok.eos_token_ids)
    torch.cuda.synchronize()
    return eng


def timed_steps(eng, batch: int, constrained: bool, steps: int, warm: int, prompt_len: int, seed: int) -> dict:
    import numpy as np

    from llm_engine import SamplingParams

    rng = np.random.default_rng(seed)
    comp = eng.grammar_compiler()
    fill_s: list[float] = []
    orig = comp.fill_bitmasks

    def timed_fill(states, out):
        t = time.perf_counter()
        orig(states, out)
        fill_s.append(time.perf_counter() - t)

    comp.fill_bitmasks = timed_fill
    vocab = min(eng.model_config.vocab_size, eng.tokenizer.vocab_size) - 16
    # speculate=False: the free baseline decodes one token per step like a constrained request (which never
    # speculates), so the difference is the mask alone
    sp = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=warm + steps + 8, ignore_eos=True,
                        json_schema=SCHEMA if constrained else None, speculate=False)
    rids = [eng.add_request(None, rng.integers(0, vocab, prompt_len).tolist(), sp) for _ in range(batch)]
    seqs = [eng._seqs[r] for r in rids]
    while min(s.num_completion_tokens for s in seqs) < warm:  # prefill + warm-up decodes
        eng.step()
    fill_s.clear()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        outs = eng.step()
        times.append(time.perf_counter() - t)
        assert len(outs) == batch, f"expected one token per stream, got {len(outs)}"
    comp.fill_bitmasks = orig
    for r in rids:
        eng.abort(r)
    eng.step()
    return {"step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * statistics.fmean(times),
            "mask_fill_ms_per_step": 1e3 * sum(fill_s) / steps if constrained else 0.0,
            "masked_steps": len(fill_s)}


def _median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def correctness(eng, n: int = 4) -> dict:
    from llm_engine import SamplingParams

    ids = eng.tokenizer.encode("Order as JSON:")
    res = eng.generate([ids] * n, SamplingParams(temperature=1.0, max_tokens=64, json_schema=FINITE))
    parsed = []
    for _, r in res:
        try:
            obj = json.loads(r.text)
            parsed.append(r.finish_reason == "stop" and obj["size"] in ("small", "large") and 1 <= obj["qty"] <= 9
                          and set(obj) == {"size", "qty"})
        except (json.JSONDecodeError, KeyError, TypeError):
            parsed.append(False)
    return {"requests": n, "valid": sum(parsed), "texts": [r.text for _, r in res]}


def machine(device: str) -> dict:
    import torch

    m = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
         "torch": torch.__version__}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name(0)
    try:
        m["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        m["commit"] = None
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="glm4-9b", help="CUDA: a shape of bench/decode_gpu.py SHAPES")
    ap.add_argument("--batches", default=None, help="default 1,8 on CPU, 1,64 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 48 CPU, 200 CUDA)")
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="free/constrained alternations")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    batches = [int(b) for b in (args.batches or ("1,64" if cuda else "1,8")).split(",")]
    steps = args.steps or (200 if cuda else 48)
    t0 = time.time()
    eng = gpu_engine(args.model) if cuda else cpu_engine()
    model = f"{args.model} (random bf16 weights, synthetic 151,552-token BPE)" if cuda else "SmolLM2-135M (embedded)"
    print(f"engine ready in {time.time() - t0:.0f} s: {model}, runner {type(eng.runner).__name__}", flush=True)
    t = time.perf_counter()
    eng.grammar_compiler()
    tok_init_s = time.perf_counter() - t
    rows = []
    for b in batches:
        # Free and constrained alternate over `rounds` (fresh requests each): a machine whose speed drifts
        # affects both alike; the figure is the median over rounds.
        runs = {False: [], True: []}
        for r in range(args.rounds):
            for constrained in (False, True):
                runs[constrained].append(timed_steps(eng, b, constrained, steps // args.rounds, args.warm,
                                                     args.prompt_len, seed=1000 * b + r))
        free, con = (_median_run(runs[c]) for c in (False, True))
        added = 100 * (con["step_ms_median"] / free["step_ms_median"] - 1)
        rows.append({"batch": b, "free": free, "constrained": con, "added_pct": added, "rounds": args.rounds})
        print(f"batch {b:3d}: free {free['step_ms_median']:.3f} ms/step, constrained {con['step_ms_median']:.3f} "
              f"ms/step ({added:+.1f}%), host mask fill {con['mask_fill_ms_per_step']:.3f} ms/step", flush=True)
    check = correctness(eng)
    print(f"correctness: {check['valid']}/{check['requests']} finite-schema outputs valid", flush=True)
    res = {"command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine(args.device), "model": model, "steps": steps, "grammar_tokenizer_init_s": tok_init_s,
           "schema": SCHEMA, "rows": rows, "correctness": check}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if check["valid"] == check["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
