"""One pre-norm decoder for the Llama, GLM and GLM-4 families, chosen by ModelConfig flags:
qkv bias (attention_bias), partial rotary (rot_dim), GLM-4's post-branch norms (post_branch_norms), tied lm_head.

Seam (docs/interfaces.md): model(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, H];
model.compute_logits(hidden [B, H]) -> [B, vocab] float32. Module names follow the HF checkpoints
(model.layers.N.self_attn.qkv_proj, mlp.gate_up_proj, ...), so quantization can swap nn.Linear by name."""

from __future__ import annotations

import torch
from torch import nn

from llm_engine import ops
from llm_engine.attn_metadata import AttnMetadata
from llm_engine.layers.attention import Attention
from llm_engine.layers.linear import Embedding, Linear
from llm_engine.layers.mlp import GatedMLP
from llm_engine.layers.rmsnorm import RMSNorm
from llm_engine.layers.rotary import build_cos_sin
from llm_engine.model_config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, n_kv, head_dim]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.post_branch_norms = cfg.post_branch_norms
        if cfg.post_branch_norms:  # GLM-4 sandwich norms on the branch outputs
            self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, kv: KVCache,
                meta: AttnMetadata, cos_sin: torch.Tensor, h_norm: RMSNorm | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, RMSNorm | None]:
        """h: the previous layer's branch output [T, H], not yet added to residual [T, H] (None on layer 0);
        h_norm: the previous layer's post-branch norm (GLM-4), not yet applied to h.
        Returns (this layer's MLP branch output, the residual stream before it is added, the norm still to
        apply to that output or None): each post-branch norm runs fused with the following add + norm."""
        x, residual = add_norm(h, h_norm, residual, self.input_layernorm)
        a = self.self_attn(x, positions, kv[0], kv[1], meta, cos_sin)  # [T, H]
        # GLM-4: the post-branch norm applies to the branch output BEFORE the residual add.
        x, residual = add_norm(a, self.post_self_attn_layernorm if self.post_branch_norms else None, residual,
                               self.post_attention_layernorm)
        m = self.mlp(x)  # [T, H]
        return m, residual, self.post_mlp_layernorm if self.post_branch_norms else None


def add_norm(h: torch.Tensor, h_norm: RMSNorm | None, residual: torch.Tensor | None,
             norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h' + residual), h' + residual) with h' = h_norm(h) when given: one fused op either way."""
    if h_norm is None or residual is None:
        if h_norm is not None:
            h = h_norm(h)
        return norm.add_forward(h, residual)
    return ops.norm_add_rms_norm(h, h_norm.weight, residual, norm.weight, norm.eps)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)  # [V, H]
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttnMetadata, cos_sin: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, H]
        residual, h_norm = None, None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            h, residual, h_norm = layer(h, residual, positions, kv, meta, cos_sin, h_norm)
        return add_norm(h, h_norm, residual, self.norm)[0]  # [T, H]


class CausalLM(nn.Module):
    """The whole model: `forward` returns final hidden states, `compute_logits` projects the rows you pick."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # W [V, H]
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        max_pos = cfg.max_position_embeddings
        self.register_buffer("cos_sin", build_cos_sin(cfg.rot_dim, max_pos, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)  # [max_pos, rot_dim] float32

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttnMetadata) -> torch.Tensor:
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(f"expected {self.config.num_layers} (k, v) caches, got {len(kv_caches)}")
        return self.model(input_ids, positions, kv_caches, meta, self.cos_sin)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, vocab] float32."""
        return self.lm_head(hidden).float()


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CausalLM:
    """An uninitialised model (weights from load_weights or init_random_weights) in eval mode, grads off.
    dtype None -> cfg.dtype. Parameters are allocated once, directly on device in dtype (no init pass, no
    float32 detour); the rotary table stays float32."""
    dtype = dtype or cfg.dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    return model
