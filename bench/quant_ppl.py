"""Quality cost of weight-only quantization: perplexity of the embedded SmolLM2-135M on bench/ppl_text.txt for
the float32 model vs int8 (per-channel) vs int4 (group-wise) — computed on CPU through the torch dequant
reference path (the same maths the GPU kernels implement, checked in tests/test_quant.py / bench/gpu_check.py).

    python bench/quant_ppl.py [--model PATH] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from llm_engine.attn_metadata import AttnMetadata  # noqa: E402
from llm_engine.kv_cache import allocate_kv_cache  # noqa: E402
from llm_engine.loader import load_model  # noqa: E402
from llm_engine.quant import quantize_model  # noqa: E402
from llm_engine.tokenizer import Tokenizer  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppl_text.txt")


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    cfg = model.config
    T, bs = len(ids), 16
    nb = (T + bs - 1) // bs
    kv = allocate_kv_cache(cfg, nb, bs, "cpu", torch.float32)
    meta = AttnMetadata(query_start_loc=torch.tensor([0, T], dtype=torch.int32),
                        seq_lens=torch.tensor([T], dtype=torch.int32),
                        block_tables=torch.arange(nb, dtype=torch.int32)[None], slot_mapping=torch.arange(T),
                        max_query_len=T, max_seq_len=T, is_decode=False, query_lens_cpu=[T], seq_lens_cpu=[T])
    x = torch.tensor(ids)
    hidden = model(x, torch.arange(T), kv, meta)  # [T, H]
    logits = model.compute_logits(hidden)  # [T, V]
    nll = torch.nn.functional.cross_entropy(logits[:-1], x[1:])
    return math.exp(nll.item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from voicefast.assets import resolve_llm
        args.model = str(resolve_llm().path)
    tok = Tokenizer.from_path(args.model)
    with open(TEXT) as f:
        ids = tok.encode(f.read())
    rows = []
    for mode, head, group in ((None, False, 0), ("int8", False, 0), ("int8", True, 0), ("int4", False, 128),
                              ("int4", True, 128), ("int4", False, 32)):
        t = time.time()
        model, _ = load_model(args.model, "cpu", torch.float32, half_gemv=False)
        if mode:
            quantize_model(model, mode, include_lm_head=head, group=group or 128)
        ppl = perplexity(model, ids)
        name = "float32" if mode is None else f"{mode}{f' g{group}' if group else ''}{' + lm_head' if head else ''}"
        rows.append(dict(weights=name, tokens=len(ids), ppl=ppl))
        print(f"{name:16s} tokens={len(ids)}  ppl={ppl:8.3f}  ({time.time() - t:.1f}s)", flush=True)
    base = rows[0]["ppl"]
    for r in rows:
        r["vs_float32_pct"] = (r["ppl"] / base - 1) * 100
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=os.path.basename(args.model), text="bench/ppl_text.txt", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
