"""quantize_model: swap every nn.Linear of a loaded model for its weight-only quantized twin."""

from __future__ import annotations

from torch import nn

from llm_engine.quant.int4 import Int4Linear
from llm_engine.quant.int8 import Int8Linear


def quantize_model(model: nn.Module, mode: str, include_lm_head: bool = False, group: int = 128,
                   int4_backend: str = "auto") -> nn.Module:
    """In place; returns model. mode "int8" | "int4" (group: int4 codes per scale/min, 128 by default; 64/32
    where in_features is not a multiple). The lm_head (a module named lm_head) is swapped only with
    include_lm_head (a tied lm_head gets its own quantized copy; the embedding stays full precision).
    int4_backend: "triton" (ours), "tinygemm" (torch's kernel, CUDA bf16) or "auto": on CUDA, per weight shape,
    whichever of the two is faster on this device (timed once here), else ours."""
    if int4_backend not in ("auto", "triton", "tinygemm"):
        raise ValueError(f"int4_backend must be 'auto', 'triton' or 'tinygemm', got {int4_backend!r}")
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize must be 'int8' or 'int4', got {mode!r}")
    cls = Int8Linear if mode == "int8" else Int4Linear
    targets = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child_name == "lm_head" and not include_lm_head:
                continue
            targets.append((mod, child_name, full))
    decided: dict[tuple[int, int], bool] = {}
    for parent, child_name, _ in targets:
        lin = getattr(parent, child_name)
        q = cls.from_linear(lin, group) if mode == "int4" else cls.from_linear(lin)
        if mode == "int4" and _wants_tinygemm(q, int4_backend, decided):
            q.use_tinygemm()
        setattr(parent, child_name, q)
        del lin
    return model


def _wants_tinygemm(q: Int4Linear, backend: str, decided: dict) -> bool:
    from llm_engine.quant import tinygemm

    if backend == "triton" or not q.qweight.is_cuda or not tinygemm.supported(q.in_features, q.group):
        if backend == "tinygemm" and not (q.qweight.is_cuda and tinygemm.supported(q.in_features, q.group)):
            raise ValueError(f"int4_backend='tinygemm' cannot run a {q.in_features}-input layer on "
                             f"{q.qweight.device} (needs CUDA and in_features % 128 == 0)")
        return False
    if backend == "tinygemm":
        return True
    key = (q.out_features, q.in_features)
    if key not in decided:
        decided[key], times = tinygemm.faster_than_triton(*key, q.group, q.qweight.device)
        CHOICES[f"int4 N={key[0]} K={key[1]}"] = ("tinygemm" if decided[key] else "triton", times)
    return decided[key]


CHOICES: dict[str, tuple[str, dict]] = {}  # the int4 backend picked per shape, with the timings (us)
