"""Logits parity of llm_engine's decoder against transformers' reference classes (LlamaForCausalLM,
GlmForCausalLM, Glm4ForCausalLM) on small random float32 configs, run through the paged KV cache:
scattered blocks, prompts crossing block boundaries, chunked prefill, mixed prefill+decode steps and
batched decode. Tolerance: max |logit diff| <= 1e-4 in float32 (logits here are O(1)).

Inputs are fresh each run (seed from os.urandom, printed on failure)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from llm_engine import ops
from llm_engine.attn_metadata import AttnMetadata
from llm_engine.model_config import ModelConfig
from llm_engine.models import build_model, init_random_weights, load_weights

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BLOCK = 4  # tokens per KV block: small, so prompts cross several block boundaries
VOCAB = 128

CASES = {
    # name: (arch, heads, kv_heads, partial_rotary_factor, attention_bias, tied)
    "llama-mha-tied": ("LlamaForCausalLM", 4, 4, 1.0, False, True),
    "llama-gqa2": ("LlamaForCausalLM", 4, 2, 1.0, False, False),
    "llama-gqa8-bias": ("LlamaForCausalLM", 8, 1, 1.0, True, False),
    "glm-partial0.5-bias-gqa2": ("GlmForCausalLM", 4, 2, 0.5, True, False),
    "glm-edge-full-rotary-tied": ("GlmForCausalLM", 4, 1, 1.0, False, True),
    "glm4-partial0.5-bias-gqa8": ("Glm4ForCausalLM", 8, 1, 0.5, True, False),
    "glm4-full-rotary-mha": ("Glm4ForCausalLM", 4, 4, 1.0, False, True),
}


def hf_model(arch: str, heads: int, kv_heads: int, factor: float, bias: bool, tied: bool, seed: int):
    """A small random transformers model with its norms and biases perturbed (HF init leaves them trivial)."""
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "GlmForCausalLM": transformers.GlmConfig,
                  "Glm4ForCausalLM": transformers.Glm4Config}[arch]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64, attention_bias=bias,
              tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=[2, 3], rms_norm_eps=1e-5)
    if arch == "LlamaForCausalLM":
        kw["rope_theta"] = 500.0
    else:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor}
    cfg = config_cls(**kw)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(2.0)  # std 0.04: larger activations make rotary/attention errors visible
    return model


def ours_from_hf(hf) -> tuple:
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    model = build_model(cfg, "cpu", torch.float32)
    load_weights(model, hf.state_dict())
    return model, cfg


class PagedSequences:
    """A tiny stand-in for the scheduler: per-sequence block tables over a shared, scattered block pool."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, gen: torch.Generator, dtype=torch.float32):
        self.kv = [(torch.zeros(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
                    torch.zeros(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=dtype))
                   for _ in range(cfg.num_layers)]
        self.free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous blocks
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step_meta(self, chunks: list[tuple[int, int]]) -> tuple[AttnMetadata, torch.Tensor]:
        """chunks: (seq_id, n_new_tokens) in batch order -> (metadata, positions [T])."""
        q_lens, s_lens, slots, positions = [], [], [], []
        for sid, n in chunks:
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < start + n:
                table.append(self.free.pop())
            for p in range(start, start + n):
                slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
                positions.append(p)
            self.lens[sid] = start + n
            q_lens.append(n)
            s_lens.append(start + n)
        width = max(len(self.tables[sid]) for sid, _ in chunks)
        tables = torch.tensor([self.tables[sid] + [0] * (width - len(self.tables[sid])) for sid, _ in chunks],
                              dtype=torch.int32)  # [B, max_blocks]
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)  # [B+1]
        meta = AttnMetadata(query_start_loc=qsl, seq_lens=torch.tensor(s_lens, dtype=torch.int32),
                            block_tables=tables, slot_mapping=torch.tensor(slots, dtype=torch.int64),
                            max_query_len=max(q_lens), max_seq_len=max(s_lens), is_decode=all(q == 1 for q in q_lens),
                            query_lens_cpu=q_lens, seq_lens_cpu=s_lens)
        return meta, torch.tensor(positions, dtype=torch.int64)


def run_steps(model, cfg, steps, tokens: dict[int, torch.Tensor], gen) -> dict[int, list[torch.Tensor]]:
    """Run `steps` (lists of (seq_id, n_new)) through our model; return each sequence's logits rows in order."""
    paged = PagedSequences(cfg, num_blocks=32, gen=gen)
    got: dict[int, list[torch.Tensor]] = {sid: [] for sid in tokens}
    for chunks in steps:
        meta, positions = paged.step_meta(chunks)
        ids = torch.cat([tokens[sid][positions[int(meta.query_start_loc[i])]:][:n]
                         for i, (sid, n) in enumerate(chunks)])  # [T]
        with torch.no_grad():
            logits = model.compute_logits(model(ids, positions, paged.kv, meta))  # [T, V]
        for i, (sid, _) in enumerate(chunks):
            got[sid].extend(logits[int(meta.query_start_loc[i]):int(meta.query_start_loc[i + 1])])
    return got


@pytest.fixture
def seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("case", list(CASES))
def test_batched_chunked_prefill_and_decode_match_transformers(case: str, seed: int):
    hf = hf_model(*CASES[case], seed=seed)
    model, cfg = ours_from_hf(hf)
    gen = torch.Generator().manual_seed(seed)
    # seq 0: 11-token prompt + 4 decodes; seq 1: 7-token prompt chunked 4 + 3, then 3 decodes.
    tokens = {0: torch.randint(0, VOCAB, (15,), generator=gen), 1: torch.randint(0, VOCAB, (10,), generator=gen)}
    steps = [
        [(0, 11), (1, 4)],  # prefill + first chunk of another prompt
        [(1, 3), (0, 1)],  # the chunk's rest over its cached prefix, batched with a decode
        [(0, 1), (1, 1)],  # batched decode (is_decode fast path, B=2, masked)
        [(0, 1), (1, 1)],
        [(0, 1), (1, 1)],
    ]
    got = run_steps(model, cfg, steps, tokens, gen)
    for sid, toks in tokens.items():
        with torch.no_grad():
            ref = hf(toks[None]).logits[0]  # [L, V]
        ours = torch.stack(got[sid])
        diff = (ours - ref[:len(ours)]).abs().max().item()
        assert diff <= ATOL, f"{case} seq {sid}: max |diff| {diff:.2e} > {ATOL} (seed {seed})"


@pytest.mark.parametrize("case", ["llama-gqa2", "glm-partial0.5-bias-gqa2", "glm4-partial0.5-bias-gqa8"])
def test_single_sequence_chunked_prefill_then_decode(case: str, seed: int):
    hf = hf_model(*CASES[case], seed=seed)
    model, cfg = ours_from_hf(hf)
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, VOCAB, (17,), generator=gen)
    steps = [[(0, 6)], [(0, 7)], *[[(0, 1)] for _ in range(4)]]  # 6 + 7 prompt tokens, 4 decodes (B=1 path)
    got = torch.stack(run_steps(model, cfg, steps, {0: toks}, gen)[0])
    with torch.no_grad():
        ref = hf(toks[None]).logits[0]
    diff = (got - ref).abs().max().item()
    assert diff <= ATOL, f"{case}: max |diff| {diff:.2e} (seed {seed})"


def test_glm4_post_branch_norms_matter(seed: int):
    """Guard against a vacuous pass: dropping GLM-4's post-branch norms must change the logits."""
    hf = hf_model(*CASES["glm4-partial0.5-bias-gqa8"], seed=seed)
    model, cfg = ours_from_hf(hf)
    for layer in model.model.layers:
        layer.post_branch_norms = False
    toks = torch.randint(0, VOCAB, (9,))
    got = torch.stack(run_steps(model, cfg, [[(0, 9)]], {0: toks}, torch.Generator().manual_seed(seed))[0])
    with torch.no_grad():
        ref = hf(toks[None]).logits[0]
    assert (got - ref).abs().max().item() > 1e-2


# ---------------------------------------------------------------- ops against their reference formulas

def test_rotary_store_kv_matches_reference_and_skips_negative_slots(seed: int):
    gen = torch.Generator().manual_seed(seed)
    from llm_engine.layers.rotary import build_cos_sin

    T, Hq, Hkv, D = 5, 4, 2, 16
    cases = [(rot, inter, fused) for rot in (16, 8) for inter in (True, False) for fused in (True, False)]
    for rot_dim, interleaved, fused in cases:
        cos_sin = build_cos_sin(rot_dim, 32, 10000.0)
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen)
        q = qkv[:, :Hq * D].view(T, Hq, D)  # fused: q, k, v are neighbouring views of one qkv row
        k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        if not fused:
            q, k, v = q.clone(), k.clone(), v.clone()
        positions = torch.randint(0, 32, (T,), generator=gen)
        q_ref = ops.reference_rotary(q, positions, cos_sin, rot_dim, interleaved)
        k_ref = ops.reference_rotary(k, positions, cos_sin, rot_dim, interleaved)
        v_ref = v.clone()
        kc, vc = torch.zeros(3, 4, Hkv, D), torch.zeros(3, 4, Hkv, D)
        slots = torch.tensor([5, -1, 0, 11, 7])
        q2, k2 = ops.rotary_store_kv(q, k, v, positions, cos_sin, rot_dim, interleaved, kc, vc, slots)
        torch.testing.assert_close(q2, q_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k2, k_ref, atol=1e-5, rtol=1e-5)
        flat_k, flat_v = kc.view(-1, Hkv, D), vc.view(-1, Hkv, D)
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                torch.testing.assert_close(flat_k[s], k_ref[t], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(flat_v[s], v_ref[t])
        assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == 4  # the -1 slot wrote nothing


def test_paged_attention_matches_reference(seed: int):
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1,
                      num_heads=6, num_kv_heads=2, head_dim=8)
    paged = PagedSequences(cfg, num_blocks=24, gen=gen)
    for k, v in paged.kv:
        k.normal_(generator=gen)
        v.normal_(generator=gen)
    k_cache, v_cache = paged.kv[0]
    paged.step_meta([(0, 9), (1, 3), (2, 1)])  # existing context
    for chunks in ([(0, 5), (1, 1), (2, 7)], [(0, 1), (1, 1), (2, 1)], [(2, 1)]):
        meta, _ = paged.step_meta(chunks)
        q = torch.randn(int(meta.query_start_loc[-1]), 6, 8, generator=gen)
        out = ops.paged_attention(q, k_cache, v_cache, meta, 8 ** -0.5)
        ref = ops.reference_paged_attention(q, k_cache, v_cache, meta, 8 ** -0.5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_norms_and_silu_and_mul_match_formulas(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x, r, w = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen), torch.randn(32, generator=gen)
    normed, new_r = ops.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(new_r, x + r)
    torch.testing.assert_close(normed, ops.reference_rms_norm(x + r, w, 1e-6), atol=1e-5, rtol=1e-5)
    normed0, r0 = ops.add_rms_norm(x, None, w, 1e-6)
    torch.testing.assert_close(r0, x)
    torch.testing.assert_close(normed0, ops.reference_rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    gu = torch.randn(3, 16, generator=gen)
    torch.testing.assert_close(ops.silu_and_mul(gu), torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:])


def test_random_init_keeps_activations_sane():
    cfg = ModelConfig(family="glm4", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=8,
                      num_heads=4, num_kv_heads=2, head_dim=16, partial_rotary_factor=0.5, attention_bias=True,
                      post_branch_norms=True, rope_interleaved=True, max_position_embeddings=64)
    model = init_random_weights(build_model(cfg), seed=3)
    paged = PagedSequences(cfg, num_blocks=8, gen=torch.Generator().manual_seed(0))
    meta, pos = paged.step_meta([(0, 12)])
    with torch.no_grad():
        logits = model.compute_logits(model(torch.arange(12), pos, paged.kv, meta))
    assert logits.dtype == torch.float32 and logits.shape == (12, 256)
    assert torch.isfinite(logits).all() and logits.abs().max() < 50


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
])
def test_llama_rope_scaling_matches_transformers(rope, seed: int):
    hf = hf_model(*CASES["llama-gqa2"], seed=seed)
    hf.config.rope_parameters = rope
    hf = type(hf)(hf.config).eval()  # rebuild so the rotary module reads the scaled config
    model, cfg = ours_from_hf(hf)
    assert cfg.rope_scaling["rope_type"] == rope["rope_type"]
    toks = torch.randint(0, VOCAB, (20,))
    got = torch.stack(run_steps(model, cfg, [[(0, 14)], [(0, 6)]], {0: toks}, torch.Generator().manual_seed(seed))[0])
    with torch.no_grad():
        ref = hf(toks[None]).logits[0]
    assert (got - ref).abs().max().item() <= ATOL, f"seed {seed}"
    unscaled = build_model(dataclasses.replace(cfg, rope_scaling=None))
    load_weights(unscaled, hf.state_dict())
    plain = torch.stack(run_steps(unscaled, cfg, [[(0, 20)]], {0: toks}, torch.Generator().manual_seed(seed))[0])
    assert (plain - ref).abs().max().item() > 1e-3  # the scaling really changed something


def test_half_gemv_swap_keeps_prefill_fp32_and_decode_close(seed: int):
    from llm_engine.layers.linear import HalfGemvLinear, use_half_gemv

    hf = hf_model(*CASES["glm-edge-full-rotary-tied"], seed=seed)  # tied lm_head, GQA 4
    model, cfg = ours_from_hf(hf)
    toks = torch.randint(0, VOCAB, (14,))
    steps = [[(0, 10)], [(0, 1)], [(0, 1)], [(0, 1)], [(0, 1)]]
    plain = torch.stack(run_steps(model, cfg, steps, {0: toks}, torch.Generator().manual_seed(seed))[0])
    use_half_gemv(model)
    swapped = [m for m in model.modules() if isinstance(m, HalfGemvLinear)]
    assert len(swapped) == 2 * cfg.num_layers * 2 + 1  # qkv, o, gate_up, down per layer + lm_head
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    half = torch.stack(run_steps(model, cfg, steps, {0: toks}, torch.Generator().manual_seed(seed))[0])
    # 10-row prefill: fp32 weights through oneDNN, equal to F.linear up to summation order
    torch.testing.assert_close(half[:10], plain[:10], rtol=1e-5, atol=1e-5)
    diff = (half[10:] - plain[10:]).abs().max().item()
    assert 0 < diff < 2e-2, f"decode rows via fp16 weights differ by {diff} (seed {seed})"
