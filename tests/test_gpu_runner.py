"""GpuModelRunner / decode CUDA graphs. The bucket plan is pure Python and runs everywhere; the rest needs a
CUDA device (skipped here; bench/gpu_check.py and bench/decode_gpu.py --check run it on the GPU machine)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # keep the kernels CPU-interpretable for test_kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_batch_buckets_cover_every_size_without_cliffs():
    pytest.importorskip("triton")
    from llm_engine.cuda_graphs import batch_buckets

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(1) == [1]
    b = batch_buckets(100)
    assert b[-1] == 100 and all(x < y for x, y in zip(b, b[1:], strict=False))
    for n in range(1, 101):  # every batch size pads by at most 50% (plus the tiny sizes)
        up = next(x for x in b if x >= n)
        assert up <= max(2 * n, n + 8)


def _engine(eager: bool, seed: int = 1, dtype=torch.bfloat16, **kw):
    from llm_engine.config import EngineConfig
    from llm_engine.engine import LLMEngine
    from llm_engine.model_config import ModelConfig
    from llm_engine.models.decoder import build_model
    from llm_engine.models.weights import init_random_weights

    os.environ["VOICEFAST_ENFORCE_EAGER"] = "1" if eager else "0"
    cfg = ModelConfig(family="glm4", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64, partial_rotary_factor=0.5, rope_interleaved=True,
                      attention_bias=True, post_branch_norms=True, max_position_embeddings=512,
                      dtype=dtype)
    model = init_random_weights(build_model(cfg, "cpu", torch.float32), seed=seed, **({"std": kw.pop("std")} if
                                "std" in kw else {})).to("cuda", dtype)
    model.cos_sin = model.cos_sin.float()
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    eng = LLMEngine(EngineConfig(**({"device": "cuda", "dtype": name, "max_num_seqs": 8, "num_kv_blocks": 128,
                                     "max_model_len": 512, "enable_prefix_caching": False} | kw)), model=model)
    os.environ.pop("VOICEFAST_ENFORCE_EAGER", None)
    return eng


def _generate(eng, prompts, params):
    got = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
        got[f"r{i}"] = []
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.token_ids)
    return got


@cuda
def test_cuda_graph_decode_matches_eager_greedy():
    from llm_engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 20, 45, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    eager, graph = _engine(True, speculative_tokens=0), _engine(False, speculative_tokens=0)
    assert eager.runner.graphs is None and graph.runner.graphs is not None
    assert _generate(eager, prompts, params) == _generate(graph, prompts, params)


@cuda
def test_cuda_graph_padded_bucket_and_seeded_sampling():
    from llm_engine.sampling_params import SamplingParams

    eng = _engine(False)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [9] * 30]  # 3 sequences replay the 4-bucket graph
    seeded = SamplingParams(temperature=0.9, top_p=0.8, max_tokens=12, ignore_eos=True, seed=123)
    a = _generate(eng, prompts, seeded)
    b = _generate(eng, prompts, seeded)
    assert list(a.values()) == list(b.values())  # seeded requests reproduce
    assert all(len(v) == 12 and all(0 <= t < 512 for t in v) for v in a.values())


@cuda
def test_cuda_graph_top_k_rows_beside_free_rows_use_their_own_filter():
    """A graph step that re-samples with the top-k / top-p filter gets each row's own values (uploaded from pinned
    buffers): top_k = 1 at temperature 1 gives the greedy rows' tokens, and a free row in the same padded bucket
    samples what it samples when the step needs no filter (float32: no exact ties among the logits)."""
    from llm_engine.sampling_params import SamplingParams

    prompts = [[1, 2, 3], [4, 5, 6, 7], [9] * 30]  # 3 sequences: the 4-bucket graph with a padding row
    eng = _engine(False, dtype=torch.float32, speculative_tokens=0)
    free = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    top1 = SamplingParams(temperature=1.0, top_k=1, top_p=0.5, max_tokens=12, ignore_eos=True, seed=4)
    runs = []
    for first in (greedy, top1):  # without, then with the filter re-sample after the replay
        steps = eng.runner.num_graph_steps
        got = {}
        for i, (p, sp) in enumerate(zip(prompts, [first, first, free], strict=True)):
            eng.add_request(f"r{i}", p, sp)
            got[f"r{i}"] = []
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id].extend(o.token_ids)
        assert eng.runner.num_graph_steps - steps >= 10  # decoded through the graph
        runs.append(got)
    assert runs[1] == runs[0] and all(len(v) == 12 for v in runs[0].values())


def _patterned(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pat = torch.randint(0, 512, (3 + i % 5,), generator=g).tolist()
        out.append(torch.randint(0, 512, (i,), generator=g).tolist() + pat * 3)
    return out


@cuda
def test_speculative_verify_runs_in_the_graph_and_keeps_greedy_and_seeded_tokens():
    """float32 weights, so the verify rows' wider GEMMs change nothing but rounding: greedy and seeded-sampled
    speculative decoding give plain decoding's tokens (the graph samples each row with its position's noise);
    ties (top-2 gap < 1e-2 in plain decoding) excused for greedy."""
    from test_spec_decode import assert_same_or_tie

    from llm_engine.sampling_params import SamplingParams

    prompts = _patterned(6, 0)
    plain = _engine(False, dtype=torch.float32, std=0.05, speculative_tokens=0)
    spec = _engine(False, dtype=torch.float32, std=0.05, speculative_tokens=4)
    for params in (SamplingParams(max_tokens=24, ignore_eos=True),
                   SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=5)):
        a, b = _generate(plain, prompts, params), _generate(spec, prompts, params)
        for i, p in enumerate(prompts):
            if params.temperature == 0:
                assert_same_or_tie(_cpu_model(plain), p, a[f"r{i}"], b[f"r{i}"])
            else:
                assert a[f"r{i}"] == b[f"r{i}"]
    st = spec.stats()
    assert st.spec_accepted_tokens > 0 and spec.runner.num_graph_verify_steps > 0
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def _cpu_model(eng):
    """A float32 CPU copy of the engine's model (for plain-decoding logits in the tie check)."""
    import copy

    m = copy.deepcopy(eng.model).to("cpu", torch.float32)
    m.cos_sin = m.cos_sin.float()
    return m


@cuda
def test_cuda_graph_constrained_and_free_rows_in_one_batch():
    """Constrained rows are masked and re-sampled outside the captured step: their output is valid JSON of the
    schema; free rows in the same batch draw exactly what they draw alone."""
    import json

    from bench.synthetic_tokenizer import build_byte_bpe
    from llm_engine.sampling_params import SamplingParams
    from llm_engine.tokenizer import Tokenizer

    tk = build_byte_bpe(512, specials=("<|eos|>",))
    schema = {"type": "object", "properties": {"size": {"type": "string", "enum": ["small", "large"]},
                                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["size", "qty"], "additionalProperties": False}
    free = SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True, seed=7)
    con = SamplingParams(temperature=0.9, max_tokens=40, seed=8, json_schema=schema)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [9] * 30]
    results = {}
    for eager in (False, True):
        eng = _engine(eager)
        eng.tokenizer = Tokenizer(tk, eos_token_ids=[tk.token_to_id("<|eos|>")])
        eng.eos_token_ids = frozenset(eng.tokenizer.eos_token_ids)
        alone = eng.generate([prompts[0]], free)[0][0]
        mixed = eng.generate(prompts, [free, con, con])
        assert mixed[0][0] == alone
        for _, res in mixed[1:]:
            assert res.finish_reason == "stop" and res.draft_tokens == 0, res  # constrained: never speculates
            obj = json.loads(res.text)
            assert obj["size"] in ("small", "large") and 1 <= obj["qty"] <= 9 and set(obj) == {"size", "qty"}
        results[eager] = eng.runner.graphs is None
    assert results == {False: False, True: True}  # both paths ran
