"""Speculative decoding on the GPU at the real shapes (random bf16 weights; the verify runs through the decode CUDA
graphs as one row per token). The embedded model's weights cannot travel to the GPU machine (98 MB, over the
64 MB a call carries), so the acceptance pattern measured with the real model on customer-service conversations
(bench/spec_decode.py --trace-only -> bench/results/spec_trace.json: per decode step, drafts proposed and
accepted) is REPLAYED here: at each step the drafts are the tokens plain decoding produces next (right) for as
many as the trace accepted, then wrong ones. Modes, batch 1, each turn of the trace as one request:
  plain      speculation off
  replay     the real acceptance pattern, at this shape's real verify cost
  oracle     4 drafts every step, all right (the ceiling)
  wrong      never-right drafts with the shipped back-off (the cost when nothing is accepted)
  wrong-raw  never-right drafts, 4 every step, no back-off (the raw cost of a verify)
plus the graph step time at 1, 2, 4, 8, 16 rows (the verify cost curve).

    python3 bench/spec_gpu.py --out $OUT/spec_gpu.json [--models glm4-9b,smollm2-135m] [--trace PATH]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.decode_gpu import SHAPES, graph_step_ms, log, make_engine, make_model  # noqa: E402
from llm_engine.sampling_params import SamplingParams  # noqa: E402
from llm_engine.spec_decode import SpecPolicy  # noqa: E402

K = 4


class Scripted(SpecPolicy):
    """Drafts scripted from the tokens plain decoding produced (truth[request_id]): per step (k, a) -> the next a
    true tokens then k - a wrong ones. mode: replay (steps from the trace), oracle, wrong, wrong-raw."""

    def __init__(self, mode: str, truth: dict, trace: dict, vocab: int):
        super().__init__(K, max_backoff_steps=1 if mode in ("wrong-raw", "oracle", "replay") else 16)
        self.mode, self.truth, self.trace, self.vocab = mode, truth, trace, vocab
        self.step: dict[str, int] = {}

    def propose(self, seq, limit):
        if limit <= 0 or seq.num_completion_tokens == 0 or not seq.params.speculate:
            return []
        truth = self.truth[seq.request_id]
        n = seq.num_completion_tokens  # drafts guess completion tokens n, n+1, ...
        if self.mode == "replay":
            i = self.step.get(seq.request_id, 0)
            self.step[seq.request_id] = i + 1
            steps = self.trace[seq.request_id]
            k, a = steps[i] if i < len(steps) else (0, 0)
        elif self.mode == "oracle":
            k, a = K, K
        else:
            st = self.state(seq)
            if st.skip > 0:
                st.skip -= 1
                return []
            k, a = (K if self.mode == "wrong-raw" else st.max_next), 0
        k = min(k, limit)
        right = truth[n:n + min(a, k)]
        return right + [(truth[min(n + j, len(truth) - 1)] + 1) % self.vocab for j in range(len(right), k)]


def run(engine, policy, prompts: dict, max_tokens: dict, speculate: bool) -> tuple[dict, dict]:
    engine.spec = engine.scheduler.spec = policy
    engine.scheduler.spec_max_rows = max(engine.scheduler.spec_max_rows, 1 + K)
    toks, drafted, accepted = {}, 0, 0
    dec_tokens = dec_s = 0.0
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens[rid], ignore_eos=True,
                                                        speculate=speculate))
        marks, out_toks = [], []
        while engine.has_unfinished():
            for o in engine.step():
                if o.token_ids:
                    marks.append((time.perf_counter(), len(o.token_ids)))
                    out_toks += o.token_ids
                if o.finished:
                    drafted += o.result.draft_tokens
                    accepted += o.result.accepted_draft_tokens
        toks[rid] = out_toks
        if len(marks) > 1:
            dec_tokens += sum(n for _, n in marks[1:])
            dec_s += marks[-1][0] - marks[0][0]
    return toks, dict(decode_tok_s=dec_tokens / dec_s if dec_s else None, drafted=drafted, accepted=accepted,
                      acceptance=accepted / drafted if drafted else None)


def bench_model(name: str, trace_rows: list[dict], max_turns: int) -> list[dict]:
    model = make_model(name, "bf16")
    engine = make_engine(model)
    vocab = SHAPES[name]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    rows = trace_rows[:max_turns]
    prompts = {f"t{i}": torch.randint(0, vocab, (int(r.get("prompt_tokens", 200)),), generator=g).tolist()
               for i, r in enumerate(rows)}
    max_tokens = {f"t{i}": max(2, int(r["tokens"])) for i, r in enumerate(rows)}
    trace = {f"t{i}": [tuple(s) for s in r["trace"]] for i, r in enumerate(rows)}
    recs = []
    for ctx_rows in (1, 2, 4, 8, 16):
        ms = graph_step_ms(engine, ctx_rows, 256)
        recs.append(dict(model=name, impl="voicefast-graph-rows", rows=ctx_rows, step_ms=ms))
        log(f"[{name}] graph step with {ctx_rows:2d} rows (ctx 256): {ms:.3f} ms")
    run(engine, SpecPolicy(K), {"w": prompts["t0"]}, {"w": 8}, False)  # warm-up
    truth, plain = run(engine, SpecPolicy(K), prompts, max_tokens, False)
    recs.append(dict(model=name, impl="spec-plain", **plain))
    for mode in ("replay", "oracle", "wrong", "wrong-raw"):
        got, r = run(engine, Scripted(mode, truth, trace, vocab), prompts, max_tokens, True)
        same = sum(got[k] == truth[k] for k in truth)
        r["speedup_vs_plain"] = r["decode_tok_s"] / plain["decode_tok_s"]
        target = None
        if mode == "replay":
            d = sum(k for t in trace.values() for k, _ in t)
            target = sum(a for t in trace.values() for _, a in t) / d if d else None
        recs.append(dict(model=name, impl=f"spec-{mode}", outputs_equal_plain=same, requests=len(truth),
                         trace_acceptance=target, **r))
        log(f"[{name}] {mode:9s} {r['decode_tok_s']:9.1f} tok/s ({r['speedup_vs_plain']:.2f}x plain "
            f"{plain['decode_tok_s']:.1f}); accepted {r['accepted']}/{r['drafted']}; greedy outputs equal to "
            f"plain on {same}/{len(truth)} requests")
    del engine, model
    torch.cuda.empty_cache()
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="spec_gpu.json")
    ap.add_argument("--models", default="glm4-9b,smollm2-135m")
    ap.add_argument("--trace", default=os.path.join(os.path.dirname(__file__), "results", "spec_trace.json"))
    ap.add_argument("--turns", type=int, default=24)
    args = ap.parse_args(argv)
    with open(args.trace) as f:
        tr = json.load(f)
    log(f"trace: {args.trace}: acceptance {tr['acceptance']:.2f} over {len(tr['rows'])} turns")
    recs = [dict(impl="trace", acceptance=tr["acceptance"], turns=len(tr["rows"]), device=torch.cuda.get_device_name())]
    for name in args.models.split(","):
        try:
            recs += bench_model(name, tr["rows"], args.turns)
        except Exception as e:  # keep the other model's figures
            import traceback

            log(f"[{name}] spec bench FAILED: {e!r}\n{traceback.format_exc()[-1500:]}")
            recs.append(dict(model=name, impl="spec", error=repr(e)[:400]))
        with open(args.out, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
