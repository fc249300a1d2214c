"""Weights into a CausalLM: `load_weights` maps Hugging Face tensor names onto our fused modules
(q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj), permutes NeoX-layout q/k rows into the interleaved
rotary layout the model runs, and checks that every parameter was filled exactly once.
`init_random_weights` gives real shapes with small weights for benchmarks and tests."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from llm_engine.model_config import ModelConfig
from llm_engine.models.decoder import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF sub-name -> (our sub-name, which slice: "q" | "k" | "v" | "gate" | "up" | None = whole tensor)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|\.masked_bias$|\.attn\.bias$")


def neox_to_interleaved_rows(w: torch.Tensor, n_heads: int, head_dim: int, rot_dim: int) -> torch.Tensor:
    """Reorder q/k projection rows (weight [n_heads*head_dim, ...] or bias [n_heads*head_dim]) so that NeoX pairs
    (i, i + rot/2) become adjacent pairs (2i, 2i+1): attention scores are unchanged, rotary runs interleaved."""
    half = rot_dim // 2
    perm = torch.arange(head_dim)
    perm[:rot_dim] = torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).flatten()
    rows = w.view(n_heads, head_dim, *w.shape[1:])
    return rows[:, perm].reshape(w.shape)


def _slices(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, inter), "up": (inter, 2 * inter)}


@torch.no_grad()
def load_weights(model: CausalLM, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a Hugging Face-named state dict into model (casting to the model's dtype). Raises ValueError on
    unknown names, wrong shapes, or parameters left unfilled; the model is only trusted after it returns."""
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    slices = _slices(cfg)
    filled: dict[str, int] = {}  # our param name -> rows filled
    for name, tensor in state_dict.items():
        if _IGNORED.search(name):
            continue
        target, part = name, None
        m = _LAYER.match(name)
        if m:
            sub, leaf = m.group(2).rsplit(".", 1)
            if sub in _FUSED:
                fused, part = _FUSED[sub]
                target = f"model.layers.{m.group(1)}.{fused}.{leaf}"
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding provides it
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the {cfg.family} model")
        dest = params[target]
        if part is not None:
            lo, hi = slices[part]
            dest = dest[lo:hi]
            if part in ("q", "k") and not cfg.rope_interleaved:
                heads = cfg.num_heads if part == "q" else cfg.num_kv_heads
                if tensor.shape[0] == heads * cfg.head_dim:
                    tensor = neox_to_interleaved_rows(tensor, heads, cfg.head_dim, cfg.rot_dim)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {target} {tuple(dest.shape)}")
        dest.copy_(tensor)
        filled[target] = filled.get(target, 0) + (dest.shape[0] if dest.dim() else 1)
    missing = [n for n, p in params.items() if filled.get(n, 0) != (p.shape[0] if p.dim() else 1)
               and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise ValueError(f"checkpoint leaves {len(missing)} parameters unfilled, e.g. {missing[:4]}")


@torch.no_grad()
def init_random_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> CausalLM:
    """Deterministic random weights with real shapes: N(0, std) projections/embeddings, N(0, std) biases,
    norms at 1 +- 0.1, so activations stay in a sane range through many layers."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            vals = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            vals = std * torch.randn(p.shape, generator=gen)
        p.copy_(vals.to(p.dtype))
    return model
