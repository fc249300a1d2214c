"""Megatron-style tensor-parallel sharding of the decoder (Llama, GLM, GLM-4) over `tp` ranks.

Each rank builds the SAME CausalLM class from a per-rank ModelConfig (`shard_config`: its query heads, its KV
heads, its slice of the MLP, its slice of the vocabulary) and loads a per-rank slice of every checkpoint tensor
(`ShardedCheckpoint`, Hugging Face names in, Hugging Face names out, so `load_weights` fuses and permutes as
usual). Then `parallelize` wraps the four modules whose outputs need the other ranks:

- column-parallel (no communication): qkv_proj (rows of this rank's q, k and v heads) and gate_up_proj (this
  rank's gate rows, then its up rows) — attention and SiLU*up run on local heads / local columns;
- row-parallel: o_proj and down_proj take this rank's input columns; their partial sums are all-reduced
  (`RowParallel`); a bias is added once (rank 0 keeps it, the others hold zeros);
- vocab-parallel: the embedding holds rows [r*Vp, (r+1)*Vp) of the vocabulary padded to a multiple of tp; ids
  outside give zeros and the ranks' rows are all-reduced (`VocabParallelEmbedding`); the lm_head's local logits
  are all-gathered and the padding dropped (`VocabParallelHead`).

KV heads: with num_kv_heads >= tp each rank holds num_kv_heads/tp of them; with fewer (tp a multiple of
num_kv_heads) each rank holds the one KV head its query heads use (replicated, as Megatron/vLLM do)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from llm_engine.model_config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.\d+\.(.+)$")


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def check_shardable(cfg: ModelConfig, tp: int) -> None:
    """ValueError naming the field that `tp` does not divide."""
    if tp < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
    if cfg.num_heads % tp:
        raise ValueError(f"tensor_parallel={tp} must divide num_attention_heads ({cfg.num_heads})")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel={tp} and num_key_value_heads ({cfg.num_kv_heads}) must divide one "
                         f"another")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tensor_parallel={tp} must divide intermediate_size ({cfg.intermediate_size})")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The architecture one rank builds: its heads, KV heads, MLP width and vocabulary slice."""
    check_shardable(cfg, tp)
    return replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
                   intermediate_size=cfg.intermediate_size // tp, vocab_size=padded_vocab(cfg.vocab_size, tp) // tp)


def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return t[lo:hi]


class ShardedCheckpoint(Mapping):
    """A lazy view of a full Hugging Face-named checkpoint as rank `rank`'s slice of it. `tensors` is a mapping or
    an iterable of (name, full tensor) pairs (iterated once, so a generator of random tensors works)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig,
                 rank: int, tp: int):
        check_shardable(cfg, tp)
        self.tensors, self.cfg, self.rank, self.tp = tensors, cfg, rank, tp
        d = cfg.head_dim
        qh = cfg.num_heads // tp
        self.q = (rank * qh * d, (rank + 1) * qh * d)
        kvh = max(1, cfg.num_kv_heads // tp)
        first_kv = rank * cfg.num_kv_heads // tp  # replicated KV: the head this rank's query heads use
        self.kv = (first_kv * d, (first_kv + kvh) * d)
        inter = cfg.intermediate_size // tp
        self.mlp = (rank * inter, (rank + 1) * inter)
        vp = padded_vocab(cfg.vocab_size, tp) // tp
        self.vocab = (rank * vp, (rank + 1) * vp)

    def __getitem__(self, name: str) -> torch.Tensor:
        raise KeyError(name)  # only iterated (load_weights uses items())

    def __len__(self) -> int:
        return len(self.tensors) if isinstance(self.tensors, Mapping) else 0

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        pairs = self.tensors.items() if isinstance(self.tensors, Mapping) else self.tensors
        for name, t in pairs:
            yield name, self.shard(name, t)

    def shard(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Rank's slice of one full tensor (contiguous)."""
        cfg = self.cfg
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            lo, hi = self.vocab
            out = t[lo:min(hi, t.shape[0])]
            if out.shape[0] < hi - lo:  # the vocabulary padding: zero rows, never selected
                out = torch.cat([out, out.new_zeros(hi - lo - out.shape[0], *t.shape[1:])])
            return out.contiguous()
        m = _LAYER.match(name)
        if not m:
            return t
        sub = m.group(1)
        q, kv, mlp = self.q, self.kv, self.mlp
        if sub.startswith("self_attn.q_proj."):
            return _rows(t, *q).contiguous()
        if sub.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            return _rows(t, *kv).contiguous()
        if sub.startswith("self_attn.qkv_proj."):  # fused [q; k; v] rows
            qs, ks = cfg.q_size, cfg.kv_size
            parts = (t[:qs], t[qs:qs + ks], t[qs + ks:])
            return torch.cat([_rows(parts[0], *q), _rows(parts[1], *kv), _rows(parts[2], *kv)]).contiguous()
        if sub == "self_attn.o_proj.weight":
            return t[:, q[0]:q[1]].contiguous()
        if sub == "self_attn.o_proj.bias":
            return t if self.rank == 0 else torch.zeros_like(t)  # added once, after the all-reduce sums ranks
        if sub.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            return _rows(t, *mlp).contiguous()
        if sub.startswith("mlp.gate_up_proj."):  # fused [gate; up] rows
            i = cfg.intermediate_size
            return torch.cat([_rows(t[:i], *mlp), _rows(t[i:], *mlp)]).contiguous()
        if sub == "mlp.down_proj.weight":
            return t[:, mlp[0]:mlp[1]].contiguous()
        return t


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's input columns, partial output summed over ranks."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.inner(x))  # [T, H]


class VocabParallelEmbedding(nn.Module):
    """Rows [first, first + rows) of the (padded) vocabulary; other ids contribute zeros to the all-reduce."""

    def __init__(self, inner: nn.Embedding, group, first: int):
        super().__init__()
        self.inner, self.group, self.first = inner, group, first
        self.rows = inner.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first  # [T]
        outside = (local < 0) | (local >= self.rows)  # [T] bool
        h = F.embedding(local.masked_fill(outside, 0), self.inner.weight)  # [T, H]
        return self.group.all_reduce(h.masked_fill(outside[:, None], 0))


class VocabParallelHead(nn.Module):
    """Local logits [B, Vp] gathered from every rank into [B, vocab] (the padding dropped)."""

    def __init__(self, inner: nn.Module, group, vocab_size: int):
        super().__init__()
        self.inner, self.group, self.vocab_size = inner, group, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.inner(hidden)  # [B, Vp]
        return self.group.all_gather_cols(local)[:, :self.vocab_size]  # [B, V]


def parallelize(model: nn.Module, group, full_cfg: ModelConfig) -> nn.Module:
    """Wrap a loaded (and possibly quantized) rank model in place; `model.config` becomes the rank's config with
    the full vocabulary (the engine validates token ids and samples over it). Returns model."""
    for layer in model.model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
    emb = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(emb, group, group.rank * emb.weight.shape[0])
    model.lm_head = VocabParallelHead(model.lm_head, group, full_cfg.vocab_size)
    model.config = replace(model.config, vocab_size=full_cfg.vocab_size)
    model.tensor_parallel = group
    return model
