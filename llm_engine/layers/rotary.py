"""Rotary position embedding tables: one [max_pos, rot_dim] float32 table (cos half | sin half) built once per
model, indexed by position inside ops.rotary_store_kv. Supports default, "linear" and "llama3" frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(rot_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """[rot_dim/2] float32 inverse frequencies 1 / theta^(2i/rot_dim), optionally rescaled."""
    inv = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)  # [rot/2]
    if not scaling:
        return inv.float()  # explicit dtypes: the table stays float32 whatever the default dtype
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return (inv / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()
    if kind == "default":
        return inv.float()
    raise ValueError(f"unsupported rope type {kind!r}")


def build_cos_sin(rot_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Table [max_positions, rot_dim] float32: row p = cos(p * f) | sin(p * f) over the rot_dim/2 frequencies f."""
    inv = inv_frequencies(rot_dim, theta, scaling)  # [rot/2]
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)  # [P, rot/2]
    table = torch.cat((angles.cos(), angles.sin()), dim=-1)  # [P, rot_dim]
    return table if device is None else table.to(device)
