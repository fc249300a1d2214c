"""Int4 weight-only Linear, asymmetric group-wise: w[n, k] ~= q[n, k] * scale[n, g] + min[n, g], q in [0, 15],
g = k // group (group 128, or 64/32 where K is not a multiple of 128). Two codes per byte, half-split within
each group: byte j of group g holds q[n, g*group + j] (low nibble) and q[n, g*group + group/2 + j] (high), so
a kernel multiplies both nibbles against contiguous slices of x with no register shuffles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_engine.quant.base import WeightOnlyLinear


def pick_group(k: int, group: int = 128) -> int:
    for g in (group, 64, 32):
        if k % g == 0:
            return g
    raise ValueError(f"in_features {k} is not a multiple of 32: cannot group-quantize to int4")


def quantize_int4(w: torch.Tensor, group: int = 128):
    """w [N, K] -> (packed uint8 [N, K/2], scale fp16 [N, K/group], min fp16 [N, K/group], group)."""
    N, K = w.shape
    group = pick_group(K, group)
    wg = w.float().reshape(N, K // group, group)  # [N, G, group]
    lo = wg.amin(dim=2)
    hi = wg.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)  # [N, G]
    mn = lo.to(torch.float16)  # [N, G]
    q = torch.round((wg - mn.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    half = group // 2
    packed = (q[..., :half] | (q[..., half:] << 4)).reshape(N, K // 2).contiguous()  # [N, K/2]
    return packed, scale, mn, group


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K/2] uint8 (half-split layout) -> [N, K] uint8 codes."""
    N = packed.shape[0]
    p = packed.reshape(N, -1, group // 2)  # [N, G, group/2]
    return torch.cat((p & 15, p >> 4), dim=-1).reshape(N, -1)


def dequantize_int4(packed, scale, mn, group: int, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed, group).float()
    N, K = q.shape
    w = q.reshape(N, K // group, group) * scale.float()[..., None] + mn.float()[..., None]
    return w.reshape(N, K).to(dtype)


def reference_int4_linear(x, packed, scale, mn, group, bias=None):
    return F.linear(x, dequantize_int4(packed, scale, mn, group, x.dtype), bias)


class Int4Linear(WeightOnlyLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.bfloat16,
                 group: int = 128):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = pick_group(in_features, group)
        ng = in_features // self.group
        self.register_buffer("qweight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scale", torch.ones((out_features, ng), dtype=torch.float16, device=device))
        self.register_buffer("wmin", torch.zeros((out_features, ng), dtype=torch.float16, device=device))
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group: int = 128) -> Int4Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device, lin.weight.dtype, group)
        packed, s, mn, _ = quantize_int4(lin.weight.data, m.group)
        m.qweight.copy_(packed)
        m.scale.copy_(s)
        m.wmin.copy_(mn)
        m._copy_bias(lin)
        return m

    backend = "triton"  # or "tinygemm" after use_tinygemm(): torch's int4 kernel, for every batch size

    def use_tinygemm(self) -> None:
        """Repack for torch's tinygemm kernel (llm_engine.quant.tinygemm); drops our packed copy."""
        from llm_engine.quant import tinygemm

        w, sz = tinygemm.pack(unpack_int4(self.qweight, self.group), self.scale, self.wmin)
        for name in ("qweight", "scale", "wmin"):
            delattr(self, name)
        self.register_buffer("tg_weight", w)
        self.register_buffer("tg_scale_zero", sz)  # [G, N, 2] bf16
        self.backend = "tinygemm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "tinygemm":
            from llm_engine.quant import tinygemm

            x2 = x.reshape(-1, self.in_features)
            y = tinygemm.matmul(x2, self.tg_weight, self.tg_scale_zero, self.group, self.out_features, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        from llm_engine.quant.kernels import int4_matmul

        return int4_matmul(x2, self.qweight, self.scale, self.wmin, self.group, self.bias)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        return reference_int4_linear(x2, self.qweight, self.scale, self.wmin, self.group, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group {self.group}, {self.backend}"
