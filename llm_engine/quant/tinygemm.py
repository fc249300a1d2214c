"""torch's built-in int4 weight-only kernel ("tinygemm", torch.ops.aten._weight_int4pack_mm, CUDA, bf16) as a
backend of Int4Linear, and the per-shape choice between it and our Triton kernel by timing on the device.

Our codes (w ~= q * scale + min, q in 0..15, fp16 scale/min per group) map exactly onto tinygemm's convention
w ~= (q - 8) * scale + zero with zero = min + 8 * scale; its scale/zero are bf16, so its dequantized weights
differ from ours by that rounding (`dequantize` gives them exactly, for checks)."""

from __future__ import annotations

import torch

INNER_K_TILES = 8  # tinygemm's packing parameter; K must be a multiple of 16 * INNER_K_TILES


def supported(in_features: int, group: int) -> bool:
    return (torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and in_features % (16 * INNER_K_TILES) == 0 and group in (32, 64, 128, 256))


def pack(codes: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] (0..15, CUDA), scale/min [N, K/group] -> (tinygemm packed weight, scales_and_zeros
    bf16 [K/group, N, 2])."""
    byte = (codes[:, ::2].to(torch.int32) << 4 | codes[:, 1::2].to(torch.int32)).to(torch.uint8)  # [N, K/2]
    w = torch.ops.aten._convert_weight_to_int4pack(byte.contiguous(), INNER_K_TILES)
    zero = wmin.float() + 8 * scale.float()
    sz = torch.stack([scale.float(), zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
    return w, sz


def dequantize(codes: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The weights tinygemm computes with: (q - 8) * scale + zero, bf16 scale/zero, as float32 [N, K]."""
    N, K = codes.shape
    s = sz[..., 0].float().transpose(0, 1)[..., None]  # [N, G, 1]
    z = sz[..., 1].float().transpose(0, 1)[..., None]
    return ((codes.float().reshape(N, K // group, group) - 8) * s + z).reshape(N, K)


def matmul(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int, out_features: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype (the kernel computes in bf16)."""
    y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), w, group, sz)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def faster_than_triton(N: int, K: int, group: int, device: torch.device) -> tuple[bool, dict]:
    """Times both kernels at batch 1 and 16 on random int4 weights of this shape (rotated past L2); returns
    (tinygemm wins, the timings in us). Score: batch-1 time + half the batch-16 time."""
    import triton.testing

    from llm_engine.quant.int4 import quantize_int4, unpack_int4
    from llm_engine.quant.kernels import int4_matmul

    copies = max(2, min(8, -(-180 * 2**20 // (N * K // 2))))
    ours, theirs = [], []
    for _ in range(copies):
        p, s, m, g = quantize_int4(torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02, group)
        ours.append((p, s, m))
        theirs.append(pack(unpack_int4(p, g), s, m))
    times = {}
    for M in (1, 16):
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        for name, fn in (("triton", lambda x=x: [int4_matmul(x, p, s, m, group) for p, s, m in ours]),
                         ("tinygemm", lambda x=x: [matmul(x, w, sz, group, N, None) for w, sz in theirs])):
            fn()  # compile / tune outside the timing
            ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
            times[f"{name} M={M}"] = ms * 1e3 / copies
    score = {b: times[f"{b} M=1"] + 0.5 * times[f"{b} M=16"] for b in ("triton", "tinygemm")}
    return score["tinygemm"] < score["triton"], times
