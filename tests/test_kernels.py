"""Every Triton kernel against its plain-torch reference at tiny shapes (fresh random inputs per case): on a CPU
under TRITON_INTERPRET=1, on a GPU compiled (the interpreter is switched on only where there is no CUDA, so a GPU
pytest process runs the real kernels). Real shapes run on the GPU: bench/gpu_check.py."""

import os

import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

import pytest  # noqa: E402

pytest.importorskip("triton")

from llm_engine.kernels import decode_attention as DA  # noqa: E402
from llm_engine.kernels import prefill_attention as PA  # noqa: E402
from llm_engine.kernels import rms_norm as RN  # noqa: E402
from llm_engine.kernels import rotary_kv as RK  # noqa: E402
from llm_engine.kernels import sampling as SA  # noqa: E402
from llm_engine.kernels import silu_and_mul as SM  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
DOT_TOL = 1e-5 if INTERPRET else 5e-3  # compiled, an fp32 tl.dot runs in tf32


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("T,H", [(1, 8), (3, 40), (4, 64)])
def test_add_rms_norm_matches_reference(T, H):
    g = torch.Generator().manual_seed(T * 100 + H)
    x, r = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    w = torch.randn(H, generator=g)
    out, res = RN.add_rms_norm(x.to(DEV), r.to(DEV), w.to(DEV), 1e-5)
    ref_out, ref_res = RN.reference_add_rms_norm(x, r, w, 1e-5)
    assert _rel(out.cpu(), ref_out) < 1e-5 and _rel(res.cpu(), ref_res) < 1e-6
    plain = RN.rms_norm(x.to(DEV), w.to(DEV), 1e-6)
    assert _rel(plain.cpu(), RN.reference_rms_norm(x, w, 1e-6)) < 1e-5
    none_out, none_res = RN.add_rms_norm(x.to(DEV), None, w.to(DEV), 1e-5)
    assert none_res.data_ptr() == x.to(DEV).data_ptr() or torch.equal(none_res.cpu(), x)


def test_kernels_agree_with_models_ops_references():
    """Our references and llm_engine.ops' torch functions define the same maths."""
    ops = pytest.importorskip("llm_engine.ops")
    g = torch.Generator().manual_seed(7)
    x, r, w = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g), torch.randn(32, generator=g)
    a, b = ops.add_rms_norm(x, r, w, 1e-5)
    ra, rb = RN.add_rms_norm(x.to(DEV), r.to(DEV), w.to(DEV), 1e-5)
    assert _rel(ra.cpu(), a) < 1e-5 and _rel(rb.cpu(), b) < 1e-6
    y = torch.randn(3, 2 * 24, generator=g)
    assert _rel(SM.silu_and_mul(y.to(DEV)).cpu(), ops.silu_and_mul(y)) < 1e-6
    pos = torch.tensor([0, 5, 17])
    cs = RK.make_cos_sin(32, 8, 10000.0)
    for inter in (True, False):
        q = torch.randn(3, 2, 16, generator=g)
        assert _rel(RK.reference_rotary(q, pos, cs, 8, inter), ops.reference_rotary(q, pos, cs, 8, inter)) < 1e-6


@pytest.mark.parametrize("T,I", [(1, 24), (5, 80)])
def test_silu_and_mul_matches_reference(T, I):
    x = torch.randn(T, 2 * I, generator=torch.Generator().manual_seed(T + I))
    assert _rel(SM.silu_and_mul(x.to(DEV)).cpu(), SM.reference_silu_and_mul(x)) < 1e-6


# (interleaved, rot_dim, Hq, Hkv, D): GLM partial interleaved, NeoX llama, GGUF-llama full interleaved
ROTARY_CASES = [(True, 8, 4, 2, 16), (False, 16, 3, 1, 16), (True, 16, 8, 8, 16), (False, 12, 2, 1, 24)]


@pytest.mark.parametrize("interleaved,rot_dim,Hq,Hkv,D", ROTARY_CASES)
def test_rotary_store_kv_matches_reference(interleaved, rot_dim, Hq, Hkv, D):
    g = torch.Generator().manual_seed(rot_dim * 7 + Hq)
    T, bs, nb = 5, 4, 8
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)  # fused projection output; q/k/v are strided views
    pos = torch.randint(0, 60, (T,), generator=g)
    cs = RK.make_cos_sin(64, rot_dim, 10000.0)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[2] = -1  # a padded token is not stored
    kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)

    def split(t):
        q, k, v = t.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)

    qkv_k, kc_k, vc_k = qkv.clone().to(DEV), kc.clone().to(DEV), vc.clone().to(DEV)
    q, k, v = split(qkv_k)
    RK.rotary_store_kv(q, k, v, pos.to(DEV), cs.to(DEV), rot_dim, interleaved, kc_k, vc_k, slots.to(DEV))
    qkv_r, kc_r, vc_r = qkv.clone(), kc.clone(), vc.clone()
    qr, kr, vr = split(qkv_r)
    RK.reference_rotary_store_kv(qr, kr, vr, pos, cs, rot_dim, interleaved, kc_r, vc_r, slots)
    assert _rel(qkv_k.cpu(), qkv_r) < 1e-6
    assert _rel(kc_k.cpu(), kc_r) < 1e-6 and _rel(vc_k.cpu(), vc_r) < 1e-6


# (B, Hq, Hkv, D, seq_lens, split_tokens): GQA ratios 1, 2, 3, 16; one split and several; a 0-length row
ATTN_CASES = [(2, 4, 4, 16, [5, 9], 128), (3, 8, 4, 16, [1, 70, 79], 64), (2, 16, 1, 32, [70, 33], 64),
              (2, 6, 2, 16, [0, 12], 64)]


@pytest.mark.parametrize("B,Hq,Hkv,D,seq_lens,splits", ATTN_CASES)
def test_decode_attention_matches_reference(B, Hq, Hkv, D, seq_lens, splits):
    g = torch.Generator().manual_seed(B * 31 + Hq + D)
    bs, nb, max_blocks = 4, 64, 20
    q = torch.randn(B, Hq, D, generator=g)
    kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)
    bt = torch.randperm(nb, generator=g)[: B * max_blocks].reshape(B, max_blocks).int()
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    ref = DA.reference_decode_attention(q, kc, vc, sl, bt, D**-0.5)
    out = torch.full_like(q, float("nan")).to(DEV)  # poisoned: every element must be written
    DA.decode_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), sl.to(DEV), bt.to(DEV), D**-0.5,
                        split_tokens=splits, max_seq_len=max(seq_lens), out=out)
    assert not out.isnan().any()
    assert _rel(out.cpu(), ref) < DOT_TOL
    # the same partition under a larger length bound (the CUDA graph's capacity): bit-identical
    again = DA.decode_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), sl.to(DEV), bt.to(DEV), D**-0.5,
                                split_tokens=splits)
    assert torch.equal(again, out)


def _prefill_case(g, Hq, Hkv, D, bs, qlens, slens, width_pad=2):
    """q as a strided view of a fused qkv output; pages scattered over the pool; tables padded past each need."""
    from llm_engine.attn_metadata import AttnMetadata

    B, T = len(qlens), sum(qlens)
    width = max(-(-n // bs) for n in slens) + width_pad
    nb = B * width + 3
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    q = qkv[:, :Hq * D].view(T, Hq, D)  # [T, Hq, D] strided like the model's
    kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)
    bt = torch.randperm(nb, generator=g)[:B * width].reshape(B, width).int()  # [B, width]
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttnMetadata(query_start_loc=qsl, seq_lens=torch.tensor(slens, dtype=torch.int32), block_tables=bt,
                        slot_mapping=torch.zeros(T, dtype=torch.int64), max_query_len=max(qlens),
                        max_seq_len=max(slens), is_decode=False, query_lens_cpu=list(qlens), seq_lens_cpu=list(slens))
    return q, kc, vc, meta


# (Hq, Hkv, D, block_size, query_lens, seq_lens): GQA 1/3/4/16, head dims 64 and 128, block sizes 1..32; fresh
# prompts (L == n), cached-prefix chunks (L < n), one-token rows (a decode beside prefills) and a 1-token prompt
PREFILL_CASES = [(2, 2, 64, 4, [1, 5, 16], [1, 9, 40]),
                 (6, 2, 64, 16, [7, 1, 30], [7, 20, 50]),
                 (4, 1, 128, 8, [3, 70], [35, 70]),
                 (9, 3, 64, 1, [4, 2], [4, 6]),
                 (6, 2, 128, 32, [24, 1, 9], [200, 33, 9]),
                 (16, 1, 64, 16, [5], [21])]


@pytest.mark.parametrize("Hq,Hkv,D,bs,qlens,slens", PREFILL_CASES)
def test_prefill_attention_kernel_matches_reference(Hq, Hkv, D, bs, qlens, slens):
    ops = pytest.importorskip("llm_engine.ops")
    g = torch.Generator().manual_seed(Hq * 1000 + D + bs + sum(slens))
    q, kc, vc, meta = _prefill_case(g, Hq, Hkv, D, bs, qlens, slens)
    ref = ops.reference_paged_attention(q, kc, vc, meta, D**-0.5)
    out = torch.full((q.shape[0], Hq, D), float("nan")).to(DEV)  # poisoned: every element must be written
    PA.prefill_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), meta.query_start_loc.to(DEV),
                         meta.seq_lens.to(DEV), meta.block_tables.to(DEV), D**-0.5, meta.max_query_len, out=out)
    assert not out.isnan().any()
    assert _rel(out.cpu(), ref) < DOT_TOL
    old = PA.sdpa_prefill_attention(q, kc, vc, meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu, D**-0.5)
    assert _rel(old, ref) < 1e-5  # the old path computes the same function
    # a grid sized for a longer chunk than any present (a bound, not the exact max) changes nothing
    again = PA.prefill_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), meta.query_start_loc.to(DEV),
                                 meta.seq_lens.to(DEV), meta.block_tables.to(DEV), D**-0.5, meta.max_query_len + 40)
    assert torch.equal(again.cpu(), out.cpu())


def test_prefill_attention_rejects_bad_shapes():
    q = torch.randn(3, 5, 16)
    kc = vc = torch.randn(4, 4, 2, 16)
    with pytest.raises(ValueError, match="do not group"):
        PA.prefill_attention(q, kc, vc, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3]),
                             torch.zeros(1, 2, dtype=torch.int32), 0.25, 3)


def test_greedy_sampling_is_argmax_and_seeded_sampling_is_reproducible():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 300, generator=g).to(DEV)
    temp = torch.tensor([0.0, 0.0, 0.8, 1.0]).to(DEV)
    seeds = torch.tensor([1, 2, 3, 4]).to(DEV)
    steps = torch.zeros(4, dtype=torch.int64).to(DEV)
    a = SA.gumbel_argmax(logits, temp, seeds, steps, block=64)
    b = SA.gumbel_argmax(logits, temp, seeds, steps, block=64)
    assert torch.equal(a[:2].cpu(), logits[:2].argmax(1).cpu())
    assert torch.equal(a.cpu(), b.cpu())


def test_gumbel_sampling_follows_the_softmax():
    """256 rows of the same 6-way distribution, distinct seeds: frequencies track softmax(logits / T)."""
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 512
    logits = base.repeat(n, 1).to(DEV)
    temp = torch.full((n,), 0.7).to(DEV)
    counts = torch.zeros(6)
    for step in range(4):
        tok = SA.gumbel_argmax(logits, temp, torch.arange(n).to(DEV), torch.full((n,), step).to(DEV))
        counts += torch.bincount(tok.cpu(), minlength=6).float()
    freq = counts / counts.sum()
    expect = (base / 0.7).softmax(0)
    assert (freq - expect).abs().max() < 0.03


def test_top_k_top_p_filter_and_full_sampler():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 5.0, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0, 1.0]])
    temp = torch.tensor([1.0, 1.0, 0.0])
    f = SA.filter_top_k_top_p(logits, temp, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 1.0]))
    assert torch.isinf(f[0, 2:]).all() and torch.isfinite(f[0, :2]).all()  # top-k 2
    assert torch.isfinite(f[1]).sum() == 1 and torch.isfinite(f[1, 1])  # top-p 0.5 keeps the 0.97 token
    assert torch.isfinite(f[2]).all()  # no filter
    n = 64
    lg = logits[0].repeat(n, 1).to(DEV)
    tok = SA.sample(lg, torch.ones(n).to(DEV), torch.full((n,), 2).to(DEV), torch.ones(n).to(DEV),
                    torch.arange(n).to(DEV), torch.zeros(n, dtype=torch.int64).to(DEV), needs_filter=True)
    assert set(tok.cpu().tolist()) <= {0, 1} and len(set(tok.cpu().tolist())) == 2
    ref = SA.reference_sample(lg.cpu(), torch.ones(n), torch.full((n,), 2), torch.ones(n),
                              torch.Generator().manual_seed(0))
    assert set(ref.tolist()) <= {0, 1}


@pytest.mark.parametrize("M,N,K,bias,silu", [(1, 24, 64, True, False), (1, 19, 48, False, True),
                                             (3, 40, 64, False, False), (16, 33, 80, True, True)])
def test_gemv_matches_reference(M, N, K, bias, silu):
    from llm_engine.kernels import gemv as GV

    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, 2 * K if silu else K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    ref = GV.reference_gemv(x, w, b, silu)
    for cfg in ((8, 32, 4, 1), (4, 16, 2, 2)):  # several N tiles, K tails
        d = {"device": DEV}
        out = GV.gemv(x.to(**d), w.to(**d), None if b is None else b.to(**d), silu, cfg)
        assert _rel(out.cpu(), ref) < (1e-5 if M == 1 else DOT_TOL)
    with pytest.raises(ValueError, match="small-batch"):
        GV.gemv(torch.zeros(17, K), w)
    # the decode-sized dispatch takes whichever candidate was chosen for the shape
    GV.set_choice(N, K, GV.m_bucket(M), silu, (8, 32, 4, 1))
    assert _rel(GV.linear(x.to(DEV), w.to(DEV), None if b is None else b.to(DEV), silu).cpu(), ref) < DOT_TOL
    GV.set_choice(N, K, GV.m_bucket(M), silu, GV.TORCH)
    assert _rel(GV.linear(x, w, b, silu), ref) < 1e-5


def test_gemv_choice_is_made_per_row_bucket_and_timed_at_its_row_count(monkeypatch):
    """pick: one choice per decode-graph bucket (1, 2, 4, 8, 16 rows), each timed once with x of the bucket's row
    count (the graph pads a batch to its bucket); a candidate whose timing fails is skipped. The timer here is
    scripted (the default one, graph_ms, needs CUDA: test below)."""
    from llm_engine.kernels import gemv as GV

    monkeypatch.setattr(GV, "_CHOSEN", {})
    c1, c2 = (8, 32, 4, 1), (4, 16, 2, 2)
    monkeypatch.setattr(GV, "CANDIDATES", {1: [GV.TORCH, c1], 16: [GV.TORCH, c1, c2]})
    g = torch.Generator().manual_seed(11)
    N, K = 24, 64
    w = torch.randn(N, K, generator=g).to(DEV)
    costs = {1: [2.0, 1.0], 2: [1.0, 3.0, 2.0], 4: [3.0, 1.0, None], 8: [2.0, 3.0, 1.0], 16: [None, 2.0, 3.0]}
    timed: list[int] = []

    def timer(fn):
        out = fn()  # the candidate over its rotated weight copies
        rows = out[0].shape[0]
        assert all(tuple(o.shape) == (rows, N) for o in out)
        ms = costs[rows][timed.count(rows)]
        timed.append(rows)
        if ms is None:
            raise RuntimeError("does not fit")  # skipped
        return ms

    want = {1: c1, 2: GV.TORCH, 4: c1, 8: c2, 16: c1}
    for M in (1, 2, 3, 4, 5, 8, 9, 16):
        x = torch.randn(M, K, generator=g).to(DEV)
        assert GV.pick(x, w, None, False, timer=timer) == want[GV.m_bucket(M)], M
    assert timed == [1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]  # each bucket once, at its own row count
    assert GV.chosen()[f"N={N} K={K} M<=8 silu=False"] == c2
    x = torch.randn(6, K, generator=g)
    assert _rel(GV.linear(x.to(DEV), w).cpu(), GV.reference_gemv(x, w.cpu())) < DOT_TOL  # runs bucket 8's c2
    for bad in (0, 17):
        with pytest.raises(ValueError, match="rows"):
            GV.m_bucket(bad)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_gemv_graph_timer_and_pick_on_the_gpu(monkeypatch):
    from llm_engine.kernels import gemv as GV

    monkeypatch.setattr(GV, "_CHOSEN", {})
    a = torch.randn(64, 64, device="cuda")
    ms = GV.graph_ms(lambda: a @ a)
    assert 0 < ms < 10 and not torch.cuda.is_current_stream_capturing()
    w = torch.randn(576, 1536, device="cuda", dtype=torch.bfloat16) * 0.02
    for M in (1, 8):
        x = torch.randn(M, 2 * 1536, device="cuda", dtype=torch.bfloat16)
        assert GV.pick(x, w, None, True) in GV.CANDIDATES[GV.m_class(M)]
        ref = GV.reference_gemv(x.float(), w.float(), None, True)
        assert _rel(GV.linear(x, w, None, True), ref) < 1e-2
    assert set(GV.chosen()) == {"N=576 K=1536 M<=1 silu=True", "N=576 K=1536 M<=8 silu=True"}


def test_norm_add_rms_norm_matches_two_unfused_steps():
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    pw, w = torch.randn(40, generator=g), torch.randn(40, generator=g)
    out, res = RN.norm_add_rms_norm(x.to(DEV), pw.to(DEV), r.to(DEV), w.to(DEV), 1e-5)
    ref_out, ref_res = RN.reference_norm_add_rms_norm(x, pw, r, w, 1e-5)
    assert _rel(out.cpu(), ref_out) < 1e-5 and _rel(res.cpu(), ref_res) < 1e-6
    ops = pytest.importorskip("llm_engine.ops")
    a, b = ops.norm_add_rms_norm(x, pw, r, w, 1e-5)  # the CPU path: the same maths
    assert _rel(a, ref_out) < 1e-5 and _rel(b, ref_res) < 1e-6
