"""HalfGemvLinear's paths (fp16 GEMV, oneDNN-packed fp32, transposed fp32 mm, F.linear) against F.linear on the
fp32 weight, use_half_gemv's swap, and EngineConfig.quantize_lm_head wired through to quantize_model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.layers.linear import HalfGemvLinear, Linear, use_half_gemv
from llm_engine.quant import Int8Linear


def make(out_f=96, in_f=64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin, HalfGemvLinear.from_linear(lin)


@pytest.mark.parametrize("bias", [False, True])
def test_every_row_count_matches_fp32_linear(bias):
    lin, fast = make(bias=bias)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in range(0, 24):
            x = torch.randn(rows, 64, generator=g)  # [rows, in]
            ref, got = F.linear(x, lin.weight, lin.bias), fast(x)
            assert got.shape == (rows, 96) and got.dtype == torch.float32 and got.is_contiguous()
            if rows <= fast.max_rows:  # fp16 weights and inputs: close, not equal
                assert (got - ref).abs().max().item() < 2e-2 if rows else True
            elif fast.weight_packed is not None or rows <= fast.mm_max_rows:  # fp32, another summation order
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            else:  # no oneDNN, many rows: F.linear itself, bit for bit
                assert torch.equal(got, ref)


@pytest.mark.parametrize("packed", [True, False])
def test_few_row_path_keeps_fp32_accuracy_with_and_without_onednn(packed):
    lin, fast = make(bias=True)
    assert (fast.weight_packed is not None) == torch.backends.mkldnn.is_available()
    if not packed:
        fast.weight_packed = None  # the torch.mm(W, x.T) fallback
    for rows in (fast.max_rows + 1, fast.mm_max_rows):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            got = fast(x)
            fp16 = F.linear(x.half(), fast.weight_half, fast.bias_half).float()
        assert got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert (got - fp16).abs().max().item() > 1e-4  # not the fp16 product: fp32 accuracy kept


def test_without_onednn_many_rows_fall_back_to_f_linear_exactly():
    lin, fast = make(bias=True)
    fast.weight_packed = None
    x = torch.randn(fast.mm_max_rows + 5, 64)
    with torch.inference_mode():
        assert torch.equal(fast(x), F.linear(x, lin.weight, lin.bias))


def test_non_2d_and_non_contiguous_inputs():
    lin, fast = make(bias=True)
    x3 = torch.randn(2, 3, 64)  # [B, T, in]: always F.linear
    assert torch.equal(fast(x3), F.linear(x3, lin.weight, lin.bias))
    x = torch.randn(64, 5).T  # [5, in], a transposed view
    torch.testing.assert_close(fast(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_use_half_gemv_swaps_fp32_cpu_linears_in_place():
    model = nn.Module()
    model.proj = Linear(16, 32)
    model.lm_head = nn.Linear(16, 50, bias=False)
    model.bf = nn.Linear(16, 8).to(torch.bfloat16)  # not float32: left alone
    w = model.lm_head.weight
    use_half_gemv(model)
    assert type(model.proj) is HalfGemvLinear and type(model.lm_head) is HalfGemvLinear
    assert model.lm_head.weight is w  # shared, not copied
    assert type(model.bf) is nn.Linear
    for rows in (1, 4, 32):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(model.lm_head(x), F.linear(x, w), rtol=1e-5 if rows > 2 else 2e-2,
                                   atol=1e-5 if rows > 2 else 2e-2)


def test_quantize_lm_head_needs_quantize_and_a_bool():
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantize"):
        EngineConfig(quantize_lm_head=True)
    with pytest.raises(ValueError, match="must be a bool"):
        EngineConfig(quantize="int8", quantize_lm_head=1)
    assert EngineConfig(quantize="int8", quantize_lm_head=True).quantize_lm_head


@pytest.mark.slow
@pytest.mark.parametrize("with_head", [False, True])
def test_engine_quantize_lm_head_reaches_quantize_model(with_head):
    eng = LLMEngine(EngineConfig(device="cpu", quantize="int8", quantize_lm_head=with_head, kv_cache_memory_mib=16))
    m = eng.model
    assert isinstance(m.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(m.lm_head, Int8Linear) == with_head
    assert isinstance(m.model.embed_tokens, nn.Embedding)  # the embedding stays full precision
    [(toks, res)] = eng.generate([eng.tokenizer.encode("Hello")], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(toks) == 4 and res.completion_tokens == 4
