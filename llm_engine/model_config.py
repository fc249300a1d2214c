"""ModelConfig: the architecture facts of one decoder checkpoint (Llama, GLM, GLM-4), read from a Hugging Face
config.json (`from_hf_config`) or from GGUF metadata (llm_engine.gguf_loader). The model is built from it alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FAMILIES = ("llama", "glm", "glm4")
_ARCH_TO_FAMILY = {"LlamaForCausalLM": "llama", "GlmForCausalLM": "glm", "Glm4ForCausalLM": "glm4"}
_MODEL_TYPE_TO_FAMILY = {"llama": "llama", "glm": "glm", "glm4": "glm4"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class ModelConfig:
    family: str  # "llama" | "glm" | "glm4"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # rotary on the first head_dim * factor dims of q and k (GLM: 0.5)
    # Checkpoint layout of q/k rows: True = GPT-J adjacent pairs (GLM, raw GGUF llama q/k), False = NeoX halves
    # (HF Llama). The model always runs interleaved; load_weights permutes NeoX rows once at load.
    rope_interleaved: bool = False
    rope_scaling: dict[str, Any] | None = None  # HF rope_parameters for "linear" / "llama3"; None = default
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False  # bias on o_proj (HF Llama's attention_bias covers it; GLM never has one)
    post_branch_norms: bool = False  # GLM-4: RMSNorm on attention/MLP branch outputs before the residual add
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    dtype: torch.dtype = torch.float32  # the checkpoint's storage dtype

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rot_dim % 2 or self.rot_dim <= 0:
            raise ValueError(f"rotary dim head_dim*partial_rotary_factor must be even and > 0, got {self.rot_dim}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rt not in ROPE_TYPES:
                raise ValueError(f"rope type {rt!r} is not supported (supported: {ROPE_TYPES})")
        self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {self.dtype!r}")

    @property
    def rot_dim(self) -> int:
        """Number of leading head dims that rotate (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face config.json dict (LlamaForCausalLM / GlmForCausalLM / Glm4ForCausalLM) to a ModelConfig.

        Accepts both the transformers-5 `rope_parameters` block and the older top-level `rope_theta` /
        `partial_rotary_factor` / `rope_scaling` keys. Raises ValueError naming the offending field."""
        if not isinstance(cfg, dict):
            raise ValueError(f"expected a config dict, got {type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        family = next((_ARCH_TO_FAMILY[a] for a in archs if a in _ARCH_TO_FAMILY), None)
        if family is None:
            family = _MODEL_TYPE_TO_FAMILY.get(cfg.get("model_type", ""))
        if family is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                             f"{sorted(_ARCH_TO_FAMILY)}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act must be silu, got {act!r}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        try:
            hidden = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            fields = dict(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                          intermediate_size=int(cfg["intermediate_size"]),
                          num_layers=int(cfg["num_hidden_layers"]), num_heads=n_heads)
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.json has a non-integer size field (hidden_size, ...): {e}") from None
        rope = dict(cfg.get("rope_parameters") or {})
        legacy_scaling = cfg.get("rope_scaling")
        if legacy_scaling:
            rope = {**legacy_scaling, **rope}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        default_factor = 0.5 if family in ("glm", "glm4") else 1.0  # GLM's BC default
        factor = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_factor)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        dt = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        if dt not in _DTYPES:
            raise ValueError(f"unsupported checkpoint dtype {dt!r} (supported: {sorted(_DTYPES)})")
        return cls(
            family=family, **fields,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family == "llama" else 1.5625e-07)),
            rope_theta=theta, partial_rotary_factor=factor,
            rope_interleaved=family in ("glm", "glm4"),
            rope_scaling=scaling,
            attention_bias=bool(cfg.get("attention_bias", family in ("glm", "glm4"))),
            o_proj_bias=family == "llama" and bool(cfg.get("attention_bias", False)),
            post_branch_norms=family == "glm4",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            dtype=_DTYPES[dt],
        )

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (dtype as its name) that `from_json_dict` reads back."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("dtype") not in _DTYPES:
            raise ValueError(f"unsupported dtype {d.get('dtype')!r}")
        d["dtype"] = _DTYPES[d["dtype"]]
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)
