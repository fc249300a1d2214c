"""`voicefast bench engine --compare-transformers`: batch-1 TTFT and decode tok/s of our engine on this CPU
against transformers' LlamaForCausalLM loaded with the SAME dequantized weights in the same process, plus our
batch-8 aggregate decode tok/s. Also checks that both produce the same greedy tokens."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def interleaved_to_neox_rows(w, n_heads: int, head_dim: int):
    """Undo llama.cpp's q/k row permutation (adjacent rotary pairs -> NeoX halves) for HF Llama."""
    dim = w.shape[1]
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def hf_llama_from(cfg, state):
    """A transformers LlamaForCausalLM holding our checkpoint's weights (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.family != "llama" or cfg.partial_rotary_factor != 1.0:
        raise ValueError("the transformers comparison supports Llama checkpoints only")
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                         max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias)
    model = LlamaForCausalLM(hf_cfg).float().eval()
    sd = {}
    for k, v in state.items():
        v = v.float()
        if cfg.rope_interleaved and k.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in k else cfg.num_kv_heads
            v = interleaved_to_neox_rows(v, heads, cfg.head_dim)
        sd[k] = v
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.requires_grad_(False)
    return model


def hf_greedy(model, ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, ttft_s, decode_tok_s) with a KV cache, one token per forward, batch 1."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(max_tokens - 1):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
        t2 = time.perf_counter()
    return toks, t1 - t0, (max_tokens - 1) / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicefast bench engine --compare-transformers", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype for both engines (weights are the same dequantized tensors)")
    ap.add_argument("--out", default=None, help="directory for engine_cpu.json")
    args = ap.parse_args(argv)

    import torch

    from llm_engine import EngineConfig, LLMEngine, SamplingParams
    from llm_engine.loader import load_checkpoint

    torch.set_num_threads(args.threads)
    eng = LLMEngine(EngineConfig(model=args.model, device="cpu", max_num_seqs=8, cpu_threads=args.threads,
                                 dtype=args.dtype, kv_cache_memory_mib=128, enable_prefix_caching=False))
    cfg, state = load_checkpoint(EngineConfig(model=args.model).model_path())
    hf = hf_llama_from(cfg, state).to(getattr(torch, args.dtype))
    del state
    text = ("You are the customer-service assistant of Maple Street Books. Opening hours: Monday to Friday 9 am to "
            "6 pm, Saturday 10 am to 4 pm, closed on Sunday. ") * 8
    ids = eng.tokenizer.encode(text)[:args.prompt_tokens]
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    eng.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    hf_greedy(hf, ids, 4)

    ours, theirs = [], []
    for _ in range(args.repeats):
        [(toks, r)] = eng.generate([ids], sp)
        ours.append((r.ttft_s, r.decode_tok_s))
        htoks, httft, htps = hf_greedy(hf, ids, args.max_tokens)
        theirs.append((httft, htps))
    same = toks == htoks
    first_diff = next((i for i, (a, b) in enumerate(zip(toks, htoks, strict=True)) if a != b), None)
    t0 = time.perf_counter()
    res8 = eng.generate([ids] * 8, sp)
    wall8 = time.perf_counter() - t0
    agg8 = sum(r.completion_tokens for _, r in res8) / wall8
    per_seq8 = statistics.median(r.decode_tok_s for _, r in res8)

    def med(xs, i):
        return statistics.median(x[i] for x in xs)

    report = {
        "model": str(EngineConfig(model=args.model).model_path()), "threads": args.threads, "dtype": args.dtype,
        "cpu": platform.processor() or platform.machine(), "prompt_tokens": len(ids), "max_tokens": args.max_tokens,
        "ours_bs1": {"ttft_ms": 1000 * med(ours, 0), "decode_tok_s": med(ours, 1)},
        "transformers_bs1": {"ttft_ms": 1000 * med(theirs, 0), "decode_tok_s": med(theirs, 1)},
        "ours_bs8": {"aggregate_tok_s": agg8, "per_seq_decode_tok_s": per_seq8, "wall_s": wall8},
        "greedy_tokens_identical": same, "first_token_difference_at": first_diff,
    }
    print(f"dtype={args.dtype} threads={args.threads} prompt={len(ids)} tokens, {args.max_tokens} generated, "
          f"median of {args.repeats}")
    print(f"{'':22}{'TTFT ms':>10}{'decode tok/s':>14}")
    print(f"{'engine bs=1':22}{report['ours_bs1']['ttft_ms']:10.1f}{report['ours_bs1']['decode_tok_s']:14.1f}")
    print(f"{'transformers bs=1':22}{report['transformers_bs1']['ttft_ms']:10.1f}"
          f"{report['transformers_bs1']['decode_tok_s']:14.1f}")
    print(f"engine bs=8 aggregate: {agg8:.1f} tok/s ({per_seq8:.1f} tok/s per sequence)")
    print(f"greedy tokens identical to transformers: {same}"
          + ("" if same else f" (first difference at token {first_diff})"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "engine_cpu.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'engine_cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
