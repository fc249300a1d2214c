"""Constrained decoding (llm_engine.grammar): the bitmask, the masked sampler, and the engine with constrained and
free requests in one batch, lazy triggers, own budgets and aborts — on a tiny random model with a small byte-level
BPE tokenizer (fast), and on the embedded SmolLM2 (slow)."""

import json
import random
import types

import jsonschema
import pytest
import torch

from bench.synthetic_tokenizer import build_byte_bpe
from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.grammar import Grammar, GrammarCompiler
from llm_engine.grammar_mask import apply_bitmask
from llm_engine.model_config import ModelConfig
from llm_engine.models import build_model
from llm_engine.models.weights import init_random_weights
from llm_engine.sampler import sample
from llm_engine.tokenizer import Tokenizer

VOCAB = 520  # tokenizer 512 tokens (256 bytes + merges + specials); logits padded to 520 like real checkpoints
SCHEMA = {"type": "object", "properties": {
    "size": {"type": "string", "enum": ["small", "medium", "large"]},
    "qty": {"type": "integer", "minimum": 1, "maximum": 20},
    "gift": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "blue"]}, "maxItems": 3}},
    "required": ["size", "qty", "gift"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    tk = build_byte_bpe(512, specials=("<|eos|>", "<|pad|>"))
    return Tokenizer(tk, eos_token_ids=[tk.token_to_id("<|eos|>")])


@pytest.fixture(scope="module")
def tiny_model():
    torch.set_num_threads(2)
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    return init_random_weights(build_model(cfg), seed=0, std=0.5)


def engine(model, tok, **kw):
    base = dict(device="cpu", num_kv_blocks=128, kv_block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    return LLMEngine(EngineConfig(**(base | kw)), model=model, tokenizer=tok)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


# ---------------------------------------------------------------- the mask and the sampler

def test_apply_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 70, generator=g)
    mask = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int64).to(torch.int32)  # [2, 96 bits]
    out = logits.clone()
    apply_bitmask(out, [1, 3], mask)
    for r, row in ((1, 0), (3, 1)):
        for t in range(70):
            allowed = (int(mask[row, t // 32]) >> (t % 32)) & 1
            assert out[r, t] == (logits[r, t] if allowed else float("-inf"))
    for r in (0, 2, 4):
        assert torch.equal(out[r], logits[r])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_masked_sampler_equals_unmasked_whenever_the_mask_allows_its_token(temperature):
    V, B = 300, 6
    same = differ = 0
    for trial in range(40):
        g = torch.Generator().manual_seed(trial)
        logits = torch.randn(B, V, generator=g) * 3
        mask = torch.randint(-2**31, 2**31 - 1, (B, (V + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
        temp = torch.full((B,), temperature)
        args = (torch.zeros(B, dtype=torch.int64), torch.ones(B))
        free = sample(logits, temp, *args, [torch.Generator().manual_seed(100 + trial)] * 1 + [None] * (B - 1),
                      torch.Generator().manual_seed(7), all_greedy=temperature == 0, any_top_k=False, any_top_p=False)
        masked_logits = logits.clone()
        apply_bitmask(masked_logits, list(range(B)), mask)
        masked = sample(masked_logits, temp, *args, [torch.Generator().manual_seed(100 + trial)] + [None] * (B - 1),
                        torch.Generator().manual_seed(7), all_greedy=temperature == 0, any_top_k=False,
                        any_top_p=False)
        def ok(b, t, mask=mask):
            return (int(mask[b, t // 32]) >> (t % 32)) & 1

        for b in range(B):
            assert ok(b, int(masked[b])), "the masked sampler drew a disallowed token"
            if ok(b, int(free[b])):
                assert masked[b] == free[b]
                same += 1
            else:
                differ += 1
    assert same > 50 and differ > 50  # both branches exercised


# ---------------------------------------------------------------- the engine

def test_constrained_and_free_requests_in_one_batch(tiny_model, tok):
    ps = prompts(6)
    free = SamplingParams(max_tokens=16, ignore_eos=True)
    con = SamplingParams(max_tokens=120, json_schema=SCHEMA)
    con_hot = SamplingParams(max_tokens=120, temperature=1.0, seed=5, json_schema=json.dumps(SCHEMA))
    eng = engine(tiny_model, tok)
    alone = [eng.generate([p], [sp])[0] for p, sp in zip(ps, [free, con, con_hot] * 2, strict=True)]
    mixed = eng.generate(ps, [free, con, con_hot] * 2)
    assert [ids for ids, _ in mixed] == [ids for ids, _ in alone]  # a mask never leaks into another row
    for i, (_, res) in enumerate(mixed):
        if i % 3 == 0:
            assert res.completion_tokens == 16
            continue
        assert res.finish_reason == "stop", res
        jsonschema.validate(json.loads(res.text), SCHEMA)
    assert eng.block_manager.num_free_blocks == 128


def test_constrained_request_never_drafts_while_a_free_one_in_its_batch_speculates(tok):
    """Speculative decoding on (4 drafts): a free greedy request on a repeating prompt speculates (drafts verified
    in the same steps as the constrained row is masked) and still decodes what plain decoding does; the
    constrained request is never drafted, equals its plain-decoding output and validates."""
    from test_spec_decode import assert_same_or_tie

    from llm_engine.grammar_mask import active_rows

    cfg = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    model = init_random_weights(build_model(cfg), seed=1, std=0.1)  # small weights: the model repeats itself
    free = SamplingParams(max_tokens=40, ignore_eos=True)
    con = SamplingParams(max_tokens=120, json_schema=SCHEMA, speculate=True)
    assert con.constrained and con.speculate is False and free.speculate  # constrained => no speculation
    fp, cp = [300, 12] * 6, prompts(1, seed=3)[0]
    plain = engine(model, tok, speculative_tokens=0)
    ref_free, ref_con = plain.generate([fp], [free])[0][0], plain.generate([cp], [con])[0][0]

    eng = engine(model, tok, speculative_tokens=4)
    steps = {"con_drafts": 0, "mixed_verify": 0}
    run = eng.runner.run

    def watched(batch):
        drafted = [s.params.constrained for s, d in zip(batch.seqs, batch.drafts, strict=True) if d]
        steps["con_drafts"] += sum(drafted) + sum(s.spec is not None for s in batch.seqs if s.params.constrained)
        con_rows = [i for i, s in enumerate(batch.seqs) if s.grammar is not None and batch.samples(i)]
        steps["mixed_verify"] += bool(drafted and con_rows)
        return run(batch)

    eng.runner.run = watched
    (got_free, res_free), (got_con, res_con) = eng.generate([fp, cp], [free, con])
    assert steps["con_drafts"] == 0 and steps["mixed_verify"] > 0
    assert res_free.draft_tokens > 0 and res_free.accepted_draft_tokens > 0  # the free one speculated
    assert_same_or_tie(model, fp, ref_free, got_free)
    assert res_con.draft_tokens == 0 and res_con.finish_reason == "stop" and got_con == ref_con
    jsonschema.validate(json.loads(res_con.text), SCHEMA)
    assert eng.block_manager.num_free_blocks == 128

    seq = types.SimpleNamespace(request_id="x", grammar=types.SimpleNamespace(active=True))
    with pytest.raises(RuntimeError, match="speculative drafts"):  # the runner's guard: one grammar state can
        active_rows([seq], [0, 0])  # never mask the rows of a speculative verify


def test_unconstrained_random_model_output_is_not_json(tiny_model, tok):
    """The baseline for the test above: without the mask this model writes no valid instance."""
    eng = engine(tiny_model, tok)
    for _ids, res in eng.generate(prompts(4), SamplingParams(max_tokens=40)):
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(res.text), SCHEMA)


def test_abort_mid_constraint_frees_everything(tiny_model, tok):
    eng = engine(tiny_model, tok)
    long_schema = {"type": "array", "items": {"type": "integer"}, "minItems": 500}
    rid = eng.add_request("c", prompts(1)[0], SamplingParams(max_tokens=400, json_schema=long_schema))
    seq = eng._seqs[rid]
    for _ in range(6):
        eng.step()
    assert seq.grammar is not None and seq.grammar.active
    assert eng.abort(rid)
    outs = eng.step()
    assert [o.result.finish_reason for o in outs if o.finished] == ["abort"]
    assert seq.grammar is None and not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks == 128
    assert all(b.ref_count == 0 for b in eng.block_manager.blocks)


def test_forced_grammar_budget_runs_out_with_length(tiny_model, tok):
    eng = engine(tiny_model, tok)
    g = Grammar(json_schema={"type": "string", "minLength": 200}, max_tokens=7)
    (ids, res), = eng.generate(prompts(1), [SamplingParams(max_tokens=3, grammar=g)])
    assert res.finish_reason == "length" and res.completion_tokens == 7  # its own budget, not max_tokens
    assert res.text.startswith('"')


def test_lazy_grammar_starts_at_its_trigger(tok):
    comp = GrammarCompiler(tok, VOCAB, tok.eos_token_ids)
    g = Grammar(lark='start: "<call>" %json {"type": "object", "properties": {"n": {"type": "integer"}}, '
                     '"required": ["n"], "additionalProperties": false} "</call>"', triggers=("<call>",))
    st = comp.new_state(g)
    assert not st.active
    ids = tok.encode('Let me look. <call>{"n"')
    activated = [st.accept(t, i + 1) for i, t in enumerate(ids)]
    assert activated.count(True) == 1 and st.active and st.activated_at is not None
    for t in tok.encode(': 12}</call>'):
        assert st.active
        st.accept(t, 0)
    assert st.done and st.error is None
    st = comp.new_state(g)  # the free token completing the trigger also carried a space the grammar does not allow
    st._start(b'<call> {"n"', 3, b"<call>")
    assert st.active and st.error is None
    for t in tok.encode(': 3}</call>'):
        st.accept(t, 4)
    assert st.done and st.error is None


def test_invalid_grammars_are_rejected_at_submission(tiny_model, tok):
    eng = engine(tiny_model, tok)
    with pytest.raises(ValueError, match="grammar"):
        eng.add_request(None, [1, 2], SamplingParams(grammar=Grammar(lark="start: undefined_rule")))
    with pytest.raises(ValueError, match="json_schema"):
        eng.add_request(None, [1, 2], SamplingParams(json_schema="{not json"))
    with pytest.raises(ValueError):
        eng.add_request(None, [1, 2], SamplingParams(json_schema={"type": "integer", "minimum": 5, "maximum": 1}))
    with pytest.raises(ValueError):
        SamplingParams(json_schema={"type": "object"}, grammar=Grammar(lark='start: "a"'))
    assert not eng.has_unfinished()


# ---------------------------------------------------------------- the embedded model

@pytest.mark.slow
def test_smollm2_constrained_json_is_valid_where_free_decoding_is_not():
    eng = LLMEngine(EngineConfig(max_num_seqs=4, kv_cache_memory_mib=64))
    p = eng.tokenizer.apply_chat_template([{"role": "user", "content": "Order two large shirts, as JSON."}])
    (_, free), (_, con) = eng.generate([p, p], [SamplingParams(max_tokens=40),
                                                SamplingParams(max_tokens=60, json_schema=SCHEMA)])
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(free.text), SCHEMA)
    assert con.finish_reason == "stop"
    jsonschema.validate(json.loads(con.text), SCHEMA)
