"""`voicefast bench spec`: speculative (prompt-lookup) decoding on customer-service conversations with the
embedded model on the CPU, every mode in the same process, interleaved turn by turn.

Each conversation is the built-in persona (business facts, prices, hours) plus three customer turns whose answers
repeat names, numbers and phrases from the persona and from earlier replies; the history carries the model's
own earlier replies (from plain greedy decoding). Every turn runs:
  plain      speculation off (the reference)
  spec       speculation on, as shipped (greedy, and sampled at the server's default temperature 0.3)
  wrong      drafts that are never right (random token ids) with the shipped back-off: the cost when nothing
             is accepted
  wrong-raw  the same without back-off and with full-length drafts every step: the raw cost of a verify
Reported: per-stream decode tok/s (tokens after the first output / time after the first output) and ratios to
plain, acceptance (accepted / drafted drafts), tokens per decode step, greedy equality with plain (ties of top-2
gap < 1e-2 excused), and a per-step trace [(drafted, accepted), ...] of the greedy spec run that
bench/spec_gpu.py replays on the GPU shapes.

    voicefast bench spec [--repeats 2] [--out DIR]      (or: python -m bench.spec_decode)"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

QUESTIONS = [
    ["What time do you open on Sunday?", "And what is your address?", "Can you repeat the opening hours?"],
    ["How much do the hiking boots cost?", "And the rain jacket?", "What do I pay for the boots and the jacket?"],
    ["Do you charge for shipping?", "How long does delivery take?", "So shipping is free over 50 dollars?"],
    ["What is your phone number?", "And your email address?", "Can you spell the email address again?"],
    ["Can I return an item?", "How many days do I have to return it?", "Do I need the receipt?"],
    ["What does the premium membership cost?", "What discount does it give?", "Is it 29 dollars per month?"],
    ["Where is Maple Street Outfitters?", "Are you open on Saturday?", "What are your hours on Saturday?"],
    ["How much are wool socks?", "Is shipping free if I buy only socks?", "How much would shipping cost then?"],
]
MODES = ("plain", "spec", "wrong", "wrong-raw")


def _policies(engine):
    from llm_engine.spec_decode import SpecPolicy

    vocab = engine.model_config.vocab_size
    k = engine.num_speculative_tokens

    class Tracing(SpecPolicy):
        """The shipped policy, logging (drafted, accepted) per decode step of each request."""
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.trace: dict[str, list[tuple[int, int]]] = {}

        def propose(self, seq, limit):
            d = super().propose(seq, limit)
            if not d and seq.num_completion_tokens > 0:  # a decode step without drafts
                self.trace.setdefault(seq.request_id, []).append((0, 0))
            return d

        def record(self, seq, num_drafted, num_accepted):
            super().record(seq, num_drafted, num_accepted)
            if seq.num_completion_tokens > 0:  # called before the step's tokens are appended: a decode step
                self.trace.setdefault(seq.request_id, []).append((num_drafted, num_accepted))

    class Wrong(SpecPolicy):
        """Drafts of random token ids (accepted with probability ~1/vocab); raw: no back-off, always k drafts."""
        def __init__(self, raw: bool):
            super().__init__(k, max_backoff_steps=1 if raw else 16)
            self.raw = raw
            self.rng = random.Random(0)

        def propose(self, seq, limit):
            if limit <= 0 or not seq.params.speculate:
                return []
            st = self.state(seq)
            if st.skip > 0:
                st.skip -= 1
                return []
            n = min(limit, k if self.raw else st.max_next)
            return [self.rng.randrange(vocab) for _ in range(n)]

    return {"spec": Tracing(k, engine.config.speculative_ngram_min, engine.config.speculative_ngram_max),
            "wrong": Wrong(False), "wrong-raw": Wrong(True)}


def run_turn(engine, policy, prompt: list[int], params) -> dict:
    """One request alone; per-step output times -> decode rate after the first output."""
    engine.spec = engine.scheduler.spec = policy
    rid = engine.add_request(None, prompt, params)
    t0 = time.perf_counter()
    marks: list[tuple[float, int]] = []
    toks: list[int] = []
    result = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids:
                marks.append((time.perf_counter(), len(out.token_ids)))
                toks += out.token_ids
            if out.finished:
                result = out.result
    after_first = sum(n for _, n in marks[1:])
    span = marks[-1][0] - marks[0][0] if len(marks) > 1 else 0.0
    return dict(rid=rid, tokens=toks, ttft_s=marks[0][0] - t0, decode_tok_s=after_first / span if span else None,
                decode_s=span, decode_tokens=after_first, steps=len(marks), drafted=result.draft_tokens,
                accepted=result.accepted_draft_tokens)


def decode_gap(engine, tokens: list[int]) -> float:
    """Plain decoding's top-2 logit gap after `tokens`: tokens[:-1] prefilled, the last one run as a 1-row decode
    (the numerics plain decoding had there)."""
    import torch

    from llm_engine.attn_metadata import AttnMetadata
    from llm_engine.kv_cache import allocate_kv_cache

    model, bs, n = engine.model, 16, len(tokens)
    nb = (n + bs - 1) // bs
    kv = allocate_kv_cache(engine.model_config, nb, bs, torch.device("cpu"), engine.dtype)
    table = torch.arange(nb, dtype=torch.int32)[None]
    with torch.inference_mode():
        for lo, hi in ((0, n - 1), (n - 1, n)):
            q = hi - lo
            meta = AttnMetadata(query_start_loc=torch.tensor([0, q], dtype=torch.int32),
                                seq_lens=torch.tensor([hi], dtype=torch.int32), block_tables=table,
                                slot_mapping=torch.arange(lo, hi), max_query_len=q, max_seq_len=hi, is_decode=q == 1,
                                query_lens_cpu=[q], seq_lens_cpu=[hi])
            h = model(torch.tensor(tokens[lo:hi]), torch.arange(lo, hi), kv, meta)
        top2 = model.compute_logits(h[-1:])[0].topk(2).values
    return float(top2[0] - top2[1])


def cached_persona_ttft(engine, turns: int = 12) -> dict:
    """Time to first token with a 300-token system prompt already in the prefix cache and 20 new tokens."""
    from llm_engine import SamplingParams
    from voicefast.persona import DEFAULT_INSTRUCTIONS

    tok = engine.tokenizer
    persona = (tok.encode(DEFAULT_INSTRUCTIONS) * 3)[:300]
    asks = [q for conv in QUESTIONS for q in conv]
    params = SamplingParams(max_tokens=1)
    engine.generate([persona + (tok.encode(asks[0]) * 5)[:20]], params)  # puts the persona in the cache
    ttft, cached = [], []
    for i in range(turns):
        [(_, r)] = engine.generate([persona + (tok.encode(asks[1 + i % (len(asks) - 1)]) * 5)[:20]], params)
        ttft.append(r.ttft_s * 1e3)
        cached.append(r.cached_tokens)
    ttft.sort()
    return dict(ttft_p50_ms=statistics.median(ttft), ttft_max_ms=ttft[-1], cached_tokens=statistics.median(cached),
                turns=turns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicefast bench spec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions of every turn and mode")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=len(QUESTIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=None, help="speculative tokens per step (default: the engine's)")
    ap.add_argument("--out", default=None, help="directory for spec_decode.json")
    ap.add_argument("--trace-only", action="store_true",
                    help="only the greedy spec run of each turn (no timing): writes spec_trace.json, the acceptance "
                         "pattern bench/spec_gpu.py replays (deterministic, so any machine gives the same)")
    args = ap.parse_args(argv)

    import torch

    from llm_engine import EngineConfig, LLMEngine, SamplingParams
    from voicefast.persona import DEFAULT_INSTRUCTIONS

    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", max_num_seqs=4, cpu_threads=args.threads,
                                    kv_cache_memory_mib=128, speculative_tokens=args.k))
    tok = engine.tokenizer
    pols = _policies(engine)
    greedy = SamplingParams(max_tokens=args.max_tokens)
    sampled = SamplingParams(max_tokens=args.max_tokens, temperature=0.3, seed=1)
    plain_params = SamplingParams(max_tokens=args.max_tokens, speculate=False)
    rows: list[dict] = []
    for ci, questions in enumerate(QUESTIONS[:args.conversations]):
        history = [{"role": "system", "content": DEFAULT_INSTRUCTIONS}]
        for ti, q in enumerate(questions):
            history.append({"role": "user", "content": q})
            prompt = tok.apply_chat_template(history, add_generation_prompt=True)
            if args.trace_only:
                r = run_turn(engine, pols["spec"], prompt, greedy)
                rows.append(dict(conversation=ci, turn=ti, prompt_tokens=len(prompt), tokens=len(r["tokens"]),
                                 drafted=r["drafted"],
                                 accepted=r["accepted"], trace=pols["spec"].trace.get(r["rid"], [])))
                history.append({"role": "assistant", "content": tok.decode(r["tokens"])})
                print(f"conv {ci} turn {ti}: {len(r['tokens'])} tok, accepted {r['accepted']}/{r['drafted']}",
                      flush=True)
                continue
            runs: dict[str, list[dict]] = {m: [] for m in (*MODES, "spec-t0.3", "plain-t0.3")}
            for _ in range(args.repeats):  # interleaved: machine noise hits every mode alike
                runs["plain"].append(run_turn(engine, pols["spec"], prompt, plain_params))
                runs["spec"].append(run_turn(engine, pols["spec"], prompt, greedy))
                runs["plain-t0.3"].append(run_turn(engine, pols["spec"], prompt, SamplingParams(
                    max_tokens=args.max_tokens, temperature=0.3, seed=1, speculate=False)))
                runs["spec-t0.3"].append(run_turn(engine, pols["spec"], prompt, sampled))
                runs["wrong"].append(run_turn(engine, pols["wrong"], prompt, greedy))
                runs["wrong-raw"].append(run_turn(engine, pols["wrong-raw"], prompt, greedy))
            plain, spec = runs["plain"][0], runs["spec"][0]
            row = dict(conversation=ci, turn=ti, prompt_tokens=len(prompt), reply=tok.decode(plain["tokens"]),
                       greedy_equal=plain["tokens"] == spec["tokens"], trace=pols["spec"].trace.get(spec["rid"], []))
            if not row["greedy_equal"]:  # where they part, plain decoding must have had a near-tie
                a, b = plain["tokens"], spec["tokens"]
                i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                row["diverged_at"] = i
                row["plain_top2_gap"] = decode_gap(engine, prompt + a[:i])
            for m, rs in runs.items():
                row[m] = dict(decode_tok_s=statistics.median(r["decode_tok_s"] or 0 for r in rs),
                              decode_s=statistics.median(r["decode_s"] for r in rs),
                              decode_tokens=rs[0]["decode_tokens"], steps=rs[0]["steps"],
                              drafted=rs[0]["drafted"], accepted=rs[0]["accepted"],
                              ttft_ms=1e3 * statistics.median(r["ttft_s"] for r in rs))
            rows.append(row)
            history.append({"role": "assistant", "content": row["reply"]})
            print(f"conv {ci} turn {ti}: {len(plain['tokens'])} tok, plain {row['plain']['decode_tok_s']:.1f} "
                  f"spec {row['spec']['decode_tok_s']:.1f} tok/s, accepted {spec['accepted']}/{spec['drafted']}, "
                  f"equal={row['greedy_equal']}", flush=True)

    if args.trace_only:
        drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
        steps = sum(len(r["trace"]) for r in rows)
        report = dict(model=str(engine.config.model_path()), max_tokens=args.max_tokens,
                      speculative_tokens=engine.num_speculative_tokens, acceptance=accepted / max(1, drafted),
                      tokens=sum(r["tokens"] for r in rows), decode_steps=steps, rows=rows)
        print(f"acceptance {accepted}/{drafted} = {report['acceptance']:.2f}; {report['tokens']} tokens in "
              f"{steps} decode steps + {len(rows)} prefills")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "spec_trace.json").write_text(json.dumps(report, indent=1))
        return 0

    def agg(mode: str) -> dict:
        toks = sum(r[mode]["decode_tokens"] for r in rows)
        secs = sum(r[mode]["decode_s"] for r in rows)
        drafted = sum(r[mode]["drafted"] for r in rows)
        accepted = sum(r[mode]["accepted"] for r in rows)
        steps = sum(r[mode]["steps"] for r in rows)
        return dict(decode_tok_s=toks / secs, acceptance=accepted / drafted if drafted else None,
                    tokens_per_step=(toks + len(rows)) / steps, drafted=drafted, accepted=accepted)

    summary = {m: agg(m) for m in rows[0] if isinstance(rows[0][m], dict)}
    for m in summary:
        base = summary["plain-t0.3" if m.endswith("t0.3") else "plain"]["decode_tok_s"]
        summary[m]["speedup_vs_plain"] = summary[m]["decode_tok_s"] / base
    ttft = cached_persona_ttft(engine)
    print(f"TTFT, 300-token persona in the prefix cache + 20 new tokens: p50 {ttft['ttft_p50_ms']:.1f} ms, max "
          f"{ttft['ttft_max_ms']:.1f} ms ({ttft['cached_tokens']:.0f} tokens cached, {ttft['turns']} turns)")
    gaps = [r["plain_top2_gap"] for r in rows if not r["greedy_equal"]]
    report = dict(model=str(engine.config.model_path()), threads=args.threads, repeats=args.repeats,
                  max_tokens=args.max_tokens, speculative_tokens=engine.num_speculative_tokens,
                  greedy_equal_turns=sum(r["greedy_equal"] for r in rows), turns=len(rows),
                  divergences_not_ties=sum(g >= 1e-2 for g in gaps), cached_persona_ttft=ttft, summary=summary,
                  rows=rows)
    print(f"\n{len(rows)} turns: greedy spec == plain on {report['greedy_equal_turns']}; the others part where "
          f"plain decoding's top-2 gap was {[round(g, 4) for g in gaps]} (ties < 1e-2: verify rows run fp32 GEMMs, "
          f"a 1-row decode an fp16 GEMV); not ties: {report['divergences_not_ties']}")
    print(f"{'mode':12}{'decode tok/s':>14}{'vs plain':>10}{'accept':>9}{'tok/step':>10}")
    for m, s in summary.items():
        acc = "-" if s["acceptance"] is None else f"{s['acceptance'] * 100:.0f}%"
        print(f"{m:12}{s['decode_tok_s']:14.1f}{s['speedup_vs_plain']:10.2f}{acc:>9}{s['tokens_per_step']:10.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec_decode.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out / 'spec_decode.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
