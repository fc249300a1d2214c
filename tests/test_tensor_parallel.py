"""Tensor parallelism on CPU: the weight splits (pure), and TP=2 engines (gloo, 2 processes: this one as rank 0
and a spawned worker) against the unsharded engine at tiny GLM-4 and Llama shapes — logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from bench.tp_check import greedy_agrees, logits_error
from llm_engine.config import EngineConfig
from llm_engine.engine import LLMEngine
from llm_engine.model_config import ModelConfig
from llm_engine.parallel import RandomCheckpoint
from llm_engine.parallel.runner import prompt_logits
from llm_engine.parallel.sharding import ShardedCheckpoint, check_shardable, padded_vocab, shard_config
from llm_engine.sampling_params import SamplingParams

GLM4 = ModelConfig(family="glm4", vocab_size=251, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, partial_rotary_factor=0.5, rope_interleaved=True,
                   attention_bias=True, post_branch_norms=True, max_position_embeddings=256)
# Llama: one KV head (replicated on both ranks), tied embeddings (vocab-parallel on both ends), o_proj bias (added
# once), NeoX rotary (rows permuted per shard), an odd vocabulary (padded to 252).
LLAMA = ModelConfig(family="llama", vocab_size=251, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=1, head_dim=12, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=True,
                    o_proj_bias=True, max_position_embeddings=256)


def test_shardable_shapes_are_checked():
    check_shardable(GLM4, 2)
    check_shardable(LLAMA, 4)  # 4 ranks share the one KV head
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_shardable(GLM4, 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_shardable(ModelConfig(family="llama", vocab_size=8, hidden_size=48, intermediate_size=48, num_layers=1,
                                    num_heads=6, num_kv_heads=3, head_dim=8), 2)
    with pytest.raises(ValueError, match="intermediate_size"):
        check_shardable(ModelConfig(family="llama", vocab_size=8, hidden_size=16, intermediate_size=30, num_layers=1,
                                    num_heads=4, num_kv_heads=4, head_dim=4), 4)
    s = shard_config(GLM4, 2)
    assert (s.num_heads, s.num_kv_heads, s.intermediate_size, s.vocab_size) == (2, 1, 48, 126)
    assert padded_vocab(251, 2) == 252 and padded_vocab(252, 4) == 252


@pytest.mark.parametrize("cfg, tp", [(GLM4, 2), (LLAMA, 2), (LLAMA, 4)], ids=["glm4-tp2", "llama-tp2", "llama-tp4"])
def test_rank_slices_reassemble_the_full_tensors(cfg, tp):
    full = dict(RandomCheckpoint(cfg, seed=1).tensors("cpu", torch.float32))
    shards = [dict(ShardedCheckpoint(full.items(), cfg, r, tp).items()) for r in range(tp)]
    d, kv_rep = cfg.head_dim, max(1, tp // cfg.num_kv_heads)
    for name, t in full.items():
        parts = [s[name] for s in shards]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # vocabulary rows, zero-padded
            cat = torch.cat(parts)
            assert torch.equal(cat[:cfg.vocab_size], t) and not cat[cfg.vocab_size:].any()
        elif ".k_proj." in name or ".v_proj." in name:  # KV heads; replicated when fewer than ranks
            uniq = torch.cat(parts[::kv_rep])
            assert torch.equal(uniq, t) and parts[0].shape[0] == max(1, cfg.num_kv_heads // tp) * d
        elif ".q_proj." in name or ".gate_proj." in name or ".up_proj." in name:  # column-parallel: rows
            assert torch.equal(torch.cat(parts), t)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: input columns
            assert torch.equal(torch.cat(parts, dim=1), t)
        elif name.endswith("o_proj.bias"):  # added once: rank 0 only
            assert torch.equal(parts[0], t) and all(not p.any() for p in parts[1:])
        else:  # norms: replicated
            assert all(torch.equal(p, t) for p in parts), name


def _engine(cfg: ModelConfig, tp: int, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=RandomCheckpoint(cfg, seed=7, std=0.2), device="cpu", tensor_parallel=tp,
                                  max_num_seqs=4, num_kv_blocks=64, max_model_len=256, enable_prefix_caching=False,
                                  cpu_threads=1, **kw))


def _logits(eng: LLMEngine, ids: list[int]) -> torch.Tensor:
    if eng.tp is not None:
        return eng.tp.call(eng.runner, "llm_engine.parallel.runner:prompt_logits", ids)
    return prompt_logits(eng.runner, ids)


@pytest.mark.parametrize("cfg", [GLM4, LLAMA], ids=["glm4", "llama"])
def test_tp2_engine_matches_the_unsharded_engine(cfg):
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40)), [7] * 17, list(range(200, 251))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    probe = list(range(20, 61))
    ref = _engine(cfg, 1)
    ref_tokens = [t for t, _ in ref.generate(prompts, params)]
    ref_logits = _logits(ref, probe)
    tp = _engine(cfg, 2)
    try:
        assert tp.tp is not None and [p.is_alive() for p in tp.tp.procs] == [True]
        assert tp.model_config.num_heads == cfg.num_heads // 2 and tp.model_config.vocab_size == cfg.vocab_size
        got_tokens = [t for t, _ in tp.generate(prompts, params)]  # prefill (eager steps) + decodes, 4 at once
        got_logits = _logits(tp, probe)
    finally:
        tp.close()
    assert [p.is_alive() for p in tp.tp.procs] == [False]  # the worker stopped with the engine
    assert [p.exitcode for p in tp.tp.procs] == [0]  # by itself, after leaving the group with rank 0 (not killed)
    err = logits_error(ref_logits, got_logits)
    assert got_logits.shape == (len(probe), cfg.vocab_size)
    assert err["max_abs"] < 1e-4 and err["argmax_equal"] == 1.0, err  # float32: only the summation order differs
    for p, a, b in zip(prompts, ref_tokens, got_tokens, strict=True):
        ok, why = greedy_agrees(p, a, b, lambda ids: prompt_logits(ref.runner, ids)[-1], tie_gap=1e-3)
        assert ok, why


def test_tensor_parallel_needs_a_model_source_not_a_built_model():
    from llm_engine.models import build_model

    with pytest.raises(ValueError, match="every rank loads its own shard"):
        LLMEngine(EngineConfig(device="cpu", tensor_parallel=2), model=build_model(GLM4))
    with pytest.raises(ValueError, match="tensor_parallel must be an int"):
        EngineConfig(tensor_parallel=0)


def test_serve_flag_reaches_the_engine_config():
    from voicefast.loader import engine_config
    from voicefast.serve import config_from

    assert config_from(["--tensor-parallel", "2"]).tensor_parallel == 2
    assert config_from([], {"VOICEFAST_TENSOR_PARALLEL": "2"}).tensor_parallel == 2
    with pytest.raises(ValueError, match="tensor_parallel"):
        config_from(["--tensor-parallel", "0"])
    assert engine_config(config_from(["--tensor-parallel", "2"])).tensor_parallel == 2


def test_async_engine_with_tp2_serves_and_its_shutdown_stops_the_worker():
    import asyncio

    from llm_engine.async_engine import AsyncLLMEngine

    cfg = EngineConfig(model=RandomCheckpoint(GLM4, seed=7, std=0.2), device="cpu", tensor_parallel=2, max_num_seqs=4,
                       num_kv_blocks=64, max_model_len=256, cpu_threads=1)
    ref = _engine(GLM4, 1)
    want = [t for t, _ in ref.generate([[3, 1, 4, 1, 5]], SamplingParams(temperature=0.0, max_tokens=8,
                                                                          ignore_eos=True))][0]
    aeng = AsyncLLMEngine(cfg)  # the engine (and its TP worker) is built on the engine thread, as in the server
    procs = aeng.engine.tp.procs

    async def two_at_once():
        async def one():
            toks = []
            async for out in aeng.generate(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                                           prompt_token_ids=[3, 1, 4, 1, 5]):
                toks += out.token_ids
            return toks
        return await asyncio.gather(one(), one())

    try:
        got = asyncio.run(two_at_once())
    finally:
        aeng.shutdown()
    assert got == [want, want]
    assert not any(p.is_alive() for p in procs)


def test_tp2_masks_a_constrained_request_on_rank_0_beside_a_speculating_one():
    """The grammar mask runs on rank 0 only, on the gathered logits (the worker never sees it): a constrained
    request validates and matches TP=1, a free request in the same batches speculates and matches TP=1."""
    import json

    import jsonschema

    from bench.synthetic_tokenizer import build_byte_bpe
    from llm_engine.tokenizer import Tokenizer

    tk = build_byte_bpe(512, specials=("<|eos|>",))
    tok = Tokenizer(tk, eos_token_ids=[tk.token_to_id("<|eos|>")])
    cfg = ModelConfig(family="llama", vocab_size=520, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12, max_position_embeddings=256)
    schema = {"type": "object", "properties": {"size": {"type": "string", "enum": ["small", "large"]},
                                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["size", "qty"], "additionalProperties": False}
    prompts = [[300, 12] * 6, [5, 9, 200, 31]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=60, json_schema=schema)]
    got = {}
    for tp in (1, 2):
        eng = _engine(cfg, tp, speculative_tokens=4)
        eng.tokenizer, eng.eos_token_ids = tok, frozenset(tok.eos_token_ids)  # RandomCheckpoint has none
        try:
            got[tp] = eng.generate(prompts, params)
            if tp == 1:
                ref = eng
        finally:
            if tp == 2:
                eng.close()
    (free1, _), (con1, _) = got[1]
    (free2, res_free2), (con2, res_con2) = got[2]
    ok, why = greedy_agrees(prompts[0], free1, free2, lambda ids: prompt_logits(ref.runner, ids)[-1], tie_gap=1e-3)
    assert ok, why
    assert res_free2.draft_tokens > 0 and res_con2.draft_tokens == 0
    assert res_con2.finish_reason == "stop" and con2 == con1
    jsonschema.validate(json.loads(res_con2.text), schema)
