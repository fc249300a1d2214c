"""The CUDA prefill path, run on a CPU: the engine's real step with the Triton kernels interpreted
(ops.kernels_on_cpu under TRITON_INTERPRET=1). The varlen prefill kernel gives the logits the SDPA loop and the
plain torch path give (prefix-cache hits, a decode row beside prefills); its op count per step does not grow with
the number of sequences (bench/prefill_ops.py's counter); the packed pinned upload round-trips every array."""

import os

import numpy as np
import pytest
import torch
from tiny_llm import tiny_llama

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton")

from llm_engine import EngineConfig, LLMEngine, SamplingParams, ops  # noqa: E402
from llm_engine.kernels import prefill_attention_backend, set_prefill_attention_backend  # noqa: E402
from llm_engine.pinned_upload import PinnedUpload  # noqa: E402

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interprets the kernels on CPU tensors")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=96, intermediate_size=96, num_heads=6, seed=3, std=0.3)


def _engine(model):
    return LLMEngine(EngineConfig(device="cpu", num_kv_blocks=256, kv_block_size=4, max_num_batched_tokens=256,
                                  max_num_seqs=8, speculative_tokens=0), model=model)


@pytest.fixture
def backend():
    prev = prefill_attention_backend()
    yield set_prefill_attention_backend
    set_prefill_attention_backend(prev)


@cpu_only
def test_prefill_kernel_step_gives_the_sdpa_and_torch_logits(model, backend):
    eng = _engine(model)
    prefix = list(range(3, 23))  # 20 tokens: 5 full blocks the next requests find in the prefix cache
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    eng.add_request("a", prefix + [40], greedy)
    eng.step()  # a: prefill; its full blocks are now cached
    for rid, tail in (("b", [50]), ("c", [51, 52, 53, 54, 55]), ("d", list(range(60, 69)))):
        eng.add_request(rid, prefix + tail, greedy)
    eng.add_request("e", list(range(70, 83)), greedy)  # a fresh prompt, no hit
    seen, forward = {}, eng.runner.forward

    def three_ways(inp):
        rows = inp.logits_indices
        out = {}
        for name in ("torch", "sdpa", "triton"):
            if name == "torch":
                h = forward(inp)
            else:
                backend(name)
                with ops.kernels_on_cpu():
                    h = forward(inp)  # writes the same K/V into the same slots again: idempotent
            out[name] = model.compute_logits(h.index_select(0, rows))
        seen["logits"], seen["meta"] = out, inp.meta
        return h

    eng.runner.forward = three_ways
    eng.step()  # a decodes (one query row) beside b, c, d (cached prefix + 1 / 5 / 9 new) and e (13 new)
    meta, got = seen["meta"], seen["logits"]
    assert meta.query_lens_cpu == [1, 1, 5, 9, 13]
    assert [s - q for q, s in zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)] == [21, 20, 20, 20, 0]
    ref = got["torch"]
    for name in ("sdpa", "triton"):
        assert torch.isfinite(got[name]).all()
        assert (got[name] - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
        assert torch.equal(got[name].argmax(-1), ref.argmax(-1))


@cpu_only
def test_prefill_kernel_op_count_does_not_grow_with_sequences(model, backend):
    from bench.prefill_ops import OpCounter, PrefillSteps, instrument

    eng = _engine(model)
    steps = PrefillSteps(eng, seed=1)
    counter = OpCounter(skip_triton=True)
    instrument(counter, eng.runner, model)
    counts = {}
    with ops.kernels_on_cpu():
        steps.prefix(12)  # cached before counting
        for name in ("sdpa", "triton"):
            backend(name)
            for n in (1, 4):
                counter.reset()
                with counter:
                    _, tokens = steps.step(n, 12, 6)
                assert tokens == 6 * n  # the 12-token prefix came from the cache
                counts[name, n] = counter.totals()
                assert counter.per_phase()["attn_core"].get("triton", 0) == (2 if name == "triton" else 0)
    assert counts["triton", 1]["torch"] == counts["triton", 4]["torch"]
    assert counts["triton", 1]["triton"] == counts["triton", 4]["triton"]
    # the SDPA loop pays per sequence and layer; the kernel one call per layer
    per_seq_layer = (counts["sdpa", 4]["torch"] - counts["sdpa", 1]["torch"]) / 3 / 2
    assert per_seq_layer >= 10
    assert counts["triton", 4]["torch"] < counts["sdpa", 4]["torch"] - 3 * 2 * 10


def test_prefill_backend_setting_rejects_unknown_names(backend):
    with pytest.raises(ValueError, match="prefill attention backend"):
        backend("flash")


def test_pinned_upload_round_trips_every_array():
    up = PinnedUpload("cpu", capacity_bytes=64)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 1000, (5, 40)).astype(np.int32)
    for rows in (3, 5):  # second call grows past the first capacity
        host = {"ids": rng.integers(0, 1 << 40, 7 * rows), "qsl": np.arange(rows + 1, dtype=np.int32),
                "tables": big[:rows, :rows * 3], "temp": rng.random(rows).astype(np.float32),
                "empty": np.zeros(0, np.int64)}
        dev = up.upload(host)
        for name, a in host.items():
            t = dev[name]
            assert t.dtype == torch.from_numpy(np.ascontiguousarray(a)).dtype and tuple(t.shape) == a.shape
            assert np.array_equal(t.numpy(), a)
            assert t.data_ptr() % 16 == 0  # Triton specializes pointers on 16-byte alignment: never varies
    assert up.num_copies == 2 and up.capacity >= 5 * 15 * 4
