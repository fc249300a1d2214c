"""GPU check at real shapes: every Triton kernel vs its torch reference (fresh random inputs, poisoned
outputs), per-kernel timings inside CUDA graphs against their byte floors (measured copy bandwidth), and, when
the model code is present, the CUDA-graph decode path against the eager path (same greedy tokens).

    python3 bench/gpu_check.py [--json $OUT/gpu_check.json] [--skip-graph]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from bench.decode_gpu import copy_bw_gbs  # noqa: E402  (one copy-bandwidth measurement for both scripts)
from llm_engine.kernels import decode_attention as DA  # noqa: E402
from llm_engine.kernels import gemv as GV  # noqa: E402
from llm_engine.kernels import rms_norm as RN  # noqa: E402
from llm_engine.kernels import rotary_kv as RK  # noqa: E402
from llm_engine.kernels import sampling as SA  # noqa: E402
from llm_engine.kernels import silu_and_mul as SM  # noqa: E402
from llm_engine.quant import int4 as I4  # noqa: E402
from llm_engine.quant import int8 as I8  # noqa: E402
from llm_engine.quant import tinygemm as TG  # noqa: E402
from llm_engine.quant.kernels import int4_matmul, int8_matmul  # noqa: E402

dev = "cuda"
bf16 = torch.bfloat16
RESULTS: list[dict] = []
FAILS: list[str] = []


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def check(name, a, b, tol):
    r = rel(a, b)
    ok = r < tol and not torch.isnan(a.float()).any().item()
    print(f"check {name:52s} rel={r:.2e} tol={tol:.0e} {'OK' if ok else 'FAIL'}", flush=True)
    RESULTS.append({"kind": "check", "name": name, "rel": r, "tol": tol, "ok": ok})
    if not ok:
        FAILS.append(name)


def time_graph_us(fn, reps_inside: int = 1) -> float:
    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return ms * 1e3 / reps_inside


def timed(name, fn, nbytes, bw_gbs, reps_inside=1):
    us = time_graph_us(fn, reps_inside)
    floor_us = nbytes / (bw_gbs * 1e9) * 1e6
    print(f"time  {name:52s} {us:9.2f} us  floor {floor_us:8.2f} us  ({floor_us / us * 100:5.1f}% of bw)",
          flush=True)
    RESULTS.append({"kind": "time", "name": name, "us": us, "floor_us": floor_us, "bytes": nbytes})
    return us


def kernel_checks():
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    # add + RMSNorm
    for T, H in [(1, 4096), (64, 4096), (7, 576), (300, 2048)]:
        x, r = torch.randn(T, H, device=dev, dtype=bf16), torch.randn(T, H, device=dev, dtype=bf16)
        w = torch.randn(H, device=dev, dtype=bf16)
        o, nr = RN.add_rms_norm(x, r, w, 1e-5)
        ro, rr = RN.reference_add_rms_norm(x.float(), r.float(), w.float(), 1e-5)
        check(f"add_rms_norm T={T} H={H}", o, ro, 1e-2)
        check(f"add_rms_norm residual T={T} H={H}", nr, rr, 1e-2)
    # GLM-4 sandwich: norm(x) * w1 + residual, then its norm
    for T, H in [(1, 4096), (5, 4096), (64, 4096)]:
        x, r = torch.randn(T, H, device=dev, dtype=bf16), torch.randn(T, H, device=dev, dtype=bf16)
        w1, w2 = torch.randn(H, device=dev, dtype=bf16), torch.randn(H, device=dev, dtype=bf16)
        o, nr = RN.norm_add_rms_norm(x, w1, r, w2, 1e-5)
        ro, rr = RN.reference_norm_add_rms_norm(x.float(), w1.float(), r.float(), w2.float(), 1e-5)
        check(f"norm_add_rms_norm T={T} H={H}", o, ro, 1e-2)
        check(f"norm_add_rms_norm residual T={T} H={H}", nr, rr, 1e-2)
    # small-batch GEMV (every candidate config), SwiGLU gate fused for down_proj
    for N, K, silu in [(4608, 4096, False), (4096, 4096, False), (27392, 4096, False), (4096, 13696, True),
                       (1728, 576, False), (576, 1536, True)]:
        w = torch.randn(N, K, device=dev, dtype=bf16) * 0.02
        b = torch.randn(N, device=dev, dtype=bf16) if N == 4608 else None
        for M in (1, 5, 16):
            x = torch.randn(M, 2 * K if silu else K, device=dev, dtype=bf16)
            ref = GV.reference_gemv(x.float(), w.float(), None if b is None else b.float(), silu)
            for cfg in GV.CANDIDATES[GV.m_class(M)]:
                if cfg != GV.TORCH:
                    check(f"gemv M={M} N={N} K={K} silu={silu} cfg={cfg}", GV.gemv(x, w, b, silu, cfg), ref, 1e-2)
    # int4 through torch's tinygemm vs the weights it dequantizes to
    for N, K in [(4608, 4096), (4096, 13696)]:
        w = torch.randn(N, K, device=dev, dtype=bf16) * 0.02
        p, sc, mn, grp = I4.quantize_int4(w)
        codes = I4.unpack_int4(p, grp)
        tw, sz = TG.pack(codes, sc, mn)
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=bf16)
            check(f"int4 tinygemm M={M} N={N} K={K}", TG.matmul(x, tw, sz, grp, N, None),
                  x.float() @ TG.dequantize(codes, sz, grp).T, 1e-2)
    # SiLU * mul
    for T, inter in [(1, 13696), (64, 13696), (5, 1536)]:
        x = torch.randn(T, 2 * inter, device=dev, dtype=bf16)
        check(f"silu_and_mul T={T} I={inter}", SM.silu_and_mul(x), SM.reference_silu_and_mul(x.float()), 1e-2)
    # rotary + KV store: GLM partial interleaved, llama NeoX, GGUF llama full interleaved
    for name, hq, hkv, d, rot, inter in [("glm4 partial interleaved", 32, 2, 128, 64, True),
                                         ("llama neox", 9, 3, 64, 64, False),
                                         ("gguf-llama interleaved full", 16, 4, 128, 128, True)]:
        for T in (1, 64, 333):
            nb, bs = 512, 16
            qkv = torch.randn(T, (hq + 2 * hkv) * d, device=dev, dtype=bf16)
            pos = torch.randint(0, 4000, (T,), device=dev)
            cs = RK.make_cos_sin(4096, rot, 10000.0, device=dev)
            slots = torch.randperm(nb * bs, device=dev)[:T]
            kc = torch.randn(nb, bs, hkv, d, device=dev, dtype=bf16)
            vc = torch.randn_like(kc)

            def split(t, hq=hq, hkv=hkv, d=d, T=T):
                q, k, v = t.split([hq * d, hkv * d, hkv * d], dim=-1)
                return q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)

            a, kca, vca = qkv.clone(), kc.clone(), vc.clone()
            RK.rotary_store_kv(*split(a), pos, cs, rot, inter, kca, vca, slots)
            b, kcb, vcb = qkv.float(), kc.float(), vc.float()
            RK.reference_rotary_store_kv(*split(b), pos, cs, rot, inter, kcb, vcb, slots)
            check(f"rotary {name} T={T} q/k", a, b, 1e-2)
            check(f"rotary {name} T={T} k_cache", kca, kcb, 1e-2)
            check(f"rotary {name} T={T} v_cache", vca, vcb, 1e-2)
    # decode attention: GQA 16 (glm4), 3 (smollm), 4 (edge), 1; split-K on long contexts
    for hq, hkv, d, B, L in [(32, 2, 128, 1, 1024), (32, 2, 128, 1, 8000), (32, 2, 128, 8, 3000),
                             (9, 3, 64, 4, 500), (16, 4, 128, 16, 2000), (8, 8, 128, 3, 100)]:
        bs = 16
        mb = triton.cdiv(L + 64, bs)
        nb = B * mb + 8
        kc = torch.randn(nb, bs, hkv, d, device=dev, dtype=bf16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb, device=dev)[: B * mb].view(B, mb).int()
        sl = torch.randint(max(1, L // 2), L + 1, (B,), device=dev, dtype=torch.int32)
        q = torch.randn(B, hq, d, device=dev, dtype=bf16)
        ref = DA.reference_decode_attention(q.float(), kc.float(), vc.float(), sl, bt, d**-0.5)
        for split in (None, 64, 8192):
            out = torch.full_like(q, float("nan"))
            DA.decode_attention(q, kc, vc, sl, bt, d**-0.5, split_tokens=split, max_seq_len=L, out=out)
            check(f"decode_attn Hq={hq} Hkv={hkv} D={d} B={B} L={L} split={split}", out, ref, 1e-2)
        again = DA.decode_attention(q, kc, vc, sl, bt, d**-0.5)  # bound = table capacity: same partition
        same = torch.equal(again, DA.decode_attention(q, kc, vc, sl, bt, d**-0.5, max_seq_len=L))
        print(f"check decode_attn bit-identical under a larger bound B={B} L={L}: {'OK' if same else 'FAIL'}")
        if not same:
            FAILS.append(f"decode_attn determinism B={B} L={L}")
    # quant matmuls vs dequant reference
    for N, K in [(4608, 4096), (4096, 13696), (1536, 576)]:
        w = torch.randn(N, K, device=dev, dtype=bf16) * 0.02
        for M in (1, 8, 16):
            x = torch.randn(M, K, device=dev, dtype=bf16)
            bias = torch.randn(N, device=dev, dtype=bf16)
            q, s = I8.quantize_int8(w)
            check(f"int8_matmul M={M} N={N} K={K}", int8_matmul(x, q, s, bias),
                  I8.reference_int8_linear(x.float(), q, s, bias.float()), 1e-2)
            p, sc, mn, grp = I4.quantize_int4(w)
            check(f"int4_matmul M={M} N={N} K={K} g={grp}", int4_matmul(x, p, sc, mn, grp, bias),
                  I4.reference_int4_linear(x.float(), p, sc, mn, grp, bias.float()), 1e-2)
    # sampling: greedy == argmax at the GLM vocab
    logits = torch.randn(64, 151552, device=dev)
    tok = SA.gumbel_argmax(logits, torch.zeros(64, device=dev), torch.arange(64, device=dev),
                           torch.zeros(64, dtype=torch.int64, device=dev))
    ok = torch.equal(tok, logits.argmax(1))
    print(f"check greedy sampling == argmax (64 x 151552)                       {'OK' if ok else 'FAIL'}")
    RESULTS.append({"kind": "check", "name": "greedy sampling", "ok": ok})
    if not ok:
        FAILS.append("greedy sampling")


def kernel_timings(bw, quant_only: bool = False):
    H, I, V = 4096, 13696, 151552
    if quant_only:
        return linear_timings(bw, H, I, V)
    # norms / activation (latency-bound at decode sizes)
    for T in (1, 64):
        x, r = torch.randn(T, H, device=dev, dtype=bf16), torch.randn(T, H, device=dev, dtype=bf16)
        w = torch.randn(H, device=dev, dtype=bf16)
        timed(f"add_rms_norm T={T} H={H}", lambda x=x, r=r, w=w: RN.add_rms_norm(x, r, w, 1e-5), 8 * T * H, bw)
        xi = torch.randn(T, 2 * I, device=dev, dtype=bf16)
        timed(f"silu_and_mul T={T} I={I}", lambda xi=xi: SM.silu_and_mul(xi), 6 * T * I, bw)
    # rotary + store at glm4 shapes
    for T in (1, 64):
        qkv = torch.randn(T, 36 * 128, device=dev, dtype=bf16)
        q, k, v = qkv.split([4096, 256, 256], dim=-1)
        q, k, v = q.view(T, 32, 128), k.view(T, 2, 128), v.view(T, 2, 128)
        kc = torch.randn(1024, 16, 2, 128, device=dev, dtype=bf16)
        vc = torch.randn_like(kc)
        pos = torch.randint(0, 4000, (T,), device=dev)
        cs = RK.make_cos_sin(4096, 64, 10000.0, device=dev)
        slots = torch.randperm(1024 * 16, device=dev)[:T]
        timed(f"rotary_store_kv glm4 T={T}",
              lambda q=q, k=k, v=v, pos=pos, cs=cs, kc=kc, vc=vc, s=slots:
              RK.rotary_store_kv(q, k, v, pos, cs, 64, True, kc, vc, s), T * 36 * 128 * 2 * 2, bw)
    # decode attention, glm4 (Hq 32 / Hkv 2 / D 128)
    for B, L in [(1, 1024), (1, 8192), (8, 1024), (32, 1024), (64, 1024), (64, 4096)]:
        bs = 16
        mb = triton.cdiv(L, bs)
        kc = torch.randn(B * mb, bs, 2, 128, device=dev, dtype=bf16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(B * mb, device=dev).view(B, mb).int()
        sl = torch.full((B,), L, device=dev, dtype=torch.int32)
        q = torch.randn(B, 32, 128, device=dev, dtype=bf16)
        nbytes = 2 * B * L * 2 * 128 * 2
        timed(f"decode_attn glm4 B={B} L={L}",
              lambda q=q, kc=kc, vc=vc, sl=sl, bt=bt, L=L: DA.decode_attention(q, kc, vc, sl, bt, 0.088,
                                                                               max_seq_len=L), nbytes, bw)
        timed(f"decode_attn glm4 B={B} L={L} no split",
              lambda q=q, kc=kc, vc=vc, sl=sl, bt=bt, L=L: DA.decode_attention(q, kc, vc, sl, bt, 0.088,
                                                                               split_tokens=8192, max_seq_len=L),
              nbytes, bw)
    linear_timings(bw, H, I, V)
    sampling_timings(bw, V)


def linear_timings(bw, H, I, V, shapes=None):
    """Linears: bf16 cuBLAS (before) vs the chosen small-batch path (after: cuBLAS or the Triton GEMV, down_proj
    with the SwiGLU gate fused) vs int8 vs int4 (ours, torch's tinygemm); weights rotated over copies so they
    come from HBM, not L2."""
    shapes = shapes or [("qkv", 4608, H), ("o", H, H), ("gate_up", 2 * I, H), ("down", H, I), ("lm_head", V, H),
                        ("smollm2 qkv", 960, 576), ("smollm2 o", 576, 576), ("smollm2 gate_up", 3072, 576),
                        ("smollm2 down", 576, 1536)]
    for name, N, K in shapes:
        copies = max(2, min(8, int(400e6 // (N * K * 2))))
        ws = [torch.randn(N, K, device=dev, dtype=bf16) * 0.02 for _ in range(copies)]
        q8 = [I8.quantize_int8(w) for w in ws]
        q4 = [I4.quantize_int4(w)[:3] for w in ws]
        tg = [TG.pack(I4.unpack_int4(p, 128 if K % 128 == 0 else 64), s, m) for p, s, m in q4] \
            if TG.supported(K, 128) else []
        silu = name.endswith("down")
        for M in (1, 8, 16, 64):
            x = torch.randn(M, K, device=dev, dtype=bf16)
            timed(f"linear {name} bf16 cuBLAS M={M} N={N} K={K}",
                  lambda x=x, ws=ws: [torch.nn.functional.linear(x, w) for w in ws], N * K * 2, bw, copies)
            if M <= GV.MAX_ROWS:
                xg = torch.randn(M, 2 * K, device=dev, dtype=bf16) if silu else x
                choice = GV.pick(xg, ws[0], None, silu)
                RESULTS.append({"kind": "gemv_choice", "name": f"{name} M={M}", "choice": str(choice)})
                timed(f"linear {name} bf16 chosen={choice}{' +silu' if silu else ''} M={M}",
                      lambda xg=xg, ws=ws, silu=silu: [GV.linear(xg, w, None, silu) for w in ws], N * K * 2, bw,
                      copies)
                if silu:
                    timed(f"linear {name} bf16 silu kernel + cuBLAS M={M}",
                          lambda xg=xg, ws=ws: [GV._torch_path(xg, w, None, True) for w in ws], N * K * 2, bw,
                          copies)
            if tg and M <= 64:
                timed(f"linear {name} int4 tinygemm M={M}",
                      lambda x=x, tg=tg, N=N: [TG.matmul(x, w, sz, 128, N, None) for w, sz in tg],
                      N * K // 2 + N * K // 128 * 4, bw, copies)
            if M <= 64:
                timed(f"linear {name} int8 M={M}", lambda x=x, q8=q8: [int8_matmul(x, q, s) for q, s in q8],
                      N * K + N * 4, bw, copies)
                timed(f"linear {name} int4 M={M}",
                      lambda x=x, q4=q4, K=K: [int4_matmul(x, p, s, m, 128 if K % 128 == 0 else 64)
                                               for p, s, m in q4],
                      N * K // 2 + N * K // 128 * 4, bw, copies)
        del ws, q8, q4
        torch.cuda.empty_cache()


def small_kernel_timings(bw, H=4096, I=13696):
    """The per-layer small kernels of the GLM-4-9B decode step at batch 1 (fused vs unfused norms)."""
    x, r = torch.randn(1, H, device=dev, dtype=bf16), torch.randn(1, H, device=dev, dtype=bf16)
    w = torch.randn(H, device=dev, dtype=bf16)
    timed("add_rms_norm T=1 H=4096", lambda: RN.add_rms_norm(x, r, w, 1e-5), 8 * H, bw)
    timed("rms_norm + add_rms_norm (GLM-4 sandwich, unfused) T=1",
          lambda: RN.add_rms_norm(RN.rms_norm(x, w, 1e-5), r, w, 1e-5), 12 * H, bw)
    timed("norm_add_rms_norm (GLM-4 sandwich, fused) T=1", lambda: RN.norm_add_rms_norm(x, w, r, w, 1e-5), 8 * H, bw)
    xi = torch.randn(1, 2 * I, device=dev, dtype=bf16)
    timed(f"silu_and_mul T=1 I={I}", lambda: SM.silu_and_mul(xi), 6 * I, bw)


def sampling_timings(bw, V):
    for B in (1, 64):
        lg = torch.randn(B, V, device=dev)
        t = torch.full((B,), 0.8, device=dev)
        sd = torch.arange(B, device=dev)
        st = torch.zeros(B, dtype=torch.int64, device=dev)
        timed(f"gumbel sample B={B} V={V}", lambda lg=lg, t=t, sd=sd, st=st: SA.gumbel_argmax(lg, t, sd, st),
              B * V * 4, bw)
        timed(f"top-k/top-p filter+sample B={B}",
              lambda lg=lg, t=t, sd=sd, st=st: SA.sample(lg, t, torch.full_like(sd, 50), torch.full_like(t, 0.9),
                                                         sd, st, True), B * V * 4, bw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-graph", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--quant-only", action="store_true", help="time only the linears (bf16 / int8 / int4)")
    ap.add_argument("--linears-only", action="store_true", help="time the linears and the small kernels only")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    bw = copy_bw_gbs()
    print(f"copy bandwidth (read+write): {bw:.0f} GB/s", flush=True)
    RESULTS.append({"kind": "copy_bw", "gbs": bw, "device": torch.cuda.get_device_name()})
    if not args.skip_checks:
        kernel_checks()
    if not args.skip_timing:
        kernel_timings(bw, args.quant_only or args.linears_only)
        if args.linears_only:
            small_kernel_timings(bw)
    if not args.skip_graph:
        try:
            from bench.decode_gpu import graph_vs_eager_check
        except ImportError as e:
            print(f"graph-vs-eager check skipped: {e}")
        else:
            ok = graph_vs_eager_check()
            RESULTS.append({"kind": "check", "name": "cuda graph == eager greedy tokens", "ok": ok})
            if not ok:
                FAILS.append("cuda graph == eager greedy tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    print(f"\n{len([r for r in RESULTS if r['kind'] == 'check'])} checks, {len(FAILS)} failed: {FAILS}")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
