"""Weight-only int8 / int4: quantization error bounds, kernels vs the torch dequant reference (CPU under
TRITON_INTERPRET=1), and the module swap."""

import os

import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:  # a GPU pytest process runs the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from llm_engine.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_model  # noqa: E402
from llm_engine.quant import int4 as I4  # noqa: E402
from llm_engine.quant import int8 as I8  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
DOT_TOL = 1e-5 if INTERPRET else 5e-3  # compiled, an fp32 tl.dot runs in tf32


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_roundtrip_error_is_small():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert _rel(I8.dequantize_int8(q, s, torch.float32), w) < 0.01


def test_int4_pack_roundtrip_and_error():
    w = torch.randn(32, 384, generator=torch.Generator().manual_seed(1))
    packed, s, mn, group = quantize_int4(w)
    assert group == 128 and packed.shape == (32, 192) and s.shape == (32, 3)
    codes = I4.unpack_int4(packed, group)
    assert codes.max() <= 15 and codes.shape == (32, 384)
    # half-split layout: byte j of group g = code g*128 + j (low nibble) | code g*128 + 64 + j (high nibble)
    assert torch.equal(codes[:, 64:128], (packed[:, 0:64] >> 4)) and torch.equal(codes[:, 0:64], packed[:, 0:64] & 15)
    err = _rel(I4.dequantize_int4(packed, s, mn, group, torch.float32), w)
    assert 0.02 < err < 0.12  # 4-bit asymmetric on Gaussian weights: about 8-9%
    # a SmolLM2-like width that is not a multiple of 128 falls back to group 64
    assert quantize_int4(torch.randn(8, 576))[3] == 64


@pytest.mark.parametrize("M,N,K,bias", [(1, 40, 256, True), (5, 33, 384, False), (16, 64, 128, True),
                                        (40, 24, 128, False)])
def test_quant_kernels_match_dequant_reference(M, N, K, bias):
    triton = pytest.importorskip("triton")  # noqa: F841
    from llm_engine.quant.kernels import int4_matmul, int8_matmul

    g = torch.Generator().manual_seed(M * N + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    tol = 1e-5 if M == 1 else DOT_TOL  # M = 1 is an FMA loop, more rows a tl.dot
    q, s = quantize_int8(w)
    d = {"device": DEV}
    bd = None if b is None else b.to(**d)
    y8 = int8_matmul(x.to(**d), q.to(**d), s.to(**d), bd, config=(16, 128, 4, 1))
    assert _rel(y8.cpu(), I8.reference_int8_linear(x, q, s, b)) < tol
    packed, sc, mn, group = quantize_int4(w)
    y4 = int4_matmul(x.to(**d), packed.to(**d), sc.to(**d), mn.to(**d), group, bd, config=(8, 2, 4, 1))
    assert _rel(y4.cpu(), I4.reference_int4_linear(x, packed, sc, mn, group, b)) < tol


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 128)
        self.proj = nn.Linear(128, 256, bias=True)
        self.inner = nn.Sequential(nn.Linear(256, 128, bias=False))
        self.lm_head = nn.Linear(128, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.lm_head(self.inner(F.silu(self.proj(self.embed(ids)))))


@pytest.mark.parametrize("mode,cls,tol", [("int8", Int8Linear, 0.02), ("int4", Int4Linear, 0.2)])
def test_quantize_model_swaps_linears_and_keeps_outputs_close(mode, cls, tol):
    torch.manual_seed(0)
    m = _Tiny()
    ids = torch.tensor([1, 7, 42])
    ref = m(ids)
    quantize_model(m, mode, include_lm_head=False)
    assert isinstance(m.proj, cls) and isinstance(m.inner[0], cls) and isinstance(m.lm_head, nn.Linear)
    assert _rel(m(ids), ref) < tol
    quantize_model(m, mode, include_lm_head=True)
    assert isinstance(m.lm_head, cls) and isinstance(m.embed, nn.Embedding)
    assert _rel(m(ids), ref) < tol * 1.5


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="int8"):
        quantize_model(_Tiny(), "int3")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(4, 100))


def test_int4_backends_validate():
    with pytest.raises(ValueError, match="int4_backend"):
        quantize_model(_Tiny(), "int4", int4_backend="marlin")
    with pytest.raises(ValueError, match="tinygemm"):  # no CUDA tensors here (or on CPU anywhere): a clear error
        quantize_model(_Tiny(), "int4", int4_backend="tinygemm")


@pytest.mark.skipif(INTERPRET, reason="needs CUDA")
def test_tinygemm_backend_matches_its_dequantized_weights():
    from llm_engine.quant import tinygemm

    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(256, 96, bias=True).to("cuda", torch.bfloat16)
    lin.weight.data.copy_(torch.randn(96, 256, generator=g) * 0.05)
    q = Int4Linear.from_linear(lin)
    codes = I4.unpack_int4(q.qweight, q.group)
    q.use_tinygemm()
    x = torch.randn(5, 256, generator=g).to("cuda", torch.bfloat16)
    ref = x.float() @ tinygemm.dequantize(codes, q.tg_scale_zero, q.group).T + lin.bias.float()
    assert _rel(q(x).float(), ref) < 1e-2 and q.backend == "tinygemm"
    assert _rel(q(x).float(), lin(x).float()) < 0.15  # still the layer it quantized
