"""Single-sequence forward timing for the model alone (no scheduler/runner): prefill once, then greedy decode
one token per step through a paged cache, printing ms/token. For the engine end to end, see bench/.

    python -m llm_engine.models.timing [--model PATH] [--dtype bfloat16] [--threads 1] [--tokens 64]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_engine.attn_metadata import AttnMetadata

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _meta(q: int, s: int, table: torch.Tensor) -> AttnMetadata:
    return AttnMetadata(query_start_loc=torch.tensor([0, q], dtype=torch.int32),
                        seq_lens=torch.tensor([s], dtype=torch.int32), block_tables=table,
                        slot_mapping=torch.arange(s - q, s), max_query_len=q, max_seq_len=s, is_decode=q == 1,
                        query_lens_cpu=[q], seq_lens_cpu=[s])


def time_decode(model, prompt_len: int, tokens: int, block_size: int = 16) -> tuple[float, list[float]]:
    """(prefill seconds, per-token decode seconds) for one sequence; token ids are arbitrary but fixed."""
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    n_blocks = (prompt_len + tokens + block_size - 1) // block_size
    kv = [(torch.zeros(n_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(n_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype))
          for _ in range(cfg.num_layers)]  # each [N, bs, Hkv, D]
    table = torch.arange(n_blocks, dtype=torch.int32)[None]  # [1, N]
    ids = torch.arange(prompt_len) % cfg.vocab_size  # [P]
    with torch.inference_mode():
        t0 = time.perf_counter()
        h = model(ids, torch.arange(prompt_len), kv, _meta(prompt_len, prompt_len, table))
        nxt = model.compute_logits(h[-1:]).argmax(-1)  # [1]
        prefill_s = time.perf_counter() - t0
        steps = []
        for pos in range(prompt_len, prompt_len + tokens):
            t = time.perf_counter()
            h = model(nxt, torch.tensor([pos]), kv, _meta(1, pos + 1, table))
            nxt = model.compute_logits(h).argmax(-1)
            steps.append(time.perf_counter() - t)
    return prefill_s, steps


def main(argv: list[str] | None = None) -> None:
    from llm_engine.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-half-gemv", action="store_true", help="float32 CPU: plain fp32 GEMVs (see load_model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from voicefast.assets import resolve_llm

        path = resolve_llm().path
    model, _ = load_model(path, "cpu", _DTYPES[args.dtype], half_gemv=False if args.no_half_gemv else None)
    half = any(type(m).__name__ == "HalfGemvLinear" for m in model.modules())
    time_decode(model, 8, 4)  # warm-up
    prefill_s, steps = time_decode(model, args.prompt_len, args.tokens)
    ms = sorted(1e3 * s for s in steps)
    med = statistics.median(ms)
    print(f"{args.dtype}{' half-gemv' if half else ''} threads={args.threads}: prefill {args.prompt_len} tok "
          f"{1e3 * prefill_s:.1f} ms; decode median {med:.2f} ms/token "
          f"(p10 {ms[len(ms) // 10]:.2f}, p90 {ms[9 * len(ms) // 10]:.2f}) = {1e3 / med:.1f} tok/s")

if __name__ == "__main__":
    main()
