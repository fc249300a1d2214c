"""Why llguidance: the three JSON-Schema-to-token-mask libraries on PyPI, measured on the same tokenizers, schemas
and token walks (whichever of them are installed; only llguidance is a voicefast dependency).

    pip install xgrammar outlines-core   # optional, for the comparison only
    python -m bench.grammar_libs [--out FILE.json]

Per library and tokenizer (the embedded SmolLM2's 49,152 tokens; a synthetic byte-level BPE of GLM-4's 151,552):
the one-time tokenizer preparation, and per schema the compile time (what a `session.update` with new tools pays)
and the mask time per token while walking a valid instance token by token (what every constrained decode step
pays on the host). Schemas: a one-field tool call, and a nested one (enum, bounded integer, array of objects, free
string). Compact separators (", " / ": "), no free whitespace, as voicefast decodes arguments."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SCHEMAS = [
    {"type": "object", "properties": {"order_number": {"type": "string", "maxLength": 16}},
     "required": ["order_number"], "additionalProperties": False},
    {"type": "object", "properties": {
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "qty": {"type": "integer", "minimum": 1, "maximum": 20},
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                             "n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["sku", "n"], "additionalProperties": False}},
        "note": {"type": "string", "maxLength": 120}},
     "required": ["size", "qty", "items", "note"], "additionalProperties": False},
]
INSTANCES = [{"order_number": "A1234"},
             {"size": "medium", "qty": 3, "items": [{"sku": "boot-9", "n": 2}, {"sku": "sock", "n": 12}],
              "note": "leave it at the door please, next to the blue bench on the left side of the house"}]


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_llguidance(tk, eos, vocab):
    import llguidance as L
    import numpy as np

    lt, init = _timed(lambda: L.LLTokenizer(tk.to_str(), n_vocab=vocab, eos_token=eos))
    res = {"tokenizer_init_s": init, "schemas": []}
    opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    for schema, inst in zip(SCHEMAS, INSTANCES, strict=True):
        m, comp = _timed(lambda s=schema: L.LLMatcher(lt, L.LLMatcher.grammar_from_json_schema(s, defaults=opts)))
        mask = np.zeros((vocab + 31) // 32, np.int32)
        times = _walk(tk.encode(json.dumps(inst)).ids, lambda m=m, mask=mask: m.unsafe_compute_mask_ptr(
            mask.ctypes.data, mask.nbytes), lambda t, m=m: m.consume_token(t))
        res["schemas"].append(_summary(comp, times, m.is_accepting()))
    return res


def bench_xgrammar(tk, eos, vocab):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    def prep():
        info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tk), vocab_size=vocab,
                                                  stop_token_ids=eos)
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    compiler, init = _timed(prep)
    res = {"tokenizer_init_s": init, "schemas": []}
    for schema, inst in zip(SCHEMAS, INSTANCES, strict=True):
        def build(s=schema):
            cg = compiler.compile_json_schema(json.dumps(s), any_whitespace=False, separators=(", ", ": "))
            return xgr.GrammarMatcher(cg)
        m, comp = _timed(build)
        mask = xgr.allocate_token_bitmask(1, vocab)
        times = _walk(tk.encode(json.dumps(inst)).ids, lambda m=m, mask=mask: m.fill_next_token_bitmask(mask, 0),
                      lambda t, m=m: m.accept_token(t))
        res["schemas"].append(_summary(comp, times, m.is_terminated() or m.accept_token(eos[0])))
    return res


def bench_outlines_core(tk, eos, vocab):
    import numpy as np
    import outlines_core as oc
    from outlines_core import json_schema

    from bench.synthetic_tokenizer import _bytes_to_unicode

    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    specials = {t.content for t in tk.get_added_tokens_decoder().values()}

    def prep():
        byte_vocab: dict[bytes, list[int]] = {}
        for s, i in tk.get_vocab(with_added_tokens=True).items():
            if i in eos or s in specials:
                continue
            byte_vocab.setdefault(bytes(u2b[c] for c in s), []).append(i)
        return oc.Vocabulary(eos[0], byte_vocab)

    voc, init = _timed(prep)
    res = {"tokenizer_init_s": init, "schemas": []}
    for schema, inst in zip(SCHEMAS, INSTANCES, strict=True):
        def build(s=schema):
            return oc.Guide(oc.Index(json_schema.build_regex_from_schema(json.dumps(s), whitespace_pattern=" ?"),
                                     voc))
        g, comp = _timed(build)
        mask = np.zeros((vocab + 31) // 32, np.int32)
        times = _walk(tk.encode(json.dumps(inst)).ids, lambda g=g, mask=mask: g.write_mask_into(
            mask.ctypes.data, mask.size, 4), lambda t, g=g: g.advance(t) is not False)
        res["schemas"].append(_summary(comp, times, g.is_finished()))
    return res


def _walk(ids: list[int], fill, advance) -> list[float]:
    """Mask time per token while consuming a valid instance's tokens one by one."""
    times = []
    for tok in ids:
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
        if not advance(tok):
            raise AssertionError(f"token {tok} of a valid instance was rejected")
    return times


def _summary(compile_s: float, times: list[float], accepted: bool) -> dict:
    us = sorted(t * 1e6 for t in times)
    return {"compile_ms": compile_s * 1e3, "mask_us_mean": statistics.fmean(us), "mask_us_median": us[len(us) // 2],
            "mask_us_max": us[-1], "tokens": len(us), "accepted": bool(accepted)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from bench.synthetic_tokenizer import build_byte_bpe
    from llm_engine.tokenizer import Tokenizer
    from voicefast.assets import resolve_llm

    smol = Tokenizer.from_path(resolve_llm(None).path)
    glm = build_byte_bpe(151_552)
    toks = {"smollm2-49152": (smol._tk, list(smol.eos_token_ids), smol.vocab_size),
            "synthetic-151552": (glm, [glm.token_to_id("<|endoftext|>")], 151_552)}
    out = {}
    for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                    ("outlines-core", bench_outlines_core)):
        for tname, (tk, eos, vocab) in toks.items():
            try:
                r = fn(tk, eos, vocab)
            except ImportError as e:
                print(f"{lib}: not installed ({e.name})")
                break
            out[f"{lib}/{tname}"] = r
            print(f"{lib:14s} {tname:17s} init {r['tokenizer_init_s']:.2f} s | " + " | ".join(
                f"schema {i}: compile {s['compile_ms']:.1f} ms, mask {s['mask_us_mean']:.0f} us/token "
                f"(max {s['mask_us_max']:.0f})" for i, s in enumerate(r["schemas"])), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
