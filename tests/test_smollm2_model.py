"""The embedded SmolLM2-135M-Instruct Q4_1 GGUF end to end on our model (no engine): config from GGUF metadata,
the dequantized-weights cache, and a greedy customer-service answer checked against golden token ids."""

from __future__ import annotations

import pytest
import torch

from llm_engine import gguf_loader
from llm_engine.attn_metadata import AttnMetadata
from llm_engine.layers.linear import use_half_gemv
from llm_engine.loader import load_checkpoint
from llm_engine.models import build_model, load_weights
from llm_engine.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You are a friendly customer service assistant for Green Leaf Grocery. "
                                  "The store is open every day from 8 am to 9 pm."},
    {"role": "user", "content": "Hi! When does the store open?"},
]
# Greedy, float32. Text:
# "The store is open every day from 8 am to 9 pm, Monday through Friday. I'm happy to accommodate"
GOLDEN = [504, 4249, 314, 1440, 897, 1194, 429, 216, 40, 744, 288, 216, 41, 17538, 28, 12397, 738, 11655, 30, 339,
          5248, 5587, 288, 12946]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(cfg, state dict, tokenizer, cache dir, second-load result) with the cache in a fresh directory."""
    from voicefast.assets import resolve_llm

    path = resolve_llm().path
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("vf-cache")
        mp.setenv("VOICEFAST_CACHE_DIR", str(cache))
        assert not gguf_loader.cache_dir_for(path).exists()
        cfg, state = load_checkpoint(path)  # parses + dequantizes, writes the cache
        d = gguf_loader.cache_dir_for(path)
        assert d.is_relative_to(cache)

        def no_parse(_path):
            raise AssertionError("GGUF parsed again despite a valid cache")

        mp.setattr(gguf_loader, "read_gguf", no_parse)
        second = load_checkpoint(path)
        tok = Tokenizer.from_path(path, cfg.eos_token_ids)
    return cfg, state, tok, d, second


@pytest.fixture
def one_thread():
    """Decode with one intra-op thread: on a shared 2-core box, 2 OpenMP threads stall on each other (10x slower)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "half-gemv"])
def model(loaded, request):
    """Plain float32, and float32 with fp16 decode GEMVs (what load_model gives on CPU by default)."""
    cfg, state, *_ = loaded
    m = build_model(cfg, "cpu", torch.float32)
    load_weights(m, state)
    if request.param:
        use_half_gemv(m)
    return m


def test_config_from_gguf_metadata(loaded):
    cfg = loaded[0]
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.head_dim, cfg.intermediate_size) == (49152, 64, 1536)
    assert cfg.tie_word_embeddings and cfg.rope_interleaved and cfg.rot_dim == 64
    assert cfg.rope_theta == 100000.0 and 2 in cfg.eos_token_ids


def test_dequant_cache_is_written_and_reused(loaded):
    cfg, state, _tok, d, (cfg2, state2) = loaded
    assert (d / "model.safetensors").stat().st_size > 100_000_000 and (d / "model_config.json").exists()
    assert cfg2 == cfg and state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)


def greedy(model, cfg, prompt: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    """Prefill then one token per step through a contiguous paged cache (block 16)."""
    block, nblocks = 16, 8
    kv = [(torch.zeros(nblocks, block, cfg.num_kv_heads, cfg.head_dim),
           torch.zeros(nblocks, block, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
    table = torch.arange(nblocks, dtype=torch.int32)[None]  # [1, nblocks]
    out: list[int] = []
    cur, pos = prompt, 0
    with torch.inference_mode():
        for _ in range(n):
            q, s = len(cur), pos + len(cur)
            meta = AttnMetadata(query_start_loc=torch.tensor([0, q], dtype=torch.int32),
                                seq_lens=torch.tensor([s], dtype=torch.int32), block_tables=table,
                                slot_mapping=torch.arange(pos, s), max_query_len=q, max_seq_len=s,
                                is_decode=q == 1, query_lens_cpu=[q], seq_lens_cpu=[s])
            hidden = model(torch.tensor(cur), torch.arange(pos, s), kv, meta)  # [q, H]
            nxt = int(model.compute_logits(hidden[-1:]).argmax(-1))
            out.append(nxt)
            if nxt in eos:
                break
            cur, pos = [nxt], s
    return out


def test_greedy_customer_service_answer_is_golden_and_coherent(loaded, model, one_thread):
    cfg, _state, tok, *_ = loaded
    prompt = tok.apply_chat_template(MESSAGES)
    assert tok.decode(prompt[:3], skip_special_tokens=False).startswith("<|im_start|>system")
    out = greedy(model, cfg, prompt, len(GOLDEN), tok.eos_token_ids)
    text = tok.decode(out)
    assert "8 am" in text and "open" in text, text
    assert out == GOLDEN, text
