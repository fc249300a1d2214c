"""Peer baselines on the GPU, measured in the same call as bench/decode_gpu.py so every ratio in docs/gpu.md can be
reproduced from this repository alone: what a user would otherwise run on the same card and the same shapes.

  hf-eager          transformers, dynamic KV cache, one forward per token (eager PyTorch)
  hf-compile        transformers, static KV cache, the one-token step under torch.compile(mode="reduce-overhead")
                    (CUDA graphs), the gpt-fast recipe
  hf-int4-tinygemm  hf-compile with every Linear (lm_head included) swapped for torch's int4 tinygemm kernel
                    (torch.ops.aten._weight_int4pack_mm, asymmetric, group 128)

Random bf16 weights of the real shapes (speed does not depend on their values), batch 1, a 32-token prompt,
greedy; tok/s = 1 / median step time after warm-up, timed with a host clock around a step that ends in .item()
(the token reaches the host, as in a serving loop). One JSON line per result, appended to --out.

    python3 bench/gpu_peers.py --out $OUT/peers.jsonl [--models glm4-9b,smollm2-135m] [--impls ...]
        [--budget-s 240]     (a peer that would start after the budget is spent is skipped and says so)"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEV = "cuda"
PROMPT = 32
GROUP = 128


def hf_model(name: str):
    """A transformers model of the shape in bench/decode_gpu.SHAPES, random bf16 weights, on the GPU."""
    import transformers

    from bench.decode_gpu import SHAPES

    s = SHAPES[name]
    common = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                  num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"], rms_norm_eps=1e-5,
                  max_position_embeddings=4096, tie_word_embeddings=s["tie_word_embeddings"], pad_token_id=0)
    if s["family"] == "glm4":
        cfg = transformers.Glm4Config(partial_rotary_factor=s["partial_rotary_factor"],
                                      attention_bias=s["attention_bias"], **common)
        cls = transformers.Glm4ForCausalLM
    elif s["family"] == "llama":
        cfg = transformers.LlamaConfig(rope_theta=s.get("rope_theta", 10000.0), **common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"no transformers peer for family {s['family']!r}")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.eval().requires_grad_(False)
    g = torch.Generator(device=DEV).manual_seed(0)
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            p.data.normal_(1.0, 0.1, generator=g)
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    return model, cfg


def read_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer except the gathered embedding rows (unless tied)."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb if isinstance(model.get_output_embeddings(), nn.Linear) \
        else False
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or (t.data_ptr() == emb.data_ptr() and not tied):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


@torch.inference_mode()
def decode_eager(model, cfg, new: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=DEV)
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new):
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        tok.item()
        times.append(time.perf_counter() - t)
    return 1.0 / _median(times[4:])


def _static_cache(cfg, max_len: int):
    from transformers import StaticCache

    try:  # transformers >= 4.56 / 5.x
        return StaticCache(config=cfg, max_cache_len=max_len)
    except TypeError:
        return StaticCache(config=cfg, max_batch_size=1, max_cache_len=max_len, device=DEV, dtype=torch.bfloat16)


@torch.inference_mode()
def decode_compiled(model, cfg, new: int) -> float:
    cache = _static_cache(cfg, PROMPT + new + 8)
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=DEV)
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(PROMPT, device=DEV), use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)

    def one(t, pos):
        return model(input_ids=t, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1:].argmax(-1)

    step = torch.compile(one, mode="reduce-overhead", fullgraph=True)
    times = []
    for i in range(new):
        pos = torch.tensor([PROMPT + i], device=DEV)
        t = time.perf_counter()
        tok = step(tok, pos).clone()
        tok.item()
        times.append(time.perf_counter() - t)
    return 1.0 / _median(times[16:])


class TinygemmInt4Linear(nn.Module):
    """nn.Linear through torch's int4 tinygemm kernel: w ~= (q - 8) * scale + zero per group of 128."""

    def __init__(self, lin: nn.Linear, inner_k_tiles: int = 8):
        super().__init__()
        n, k = lin.weight.shape
        wg = lin.weight.detach().float().reshape(n, k // GROUP, GROUP)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        zero = lo + 8 * scale  # value of code 8
        q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("w", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        sz = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], -1)  # [n, k/G, 2]
        self.register_buffer("sz", sz.transpose(0, 1).contiguous().to(torch.bfloat16))  # [k/G, n, 2]
        self.bias = lin.bias
        self.out_features = n

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.w, GROUP, self.sz)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def to_tinygemm(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % GROUP == 0:
                setattr(parent, name, TinygemmInt4Linear(child))
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="peers.jsonl")
    ap.add_argument("--models", default="glm4-9b,smollm2-135m")
    ap.add_argument("--impls", default="hf-eager,hf-compile,hf-int4-tinygemm")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--eager-tokens", type=int, default=24)
    ap.add_argument("--budget-s", type=float, default=1e9)
    args = ap.parse_args(argv)
    t_start = time.time()
    from bench.decode_gpu import copy_bw_gbs

    def emit(**rec):
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    import transformers

    bw = copy_bw_gbs()
    emit(event="env", torch=torch.__version__, transformers=transformers.__version__,
         device=torch.cuda.get_device_name(), copy_bw_gbs=bw)
    impls = args.impls.split(",")
    for name in args.models.split(","):
        model = None
        try:
            model, cfg = hf_model(name)
            nbytes = read_bytes(model)
            for impl in impls:
                if time.time() - t_start > args.budget_s:
                    emit(event="skipped", model=name, impl=impl, reason=f"budget of {args.budget_s:.0f} s spent")
                    continue
                if impl == "hf-int4-tinygemm" and name != "glm4-9b":
                    continue  # the int4 peer matters where int4 pays: the 9B shape
                t0 = time.time()
                try:
                    if impl == "hf-eager":
                        tps = decode_eager(model, cfg, args.eager_tokens)
                    elif impl == "hf-compile":
                        torch._dynamo.reset()
                        tps = decode_compiled(model, cfg, args.new_tokens)
                    elif impl == "hf-int4-tinygemm":
                        to_tinygemm(model)
                        nbytes = read_bytes(model)
                        torch._dynamo.reset()
                        tps = decode_compiled(model, cfg, args.new_tokens)
                    else:
                        raise ValueError(f"unknown peer {impl!r}")
                    limit = bw * 1e9 / nbytes
                    emit(event="decode", model=name, impl=impl, dtype="int4" if "int4" in impl else "bf16", batch=1,
                         prompt_len=PROMPT, tok_s=tps, limit_tok_s=limit, frac_of_limit=tps / limit,
                         bytes_per_token=nbytes, copy_bw_gbs=bw, wall_s=time.time() - t0)
                except Exception as e:  # one peer failing must not lose the others
                    emit(event="error", model=name, impl=impl, error=repr(e)[:400],
                         tb=traceback.format_exc()[-1200:])
        except Exception as e:
            emit(event="error", model=name, impl="build", error=repr(e)[:400], tb=traceback.format_exc()[-1200:])
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
