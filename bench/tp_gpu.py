"""Tensor parallelism on two GPUs in one command: the all-reduce (ours vs NCCL), decode speed at TP=1 (GPU 0) and
TP=2 with each configuration's HBM limit, and TP=2 vs TP=1 correctness. Random weights of real shapes
(llm_engine.parallel.RandomCheckpoint: the same full tensors at any TP).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python3 bench/tp_gpu.py --out $OUT [--commit SHA]

Each piece runs in its own subprocess under a time limit (a hang costs that piece, not the run); records are
appended to $OUT/tp_gpu.jsonl as they come (every speed record carries `tp`), the log goes to $OUT/tp_gpu.log,
a table is printed last. A piece that outlives its limit first gets SIGUSR1 (every process of it, the TP worker
ranks included, prints its Python stacks: llm_engine.parallel.launch.dump_stacks_on_sigusr1), then SIGKILL.
Once a TP=2 piece using the one-shot all-reduce outlives its limit, the later TP=2 pieces run on NCCL alone.
Pieces, most important first (PLAN):
  diag        bench/tp_diag.py: NCCL eager and in a graph, CUDA IPC alone, the one-shot set-up and self-test
  perf        GLM-4-9B-0414 shape bf16 batch 1 and 64, int8 batch 1; GLM-4-32B-0414 shape bf16 batch 1
  check       4-layer GLM-4-9B and Llama-3-8B shapes, bf16, int8 and float32: logits error and greedy tokens,
              TP=2 vs TP=1; a greedy difference is excused only at a rounding tie (top-2 gap <= 2 ulps of the
              compute dtype at the top logit: bench/tp_check.py). float32 shows the sharding itself is exact
  allreduce   bench/tp_allreduce.py: one-shot vs NCCL, eager and in CUDA graphs, 8 KiB - 2 MiB
limit_tok_s = batch x copy bandwidth / weight bytes one GPU reads per step (rank 0's shard; the embedding table
is gathered, not read)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})

import torch  # noqa: E402

from llm_engine.model_config import ModelConfig  # noqa: E402

SHAPES = {
    "glm4-9b": dict(family="glm4", vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_layers=40,
                    num_heads=32, num_kv_heads=2, head_dim=128, partial_rotary_factor=0.5, rope_interleaved=True,
                    attention_bias=True, post_branch_norms=True),
    # GLM-4-32B-0414's config.json: hidden 6144, 61 layers, 48 query / 2 KV heads of 128, intermediate 23040,
    # no qkv bias, vocab 151552, partial rotary 0.5.
    "glm4-32b": dict(family="glm4", vocab_size=151552, hidden_size=6144, intermediate_size=23040, num_layers=61,
                     num_heads=48, num_kv_heads=2, head_dim=128, partial_rotary_factor=0.5, rope_interleaved=True,
                     attention_bias=False, post_branch_norms=True),
    "llama3-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0),
}
MAX_MODEL_LEN = 2048
TIE_ULPS = 2  # a greedy difference is a rounding tie when TP=1's top-2 gap is at most this many ulps (tp_check.py)
BUDGET_S = 380  # no piece starts later, and none outlives it: the device call (7 minutes, start-up aside) holds
KILL_GRACE_S = 4  # between a late piece's SIGUSR1 (stack dumps) and its SIGKILL
DEVICE, DTYPE = "cuda", "bfloat16"  # tests/test_tp_gpu_bench.py runs the check piece on CPU at tiny shapes
# (shape, weights): "bf16" and "int8" compute in DTYPE, "fp32" is the unquantized model in float32
CHECKS = [(m, d) for m in ("glm4-9b", "llama3-8b") for d in ("bf16", "int8", "fp32")]
# (piece args, seconds it may take), most important first
PLAN = [
    (["diag"], 60),
    (["perf", "glm4-9b", "bf16", "1", "1"], 50), (["perf", "glm4-9b", "bf16", "2", "1"], 75),
    (["perf", "glm4-9b", "int8", "2", "1"], 90),
    (["check"], 180),
    (["perf", "glm4-9b", "bf16", "2", "64"], 90),
    (["perf", "glm4-32b", "bf16", "2", "1"], 100),
    (["perf", "glm4-9b", "bf16", "2", "1", "nccl"], 90),  # ablation: TP=2 with NCCL for every all-reduce
    (["allreduce"], 60),
    (["perf", "glm4-9b", "int8", "1", "1"], 50), (["perf", "glm4-9b", "bf16", "1", "64"], 50),
    (["perf", "glm4-32b", "bf16", "1", "1"], 60),
]


def compute_dtype(dtype: str) -> str:
    """The torch dtype (name) a model of weights `dtype` ("bf16", "int8", "int4", "fp32") computes in."""
    return "float32" if dtype == "fp32" else DTYPE


def model_config(name: str, layers: int | None = None, dtype: str = "bf16") -> ModelConfig:
    shape = dict(SHAPES[name])
    if layers:
        shape["num_layers"] = layers
    return ModelConfig(max_position_embeddings=4096, dtype=getattr(torch, compute_dtype(dtype)), **shape)


def make_engine(name: str, dtype: str, tp: int, max_seqs: int, layers: int | None = None, seed: int = 0,
                one_shot: bool = True):
    from llm_engine.config import EngineConfig
    from llm_engine.engine import LLMEngine
    from llm_engine.parallel import RandomCheckpoint

    quant = dtype in ("int8", "int4")
    return LLMEngine(EngineConfig(
        model=RandomCheckpoint(model_config(name, layers, dtype), seed=seed), device=DEVICE,
        dtype=compute_dtype(dtype), tensor_parallel=tp, quantize=dtype if quant else None, quantize_lm_head=quant,
        max_num_seqs=max_seqs, kv_block_size=16, num_kv_blocks=max_seqs * (MAX_MODEL_LEN // 16) // 4 + 256,
        max_num_batched_tokens=2048, max_waiting=1024, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False,
        tp_one_shot_max_bytes=512 * 1024 if one_shot else 0))


def rank_weight_bytes(model) -> int:
    """Bytes one decode step reads on this rank: every weight except the embedding table (rows are gathered),
    unless it doubles as the unquantized lm_head."""
    emb_mod = model.model.embed_tokens
    emb = getattr(emb_mod, "inner", emb_mod).weight
    head = getattr(model.lm_head, "inner", model.lm_head)
    head_is_emb = getattr(head, "weight", None) is not None and head.weight.data_ptr() == emb.data_ptr()
    seen, total = set(), 0
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("cos_sin")]
    for t in tensors:
        if t.data_ptr() in seen or (t.data_ptr() == emb.data_ptr() and not head_is_emb):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def graph_step_ms(runner, b: int, ctx: int) -> float:
    """Device time of one captured decode step (bench/decode_gpu.py). Under TP every rank runs it at once
    (TensorParallel.call): the replays bypass rank 0's step broadcast."""
    from types import SimpleNamespace

    from bench.decode_gpu import graph_step_ms as one_engine

    return one_engine(SimpleNamespace(runner=runner), b, ctx)


def piece_perf(name: str, dtype: str, tp: int, batch: int, common: dict, one_shot: bool = True) -> list[dict]:
    from bench.decode_gpu import copy_bw_gbs, run_requests

    bw = copy_bw_gbs()
    t0 = time.time()
    eng = make_engine(name, dtype, tp, max_seqs=batch, one_shot=one_shot)
    nbytes = rank_weight_bytes(eng.model)
    custom = eng.tp is not None and eng.tp.group.custom is not None
    reason = "" if custom or eng.tp is None else eng.tp.group.custom_reason
    print(f"[{name} {dtype} tp={tp}] built in {time.time() - t0:.1f} s; {nbytes / 1e9:.2f} GB/step/GPU; one-shot "
          f"all-reduce {'on' if custom else 'off'}{f' ({reason})' if reason else ''}", flush=True)
    vocab = SHAPES[name]["vocab_size"]
    try:
        run_requests(eng, batch, 16, 8, vocab)  # warm-up
        print(f"  warm-up done at {time.time() - t0:.1f} s", flush=True)  # (progress marks: a hang names its stage)
        r = run_requests(eng, batch, 32, 128 if batch == 1 else 64, vocab)
        print(f"  requests done at {time.time() - t0:.1f} s", flush=True)
        args = (batch, 32)
        step = eng.tp.call(eng.runner, "bench.tp_gpu:graph_step_ms", *args) if eng.tp else \
            graph_step_ms(eng.runner, *args)
        print(f"  graph step timed at {time.time() - t0:.1f} s; closing", flush=True)
        timeouts = eng.tp.group.custom.timeouts() if custom else 0
    finally:
        eng.close()
    print(f"  closed at {time.time() - t0:.1f} s", flush=True)
    limit = batch * bw * 1e9 / nbytes
    rec = dict(model=name, impl="voicefast", dtype=dtype, tp=tp, batch=batch, prompt_len=32, **r,
               step_ms=step, graph_tok_s=batch * 1e3 / step, limit_tok_s=limit, frac_of_limit=r["tok_s"] / limit,
               bytes_per_token_per_gpu=nbytes, copy_bw_gbs=bw, one_shot_all_reduce=custom, one_shot_off_reason=reason,
               one_shot_timeouts=timeouts, **common)
    print(f"  {name} {dtype} tp={tp} B={batch}: {r['tok_s']:.1f} tok/s ({r['tok_s_per_stream']:.1f}/stream), "
          f"{rec['frac_of_limit'] * 100:.1f}% of {limit:.0f}; graph step {step:.3f} ms; itl p50/p99 "
          f"{r['itl_p50_ms']:.2f}/{r['itl_p99_ms']:.2f} ms", flush=True)
    return [rec]


def piece_check(common: dict, emit=None, one_shot: bool = True) -> list[dict]:
    """Records come back, and each goes to `emit` as soon as it is made (a late piece keeps what it measured)."""
    from bench.tp_check import greedy_agrees, logits_error
    from llm_engine.parallel.runner import prompt_logits
    from llm_engine.sampling_params import SamplingParams

    tol = {"bf16": 3e-2, "int8": 5e-2, "fp32": 1e-4}  # relative norm of the logits error, TP=2 vs TP=1
    recs = []
    for name, dtype in CHECKS:
        rng = torch.Generator().manual_seed(5)
        vocab = SHAPES[name]["vocab_size"]
        prompts = [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in (7, 40, 130, 19)]
        probe = torch.randint(0, vocab, (96,), generator=rng).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        ref = make_engine(name, dtype, 1, max_seqs=4, layers=4, seed=3)
        ref_tok = [t for t, _ in ref.generate(prompts, params)]
        ref_lg = prompt_logits(ref.runner, probe).cpu()
        eng = make_engine(name, dtype, 2, max_seqs=4, layers=4, seed=3, one_shot=one_shot)
        try:
            tok = [t for t, _ in eng.generate(prompts, params)]  # 4 at once: eager prefill, graph decodes
            lg = eng.tp.call(eng.runner, "llm_engine.parallel.runner:prompt_logits", probe).cpu()
            custom = eng.tp.group.custom is not None
        finally:
            eng.close()
        err = logits_error(ref_lg, lg)
        runner = ref.runner

        def last_logits(ids, runner=runner):
            return prompt_logits(runner, ids)[-1].cpu()

        # ties: top-2 gap <= 2 ulps of the compute dtype at the top logit. int8 at TP=2 is also a different
        # quantization (row-parallel layers get per-shard scales), so there a gap the measured logits difference
        # can flip (<= 2x its max on the probe) is excused too
        tie_gap = 2 * err["max_abs"] if dtype == "int8" else 0.0
        greedy = [greedy_agrees(p, a, b, last_logits, tie_gap=tie_gap, tie_dtype=getattr(torch, compute_dtype(dtype)),
                                tie_ulps=TIE_ULPS)
                  for p, a, b in zip(prompts, ref_tok, tok, strict=True)]
        del ref, runner
        gc.collect()
        torch.cuda.empty_cache()
        ok = err["rel_norm"] < tol[dtype] and all(g[0] for g in greedy)
        rule = f"top-2 gap <= {TIE_ULPS} ulps of {compute_dtype(dtype)} at the top logit" + \
            (" or <= 2x the max logits difference" if tie_gap else "")
        recs.append(dict(impl="tp-check", model=name + "-4layer", dtype=dtype, compute=compute_dtype(dtype), tp=2,
                         logits=err, rel_norm_tol=tol[dtype], greedy=[g[1] for g in greedy], tie_rule=rule, ok=ok,
                         one_shot_all_reduce=custom, **common))
        if emit is not None:
            emit(recs[-1])
        print(f"check {name}-4layer {dtype} ({compute_dtype(dtype)}) TP=2 vs TP=1: logits rel {err['rel_norm']:.2e} "
              f"(tol {tol[dtype]:g}) max abs {err['max_abs']:.3g} argmax-equal {err['argmax_equal']:.3f}; greedy "
              f"(ties: {rule}) {[g[1] for g in greedy]} -> {'OK' if ok else 'FAIL'}", flush=True)
    return recs


def run_piece(args: list[str], jsonl: str, common: dict) -> None:
    from llm_engine.parallel.launch import dump_stacks_on_sigusr1

    dump_stacks_on_sigusr1()
    kind = args[0]
    if kind == "diag":
        from bench.tp_diag import main as diag_main

        diag_main([])
        return
    if kind == "allreduce":
        from bench.tp_allreduce import main as allreduce_main

        allreduce_main(["--out", jsonl])
        return

    def emit(rec: dict) -> None:
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if kind == "check":
        piece_check(common, emit, one_shot=args[1:] != ["nccl"])
    else:
        for rec in piece_perf(args[1], args[2], int(args[3]), int(args[4]), common, one_shot=args[5:] != ["nccl"]):
            emit(rec)


def summary(jsonl: str) -> None:
    print("\nmodel       dtype tp   B     tok/s  per-stream   limit   %lim  step_ms  itl_p99   (tp 2* = NCCL only)")
    recs = []
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    for r in recs:
        if r.get("impl") == "voicefast":
            star = "" if r["one_shot_all_reduce"] or r["tp"] == 1 else "*"
            print(f"{r['model']:11s} {r['dtype']:5s} {r['tp']:2d}{star:1s}{r['batch']:3d} {r['tok_s']:9.1f} "
                  f"{r['tok_s_per_stream']:10.1f} {r['limit_tok_s']:7.0f} {r['frac_of_limit'] * 100:5.1f}% "
                  f"{r['step_ms']:8.3f} {r['itl_p99_ms']:7.2f}")
        elif r.get("impl") == "all-reduce":
            print(f"all-reduce {r['bytes'] >> 10:5d} KiB: NCCL eager {r['nccl_eager_us']:.1f} graph "
                  f"{r['nccl_graph_us']:.1f} us; one-shot eager {r.get('one_shot_eager_us', float('nan')):.1f} graph "
                  f"{r.get('one_shot_graph_us', float('nan')):.1f} us (== NCCL: {r.get('one_shot_equals_nccl')})")
        elif r.get("impl") == "tp-check":
            print(f"check {r['model']} {r['dtype']} ({r.get('compute', '-')}): logits rel "
                  f"{r['logits']['rel_norm']:.2e} -> {'OK' if r['ok'] else 'FAIL'}")


def plan_piece(piece: list[str], nccl_only: bool) -> tuple[list[str], bool]:
    """(the piece to run, whether it is TP=2 with the one-shot all-reduce). nccl_only: a TP=2 one-shot piece
    already outlived its limit, so later TP=2 pieces run on NCCL alone (figures rather than another hang)."""
    tp2 = piece[0] == "check" or piece[0] == "perf" and piece[3] == "2"
    if not tp2 or piece[-1] == "nccl":
        return piece, False
    return ([*piece, "nccl"], False) if nccl_only else (piece, True)


def kill_piece(p: subprocess.Popen) -> None:
    """Stack dumps of every process of the piece (its own process group), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGUSR1)
        time.sleep(KILL_GRACE_S)
        os.killpg(p.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for tp_gpu.jsonl and tp_gpu.log")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting pieces after this long")
    ap.add_argument("--only", default=None, help="comma list of piece kinds to run (allreduce, perf, check)")
    ap.add_argument("--piece", nargs="+", help=argparse.SUPPRESS)  # internal: run one piece here
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "tp_gpu.jsonl")
    common = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "-", commit=args.commit)
    if args.piece:
        run_piece(args.piece, jsonl, common)
        return 0
    if torch.cuda.device_count() < 2:
        print("bench/tp_gpu.py needs 2 GPUs", file=sys.stderr)
        return 2
    t_end = time.monotonic() + args.budget_s
    only = set(args.only.split(",")) if args.only else None
    running: list[subprocess.Popen] = []

    def stop(signum, frame):  # an outer `timeout`: take the running piece (its own session) down too
        for q in running:
            kill_piece(q)
        summary(jsonl)
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    with open(os.path.join(args.out, "tp_gpu.log"), "a") as log:
        nccl_only = False  # set once a TP=2 piece with the one-shot all-reduce outlived its limit
        for piece, limit_s in PLAN:
            if only and piece[0] not in only:
                continue
            piece, tp2_one_shot = plan_piece(piece, nccl_only)
            left = t_end - time.monotonic()
            if left < 30:
                print(f"skipped (out of time): {' '.join(piece)}", flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--commit", args.commit, "--piece",
                   *piece]
            t = time.monotonic()
            # its own session: on timeout the piece's whole process group goes (TP workers, GPU kernels included)
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                 start_new_session=True)
            running[:] = [p]
            try:
                out, _ = p.communicate(timeout=min(limit_s, left))
                rc = p.returncode
            except subprocess.TimeoutExpired:
                kill_piece(p)
                out, _ = p.communicate()
                rc = "timeout"
                nccl_only |= tp2_one_shot
            log.write(f"==== {' '.join(piece)} rc={rc} {time.monotonic() - t:.0f}s\n{out}\n")
            log.flush()
            lines = [ln for ln in out.splitlines() if ln.strip()]
            tail = [ln for ln in lines if ln.startswith("[diag")] + lines[-6:] if piece[0] == "diag" else lines[-6:]
            print(f"[{' '.join(piece)}] rc={rc} in {time.monotonic() - t:.0f}s\n  " + "\n  ".join(tail), flush=True)
    summary(jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
