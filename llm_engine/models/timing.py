"""Forward timing for the model alone (no scheduler/runner): prefill `batch` sequences once, then greedy decode
one token per sequence per step through a paged cache, printing ms/step and tok/s. For the engine end to end,
see bench/.

    python -m llm_engine.models.timing [--model PATH] [--dtype bfloat16] [--threads 1] [--tokens 64] [--batch 8]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_engine.attn_metadata import AttnMetadata

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK_SIZE = 16  # tokens per KV block


def _meta(q: int, s: int, table: torch.Tensor) -> AttnMetadata:
    """B = table.shape[0] sequences of equal length s, each adding its last q tokens; seq b owns table[b]'s blocks
    (consecutive, so its flat slot of position p is table[b, 0] * block_size + p)."""
    b = table.shape[0]
    first_slot = table[:, :1].to(torch.int64) * _BLOCK_SIZE  # [B, 1]
    slots = (first_slot + torch.arange(s - q, s)).reshape(-1)  # [B*q]
    return AttnMetadata(query_start_loc=torch.arange(0, b * q + 1, q, dtype=torch.int32),
                        seq_lens=torch.full((b,), s, dtype=torch.int32), block_tables=table, slot_mapping=slots,
                        max_query_len=q, max_seq_len=s, is_decode=q == 1, query_lens_cpu=[q] * b,
                        seq_lens_cpu=[s] * b)


def time_decode(model, prompt_len: int, tokens: int, batch: int = 1) -> tuple[float, list[float]]:
    """(prefill seconds, per-step decode seconds) for `batch` sequences decoding together (one token each per
    step); token ids are arbitrary but fixed."""
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    n_blocks = (prompt_len + tokens + _BLOCK_SIZE - 1) // _BLOCK_SIZE
    kv = [(torch.zeros(batch * n_blocks, _BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(batch * n_blocks, _BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype))
          for _ in range(cfg.num_layers)]  # each [B*N, bs, Hkv, D]
    table = torch.arange(batch * n_blocks, dtype=torch.int32).reshape(batch, n_blocks)  # [B, N]
    ids = (torch.arange(batch * prompt_len) % cfg.vocab_size)  # [B*P]
    last = torch.arange(1, batch + 1) * prompt_len - 1  # [B] each sequence's last prompt row
    with torch.inference_mode():
        t0 = time.perf_counter()
        h = model(ids, torch.arange(prompt_len).repeat(batch), kv, _meta(prompt_len, prompt_len, table))
        nxt = model.compute_logits(h[last]).argmax(-1)  # [B]
        prefill_s = time.perf_counter() - t0
        steps = []
        for pos in range(prompt_len, prompt_len + tokens):
            t = time.perf_counter()
            h = model(nxt, torch.full((batch,), pos), kv, _meta(1, pos + 1, table))
            nxt = model.compute_logits(h).argmax(-1)  # [B]
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
    ap.add_argument("--batch", default="1", help="sequences decoding together; a comma list runs each in turn")
    ap.add_argument("--no-half-gemv", action="store_true", help="float32 CPU: plain fp32 GEMVs (see load_model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from model_assets import resolve_llm

        path = resolve_llm().path
    model, _ = load_model(path, "cpu", _DTYPES[args.dtype], half_gemv=False if args.no_half_gemv else None)
    half = any(type(m).__name__ == "HalfGemvLinear" for m in model.modules())
    batches = [int(b) for b in args.batch.split(",")]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batch must be positive ints, got {args.batch!r}")
    time_decode(model, 8, 4)  # warm-up
    for b in batches:
        prefill_s, steps = time_decode(model, args.prompt_len, args.tokens, batch=b)
        ms = sorted(1e3 * s for s in steps)
        med = statistics.median(ms)
        print(f"{args.dtype}{' half-gemv' if half else ''} threads={args.threads} batch={b}: prefill "
              f"{b}x{args.prompt_len} tok {1e3 * prefill_s:.1f} ms; decode median {med:.2f} ms/step "
              f"(p10 {ms[len(ms) // 10]:.2f}, p90 {ms[9 * len(ms) // 10]:.2f}) = {b * 1e3 / med:.1f} tok/s")


if __name__ == "__main__":
    main()
