"""GPU decode benchmark: our engine (LLMEngine + GpuModelRunner, whole-step CUDA graphs, Triton kernels) on
random weights of real shapes — GLM-4-9B-0414, GLM-Edge-1.5B, SmolLM2-135M — in bf16, int8 and int4.

    python3 bench/decode_gpu.py --out $OUT/decode_gpu.json [--models glm4-9b,...] [--dtypes bf16,int8,int4]
           [--commit SHA] [--peers $OUT/baseline.jsonl]

Per (model, dtype): batch 1 with 32- and 1,024-token prompts (engine path: tok/s, TTFT, ITL), batch 8/32/64
with 32-token prompts (aggregate tok/s, TTFT/TPOT/ITL p50/p99), and the device-side step time of the captured
graph alone (impl "voicefast-graph": replays back to back, no host work between steps). The copy bandwidth is
measured in the same run; limit_tok_s = batch * bandwidth / bytes read per step (weights only, KV ignored).
Peers (transformers eager / static+compile / int4 tinygemm, /work/shared/peers) run in the same job;
--peers folds their JSON lines into the same records."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from llm_engine.config import EngineConfig  # noqa: E402
from llm_engine.engine import LLMEngine  # noqa: E402
from llm_engine.model_config import ModelConfig  # noqa: E402
from llm_engine.models.decoder import build_model  # noqa: E402
from llm_engine.quant import quantize_model  # noqa: E402
from llm_engine.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    "glm4-9b": dict(family="glm4", vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_layers=40,
                    num_heads=32, num_kv_heads=2, head_dim=128, partial_rotary_factor=0.5, rope_interleaved=True,
                    attention_bias=True, post_branch_norms=True, tie_word_embeddings=False),
    "glm-edge-1.5b": dict(family="glm", vocab_size=59264, hidden_size=2048, intermediate_size=6144, num_layers=28,
                          num_heads=16, num_kv_heads=4, head_dim=128, partial_rotary_factor=1.0,
                          rope_interleaved=True, attention_bias=False, tie_word_embeddings=True),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
}
MAX_MODEL_LEN = 2048
IMPL_SUFFIX = [""]  # " (cuBLAS)" while the A/B run with the Triton GEMV switched off
MAX_SEQS = 64
dev = torch.device("cuda")


def log(msg: str) -> None:
    print(msg, flush=True)


def copy_bw_gbs() -> float:
    import triton.testing
    n = 2 * 1024**3
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda a=a, b=b: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (ms / 1e3) / 1e9


def make_model(name: str, dtype: str, seed: int = 0) -> nn.Module:
    cfg = ModelConfig(max_position_embeddings=4096, dtype=torch.bfloat16, **SHAPES[name])
    model = build_model(cfg, dev, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # random weights, drawn on the device
            if pname.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    if dtype in ("int8", "int4"):
        quantize_model(model, dtype, include_lm_head=True)
    torch.cuda.empty_cache()
    return model


def bytes_per_token(model: nn.Module) -> int:
    """Bytes every decode step must read: all weights except the embedding table (rows are gathered), unless
    the embedding doubles as the (unquantized) lm_head."""
    emb = model.model.embed_tokens.weight
    lm = model.lm_head
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("cos_sin")]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        emb_is_head = isinstance(lm, nn.Linear) and lm.weight.data_ptr() == emb.data_ptr()
        if t.data_ptr() == emb.data_ptr() and not emb_is_head:
            continue
        total += t.numel() * t.element_size()
    return total


def make_engine(model) -> LLMEngine:
    bs = 16
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=MAX_SEQS, kv_block_size=bs,
                       num_kv_blocks=MAX_SEQS * (MAX_MODEL_LEN // bs) // 4 + 256, max_num_batched_tokens=2048,
                       max_waiting=1024, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=True)
    return LLMEngine(cfg, model=model)


_req = [0]


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def run_requests(engine: LLMEngine, batch: int, prompt_len: int, gen: int, vocab: int) -> dict:
    rng = np.random.default_rng(_req[0])
    # plain decoding: random weights make greedy loops that prompt lookup would draft (bench/spec_gpu.py measures it)
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True, speculate=False)
    times: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for _ in range(batch):
        _req[0] += 1
        rid = f"r{_req[0]}"
        times[rid] = []
        engine.add_request(rid, rng.integers(0, vocab, prompt_len).tolist(), params)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.token_ids:
                times[o.request_id].extend([now] * len(o.token_ids))
    ttft = [t[0] - t0 for t in times.values()]
    itl = np.concatenate([np.diff(t) for t in times.values()]) * 1e3
    first = min(t[0] for t in times.values())
    last = max(t[-1] for t in times.values())
    n_decode = sum(len(t) - 1 for t in times.values())
    return dict(tok_s=n_decode / (last - first), ttft_p50_ms=float(np.percentile(ttft, 50) * 1e3),
                ttft_p99_ms=float(np.percentile(ttft, 99) * 1e3), tpot_ms=float(itl.mean()),
                itl_p50_ms=float(np.percentile(itl, 50)), itl_p99_ms=float(np.percentile(itl, 99)),
                tok_s_per_stream=n_decode / batch / (last - first), gen_tokens=gen)


@torch.inference_mode()
def graph_step_ms(engine: LLMEngine, b: int, ctx: int, n: int = 100) -> float:
    """Device time of one captured decode step at batch b and context ctx, replayed back to back."""
    from llm_engine.cuda_graphs import COL_POS, COL_SEQ_LEN, COL_SLOT, STAGING_COLS

    g = getattr(engine.runner.graphs, "_inner", engine.runner.graphs)  # TP rank 0: bypass the step broadcast
    nb = (ctx + 15) // 16
    st = g.staging
    st[:b].zero_()
    st[:b, COL_SEQ_LEN] = ctx
    st[:b, STAGING_COLS:STAGING_COLS + nb] = torch.arange(nb, device=dev)
    st[:b, COL_POS] = ctx - 1
    st[:b, COL_SLOT] = torch.arange(b, device=dev) + (nb + 1) * 16  # scratch slots past the tables
    for _ in range(5):
        g.replay(b)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        g.replay(b)
    e.record()
    torch.cuda.synchronize()
    st.zero_()
    st[:, COL_SLOT] = -1
    return s.elapsed_time(e) / n


# Per dtype: batch-1 prompt lengths, batch sizes through the engine, graph-only (batch, context) points, and
# whether to measure the time to first token on a cached 300-token persona.
PLANS = {
    "bf16": dict(prompts=(32, 1024), batches=(8, 32, 64), graph=((1, 32), (1, 1024), (8, 32), (64, 32)), ttft=True),
    "int4": dict(prompts=(32,), batches=(8, 16, 64), graph=((1, 32), (16, 32), (64, 32))),
    "int8": dict(prompts=(32,), batches=(), graph=((1, 32),)),
    "ab": dict(prompts=(32,), batches=(64,), graph=((1, 32), (64, 32))),  # the --ab-gemv rerun (cuBLAS only)
}


def cached_persona_ttft(engine: LLMEngine, vocab: int, n: int = 12) -> dict:
    """A 300-token system prompt already in the prefix cache + 20 new tokens: TTFT over n turns (1 token each)."""
    rng = np.random.default_rng(7)
    persona = rng.integers(0, vocab, 300).tolist()
    params = SamplingParams(max_tokens=1, ignore_eos=True, speculate=False)
    engine.generate([persona + rng.integers(0, vocab, 20).tolist()], params)  # fills the cache
    ttft, cached = [], []
    for _ in range(n):
        [(_, r)] = engine.generate([persona + rng.integers(0, vocab, 20).tolist()], params)
        ttft.append(r.ttft_s * 1e3)
        cached.append(r.cached_tokens)
    return dict(tok_s=None, ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p99_ms=float(np.percentile(ttft, 99)),
                cached_tokens=int(np.median(cached)), turns=n)


def bench_one(name: str, dtype: str, bw: float, common: dict, quick: bool) -> list[dict]:
    t = time.time()
    model = make_model(name, dtype)
    nbytes = bytes_per_token(model)
    engine = make_engine(model)
    vocab = SHAPES[name]["vocab_size"]
    log(f"[{name} {dtype}] built+quantized+captured in {time.time() - t:.1f}s; {nbytes / 1e9:.3f} GB/token")
    run_requests(engine, 1, 16, 8, vocab)  # warm-up: prefill kernels, sampler
    run_requests(engine, MAX_SEQS, 32, 4, vocab)
    recs = []

    def rec(impl, batch, prompt_len, **kw):
        r = dict(model=name, impl=impl + IMPL_SUFFIX[0], dtype=dtype, batch=batch, prompt_len=prompt_len,
                 limit_tok_s=batch * bw * 1e9 / nbytes, bytes_per_token=nbytes, copy_bw_gbs=bw, **common, **kw)
        r["frac_of_limit"] = None if r["tok_s"] is None else r["tok_s"] / r["limit_tok_s"]
        recs.append(r)
        log(f"  {r['impl']:15s} {dtype:5s} B={batch:3d} P={prompt_len:5d} {_f(r['tok_s'], 1):>9s} tok/s "
            f"({_f((r['frac_of_limit'] or 0) * 100, 1):>5s}% of {r['limit_tok_s']:8.1f}) itl p50/p99 "
            f"{_f(r.get('itl_p50_ms'))}/{_f(r.get('itl_p99_ms'))} ms ttft p50 {_f(r.get('ttft_p50_ms'))} ms "
            f"step {_f(r.get('step_ms'), 3)} ms")

    gen1 = 64 if quick else 128
    plan = PLANS["ab"] if IMPL_SUFFIX[0] else PLANS.get(dtype, PLANS["bf16"])
    for p in plan["prompts"]:
        rec("voicefast", 1, p, **run_requests(engine, 1, p, gen1, vocab))
    for b in plan["batches"]:
        rec("voicefast", b, 32, **run_requests(engine, b, 32, 64, vocab))
    for b, ctx in plan["graph"]:
        ms = graph_step_ms(engine, b, ctx)
        rec("voicefast-graph", b, ctx, tok_s=b * 1e3 / ms, step_ms=ms, itl_p99_ms=None)
    if plan.get("ttft"):
        rec("voicefast-cached-persona", 1, 320, **cached_persona_ttft(engine, vocab))
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return recs


def graph_vs_eager_check() -> bool:
    """Greedy tokens of the CUDA-graph decode path == the eager path (same kernels), on a 4-layer GLM-4-shaped
    model (partial interleaved rotary, qkv bias, GQA 16) and on the SmolLM2 shape, 4 sequences."""
    global SHAPES
    ok_all = True
    saved = SHAPES
    SHAPES = dict(saved)
    SHAPES["glm4-4layer"] = dict(saved["glm4-9b"], num_layers=4)
    try:
        for name in ("glm4-4layer", "smollm2-135m"):
            vocab = SHAPES[name]["vocab_size"]
            # 4 sequences = a bucket size, so eager and graph run the same matmul shapes (bit-identical math)
            prompts = [np.random.default_rng(i).integers(0, vocab, n).tolist() for i, n in enumerate((5, 40, 77, 18))]
            outs = []
            for eager in (True, False):
                os.environ["VOICEFAST_ENFORCE_EAGER"] = "1" if eager else "0"
                model = make_model(name, "bf16", seed=1)
                eng = make_engine(model)
                params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, speculate=False)
                got: dict[str, list[int]] = {}
                for i, p in enumerate(prompts):
                    eng.add_request(f"c{i}", p, params)
                    got[f"c{i}"] = []
                while eng.has_unfinished():
                    for o in eng.step():
                        got[o.request_id].extend(o.token_ids)
                outs.append(got)
                uses_graphs = eng.runner.graphs is not None
                del eng, model
                torch.cuda.empty_cache()
                assert uses_graphs != eager, "VOICEFAST_ENFORCE_EAGER did not select the path"
            ok = outs[0] == outs[1]
            log(f"check cuda graph == eager greedy tokens ({name}, 4 seqs x 24): {'OK' if ok else 'FAIL'}")
            if not ok:
                log(f"  eager {outs[0]}\n  graph {outs[1]}")
            ok_all &= ok
    finally:
        os.environ.pop("VOICEFAST_ENFORCE_EAGER", None)
        SHAPES = saved
    return ok_all


def fold_peers(path: str, common: dict) -> list[dict]:
    """Records from bench/gpu_peers.py's JSON lines (same call, same card)."""
    recs = []
    with open(path) as f:
        for line in f:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("event") == "decode":
                recs.append(dict(model=d["model"], impl=d["impl"], dtype=d["dtype"], batch=d["batch"],
                                 prompt_len=d["prompt_len"], tok_s=d["tok_s"], limit_tok_s=d["limit_tok_s"],
                                 frac_of_limit=d["frac_of_limit"], itl_p99_ms=None, copy_bw_gbs=d["copy_bw_gbs"],
                                 **common, source="bench/gpu_peers.py"))
            elif d.get("event") in ("error", "skipped"):
                recs.append(dict(model=d.get("model"), impl=d.get("impl"), dtype="-", batch=1, prompt_len=32,
                                 tok_s=None, limit_tok_s=None, **common, source="bench/gpu_peers.py",
                                 error=d.get("error") or d.get("reason")))
    return recs


def _load(path):
    with open(path) as f:
        return json.load(f)


def _dump(recs, path):
    with open(path, "w") as f:
        json.dump(recs, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,glm-edge-1.5b,glm4-9b",
                    help="comma-separated; 'name:bf16+int4' gives a model its own dtypes")
    ap.add_argument("--dtypes", default="bf16,int8,int4")
    ap.add_argument("--out", default="decode_gpu.json")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--peers", default=None, help="fold a peers baseline.jsonl into --out and exit")
    ap.add_argument("--check", action="store_true", help="also run the graph-vs-eager greedy check")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ab-gemv", action="store_true",
                    help="also run bf16 with the Triton GEMV switched off (cuBLAS everywhere): before vs after")
    args = ap.parse_args()
    devname = torch.cuda.get_device_name()
    common = dict(device=devname, commit=args.commit)
    if args.peers:
        recs = _load(args.out) if os.path.exists(args.out) else []
        recs = [r for r in recs if r.get("source") != "bench/gpu_peers.py"] + fold_peers(args.peers, common)
        _dump(recs, args.out)
        log(f"folded peers into {args.out}: {len(recs)} records")
        print_table(recs)
        return
    log(f"{devname} torch {torch.__version__}")
    bw = copy_bw_gbs()
    log(f"copy bandwidth (read+write) {bw:.0f} GB/s")
    recs: list[dict] = [dict(model="-", impl="copy-bw", dtype="-", batch=0, prompt_len=0, tok_s=None,
                             limit_tok_s=None, itl_p99_ms=None, copy_bw_gbs=bw, **common)]
    if args.check:
        ok = graph_vs_eager_check()
        recs.append(dict(model="-", impl="graph-vs-eager-check", dtype="bf16", batch=4, prompt_len=0, tok_s=None,
                         limit_tok_s=None, itl_p99_ms=None, ok=ok, **common))
    for entry in args.models.split(","):  # "model" (every --dtypes) or "model:dtype+dtype"
        name, _, own = entry.partition(":")
        for dtype in (own.split("+") if own else args.dtypes.split(",")):
            try:
                recs += bench_one(name, dtype, bw, common, args.quick)
                if args.ab_gemv and dtype == "bf16":
                    from llm_engine.kernels import set_gemv_enabled

                    set_gemv_enabled(False)
                    IMPL_SUFFIX[0] = " (cuBLAS)"
                    try:
                        recs += bench_one(name, dtype, bw, common, True)
                    finally:
                        set_gemv_enabled(True)
                        IMPL_SUFFIX[0] = ""
            except Exception as e:  # keep going: one failure must not lose the other figures
                log(f"[{name} {dtype}] FAILED: {e!r}\n{traceback.format_exc()[-2000:]}")
                recs.append(dict(model=name, impl="voicefast", dtype=dtype, error=repr(e)[:500], **common))
                gc.collect()
                torch.cuda.empty_cache()
            _dump(recs, args.out)
    from llm_engine.kernels.gemv import chosen
    from llm_engine.quant.kernels import chosen_configs
    from llm_engine.quant.swap import CHOICES

    recs.append(dict(model="-", impl="choices", dtype="-", batch=0, prompt_len=0, tok_s=None, limit_tok_s=None,
                     gemv=chosen(), quant_tiles=chosen_configs(), int4_backend=CHOICES, **common))
    _dump(recs, args.out)
    log(f"gemv choices: {json.dumps(chosen(), default=str)}")
    log(f"int4 backend per shape: {json.dumps(CHOICES)}")
    log(f"quant tiles chosen: {json.dumps(chosen_configs())}")
    print_table(recs)


def print_table(recs: list[dict]) -> None:
    log("\nmodel          impl                       dtype  B     P     tok/s   limit   %lim  itl_p99 ttft_p50")
    for r in recs:
        if r.get("tok_s") is None and r.get("ttft_p50_ms") is None:
            continue
        lim = r.get("limit_tok_s") or float("nan")
        tps = r.get("tok_s")
        log(f"{r['model']:14s} {r['impl']:26s} {r['dtype']:5s} {r['batch']:3d} {r['prompt_len']:5d} "
            f"{_f(tps, 1):>8s} {lim:7.1f} {_f(None if tps is None else tps / lim * 100, 1):>5s}% "
            f"{_f(r.get('itl_p99_ms')):>6s} {_f(r.get('ttft_p50_ms')):>6s}")


if __name__ == "__main__":
    main()
