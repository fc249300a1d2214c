"""quantize_model: swap every nn.Linear of a loaded model for its weight-only quantized twin."""

from __future__ import annotations

from torch import nn

from llm_engine.quant.int4 import Int4Linear
from llm_engine.quant.int8 import Int8Linear


def quantize_model(model: nn.Module, mode: str, include_lm_head: bool = False, group: int = 128) -> nn.Module:
    """In place; returns model. mode "int8" | "int4" (group: int4 codes per scale/min, 128 by default; 64/32
    where in_features is not a multiple). The lm_head (a module named lm_head) is swapped only with
    include_lm_head (a tied lm_head gets its own quantized copy; the embedding stays full precision)."""
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
    for parent, child_name, _ in targets:
        lin = getattr(parent, child_name)
        setattr(parent, child_name, cls.from_linear(lin, group) if mode == "int4" else cls.from_linear(lin))
        del lin
    return model
