"""bench/gpu_voice/random_llm.py at a tiny GLM-4 shape: the checkpoint directory loads through the real paths
(llm_engine's HF loader, Tokenizer.from_path with the chat template, voicefast's asset resolver) and generates."""

from __future__ import annotations

import json

import pytest

from bench.gpu_voice import random_llm

TINY = random_llm.glm4_config(vocab_size=1200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4_random")
    marker = random_llm.write_checkpoint(d, TINY, device="cpu", shard_bytes=60_000, n_lines=300)
    return d, marker


def test_tokenizer_has_the_vocab_size_and_glm4_special_ids():
    tk = random_llm.synthetic_tokenizer(1200, n_lines=300)
    assert tk.get_vocab_size() == 1200
    first = 1200 - 223
    assert [tk.token_to_id(s) for s in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>")] == \
        [first, first + 2, first + 4, first + 7, first + 8]
    text = "What time do you open on Saturday? Bakomi tunelo."
    assert tk.decode(tk.encode(text).ids) == text  # byte-level: any text round-trips


def test_full_size_special_ids_match_glm4():
    names = random_llm.special_tokens(151552)
    ids = {n: 151552 - 223 + i for i, n in enumerate(names)}
    assert len(names) == 223 and ids["<|endoftext|>"] == 151329 and ids["[gMASK]"] == 151331
    assert (ids["<sop>"], ids["<|system|>"], ids["<|user|>"], ids["<|assistant|>"], ids["<|observation|>"]) == \
        (151333, 151335, 151336, 151337, 151338)
    assert random_llm.GLM4_9B_0414["eos_token_id"] == [151329, 151336, 151338]


def test_checkpoint_loads_and_generates_through_the_real_paths(ckpt):
    from llm_engine import EngineConfig, LLMEngine, SamplingParams
    from llm_engine.tokenizer import Tokenizer
    from voicefast.assets import resolve_llm

    d, marker = ckpt
    assert "noise" in marker["what"] and marker["weight_bytes"] > 0
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((d / s).exists() for s in shards)
    assert resolve_llm(str(d)).path == d.resolve()
    tok = Tokenizer.from_path(d)
    first = 1200 - 223
    assert set(tok.eos_token_ids) == {first, first + 7, first + 9}
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "When do you open?"}])
    assert ids[:2] == [first + 2, first + 4] and ids[-2] == first + 8  # [gMASK]<sop> ... <|assistant|>\n
    eng = LLMEngine(EngineConfig(model=str(d), device="cpu", num_kv_blocks=64, max_num_seqs=2))
    assert eng.model_config.family == "glm4" and eng.model_config.vocab_size == 1200
    out, res = eng.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(out) == 12 and res.finish_reason == "length" and isinstance(res.text, str)


def test_ensure_checkpoint_reuses_a_matching_one(ckpt, monkeypatch):
    d, marker = ckpt
    monkeypatch.setattr(random_llm, "write_checkpoint", lambda *a, **k: pytest.fail("rewrote the checkpoint"))
    assert random_llm.ensure_checkpoint(d, TINY, device="cpu")["reused"] is True
