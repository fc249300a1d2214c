"""Eager prefill steps on a GPU: the per-sequence SDPA loop (old) against the varlen Triton kernel (new), one run.

For the embedded SmolLM2-135M (random weights of its shape when the asset is not installed) and the GLM-4-9B shape
(random weights): build the engine as the server does (CUDA graphs for decode, prefix caching) with a token budget
that fits 32 x 200 new tokens in one step, run engine.warm_up(), then for 1 / 8 / 32 sequences x (176 cached + 24
new) and (0 cached + 200 new) tokens, per backend (VOICEFAST_PREFILL_ATTN's two values): the wall time of
LLMEngine.step() for the step that prefills them all and samples their first token (the first step of each shape
apart, then the median of --reps), and the operations per step (bench/prefill_ops.py's counter: torch calls,
aten ops, Triton launches, host reads). Also:
- fresh shapes: one sequence with a cached 176-token prefix and a new length every step (what a voice server
  meets: every turn's new-token count differs), old path with cuDNN attention allowed (torch's default on
  Hopper) and with it disabled, and the new kernel: shows what a never-seen SDPA shape costs;
- agreement: for three batches the step's forward runs with both backends on the same inputs; the max abs
  difference of the sampled rows' logits, the largest |logit|, and how many argmaxes agree.

    python3 -m bench.prefill_gpu --out $OUT/prefill.json [--models smollm2,glm4-9b] [--reps 20]
    python3 -m bench.prefill_gpu --smoke --out /tmp/prefill.json    (CPU: tiny model, kernels interpreted)"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

CASES = [(1, 176, 24), (8, 176, 24), (32, 176, 24), (1, 0, 200), (8, 0, 200), (32, 0, 200)]
CHECKS = [(1, 176, 24), (8, 176, 24), (8, 0, 200)]
FRESH = (176, (25, 45, 65), 20)  # cached prefix, first new length per series, steps per series
SMOKE = dict(cases=[(1, 16, 3), (3, 16, 3), (2, 0, 9)], checks=[(3, 16, 3), (2, 0, 9)], fresh=(16, (2, 5, 8), 3))


def log(msg: str) -> None:
    print(f"[prefill_gpu] {msg}", flush=True)


def _random_model(shape: str, device: str):
    import torch

    from bench.decode_gpu import SHAPES
    from llm_engine.model_config import ModelConfig
    from llm_engine.models.decoder import build_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = ModelConfig(max_position_embeddings=4096, dtype=dtype, **SHAPES[shape])
    model = build_model(cfg, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # drawn on the device
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def _tiny_model():
    from llm_engine.model_config import ModelConfig
    from llm_engine.models import build_model
    from llm_engine.models.weights import init_random_weights

    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=72, intermediate_size=144, num_layers=2,
                      num_heads=9, num_kv_heads=3, head_dim=16, max_position_embeddings=1024)
    return init_random_weights(build_model(cfg), seed=0, std=0.3)


def build(name: str, device: str, smoke: bool):
    """(engine, what the weights are)."""
    from bench.prefill_ops import make_engine

    if smoke:
        return make_engine(_tiny_model(), device, num_kv_blocks=2048, max_model_len=1024), "tiny random (smoke)"
    if name == "smollm2":
        from model_assets import MissingAssetError

        try:
            from llm_engine import EngineConfig, LLMEngine

            eng = LLMEngine(EngineConfig(device=device, max_num_seqs=64, max_num_batched_tokens=8192,
                                         max_model_len=2048, speculative_tokens=0))
            return eng, "embedded SmolLM2-135M-Instruct"
        except MissingAssetError as e:
            log(f"embedded SmolLM2 missing ({e}): random weights of its shape")
            return make_engine(_random_model("smollm2-135m", device), device), "random, SmolLM2-135M shape"
    return make_engine(_random_model("glm4-9b", device), device), "random, GLM-4-9B-0414 shape"


def _timed(steps, n, cached, new, reps) -> dict:
    first, tokens = steps.step(n, cached, new)
    ts = []
    for _ in range(reps):
        dt, tok = steps.step(n, cached, new)
        ts.append(dt)
        if tok != tokens:
            raise RuntimeError(f"a timed step computed {tok} tokens, the first {tokens}")
    if tokens != n * new:
        raise RuntimeError(f"{n} x ({cached} + {new}): the step computed {tokens} tokens, not {n * new} (the prefix "
                           "cache missed, or the budget split the batch)")
    return {"first_ms": round(first * 1e3, 2), "median_ms": round(statistics.median(ts) * 1e3, 2),
            "min_ms": round(min(ts) * 1e3, 2), "max_ms": round(max(ts) * 1e3, 2), "tokens": tokens}


def _fresh(steps, cached: int, start: int, count: int) -> dict:
    ts = [steps.step(1, cached, start + i)[0] for i in range(count)]
    return {"cached": cached, "new_tokens": f"{start}..{start + count - 1}",
            "median_ms": round(statistics.median(ts) * 1e3, 2),
            "max_ms": round(max(ts) * 1e3, 2), "min_ms": round(min(ts) * 1e3, 2)}


def _agreement(eng, steps, set_backend, checks) -> list[dict]:
    out, forward = [], eng.runner.forward
    model = eng.model

    for n, cached, new in checks:
        got = {}

        def both(inp, got=got):
            h = None
            for name in ("sdpa", "triton"):
                set_backend(name)
                h = forward(inp)  # the same K/V written to the same slots twice: idempotent
                got[name] = model.compute_logits(h.index_select(0, inp.logits_indices))
            return h

        eng.runner.forward = both
        try:
            steps.step(n, cached, new)
        finally:
            eng.runner.forward = forward
        old, new_l = got["sdpa"].float(), got["triton"].float()
        out.append({"seqs": n, "cached": cached, "new": new,
                    "max_abs_diff": float((old - new_l).abs().max()), "max_abs_logit": float(old.abs().max()),
                    "argmax_agree": f"{int((old.argmax(-1) == new_l.argmax(-1)).sum())}/{old.shape[0]}"})
    return out


def run_model(name: str, device: str, reps: int, warm: bool, smoke: bool, cases=CASES, checks=CHECKS,
              fresh=FRESH) -> dict:
    import torch

    from bench.prefill_ops import OpCounter, PrefillSteps, count_cases, instrument
    from llm_engine.kernels import set_prefill_attention_backend

    t0 = time.perf_counter()
    eng, weights = build(name, device, smoke)
    res = {"model": name, "weights": weights, "layers": eng.model_config.num_layers,
           "heads": [eng.model_config.num_heads, eng.model_config.num_kv_heads, eng.model_config.head_dim],
           "build_s": round(time.perf_counter() - t0, 1)}
    log(f"{name}: {weights}, built in {res['build_s']} s")
    if warm:
        t1 = time.perf_counter()
        report = eng.warm_up(force=smoke)
        res["warm_up_s"] = round(time.perf_counter() - t1, 1)
        res["warm_up"] = None if report is None else {"requests": report.requests, "steps": report.steps,
                                                      "errors": report.errors}
        log(f"{name}: warm-up {res['warm_up_s']} s {res['warm_up']}")
    steps = PrefillSteps(eng, seed=7)
    counter = OpCounter()
    instrument(counter, eng.runner, eng.model)
    res["timing"], res["ops"] = {}, {}
    for backend in ("sdpa", "triton"):
        set_prefill_attention_backend(backend)
        res["timing"][backend] = [dict(seqs=n, cached=c, new=w, **_timed(steps, n, c, w, reps)) for n, c, w in cases]
        for r in res["timing"][backend]:
            log(f"{name} {backend:>6}: {r['seqs']:>2} x ({r['cached']:>3} + {r['new']:>3}): first "
                f"{r['first_ms']:8.2f} ms, median {r['median_ms']:8.2f} ms")
        res["ops"][backend] = [{k: v for k, v in row.items() if k != "phases"} | {"phases": row["phases"]}
                               for row in count_cases(eng, steps, counter, cases)]
    res["fresh_shapes"] = {}
    cached, starts, count = fresh
    set_prefill_attention_backend("sdpa")
    res["fresh_shapes"]["sdpa"] = _fresh(steps, cached, starts[0], count)
    if device == "cuda":
        res["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        res["fresh_shapes"]["sdpa_no_cudnn"] = _fresh(steps, cached, starts[1], count)
        torch.backends.cuda.enable_cudnn_sdp(True)
    set_prefill_attention_backend("triton")
    res["fresh_shapes"]["triton"] = _fresh(steps, cached, starts[2], count)
    log(f"{name} fresh shapes: {res['fresh_shapes']}")
    res["agreement"] = _agreement(eng, steps, set_prefill_attention_backend, checks)
    set_prefill_attention_backend("triton")
    log(f"{name} agreement (sdpa vs triton logits): {res['agreement']}")
    del steps, counter
    eng.close()
    del eng
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def table(results: list[dict]) -> str:
    lines = ["model      seqs x (cached + new) |  old ms (first) |  new ms (first) | speed-up | torch calls old -> new"]
    for r in results:
        old, new = r["timing"]["sdpa"], r["timing"]["triton"]
        ops_o, ops_n = r["ops"]["sdpa"], r["ops"]["triton"]
        for a, b, oa, ob in zip(old, new, ops_o, ops_n, strict=True):
            lines.append(f"{r['model']:<10} {a['seqs']:>2} x ({a['cached']:>3} + {a['new']:>3})    | "
                         f"{a['median_ms']:7.2f} ({a['first_ms']:7.1f}) | {b['median_ms']:7.2f} ({b['first_ms']:7.1f}) "
                         f"| {a['median_ms'] / max(b['median_ms'], 1e-9):6.2f}x | "
                         f"{oa['totals'].get('torch', 0):>6} -> {ob['totals'].get('torch', 0):>5}")
        fr = r["fresh_shapes"]
        lines.append(f"{r['model']:<10} a new shape each step (1 seq, cached prefix + a new length): "
                     + ", ".join(f"{k} median {v['median_ms']} max {v['max_ms']} ms" for k, v in fr.items()))
        worst = max(a["max_abs_diff"] for a in r["agreement"])
        lines.append(f"{r['model']:<10} logits old vs new: max abs diff {worst:.4g} (|logit| <= "
                     f"{max(a['max_abs_logit'] for a in r['agreement']):.3g}); argmax agree "
                     + ", ".join(a["argmax_agree"] for a in r["agreement"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="smollm2,glm4-9b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-warm-up", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, kernels interpreted")
    a = ap.parse_args(argv)
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from llm_engine import ops

    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device (use --smoke on a CPU)")
        return 2
    meta = {"command": " ".join([sys.executable, "-m", "bench.prefill_gpu", *(argv or sys.argv[1:])]),
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None}
    import triton

    meta["triton"] = triton.__version__
    results = []
    models = ["smoke"] if a.smoke else a.models.split(",")
    for name in models:
        if a.smoke:  # (no warm-up: hundreds of interpreted steps)
            with ops.kernels_on_cpu():
                results.append(run_model(name, device, min(a.reps, 2), False, True, **SMOKE))
        else:
            results.append(run_model(name, device, a.reps, not a.no_warm_up, False))
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
