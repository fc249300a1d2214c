"""RandomCheckpoint: a checkpoint of random weights for any ModelConfig, named like a Hugging Face one, for
benchmarks and tests at real shapes without downloading a model. Each tensor is drawn on the given device from
a generator seeded by (seed, tensor name), so every rank of a tensor-parallel group sees the same full tensors
(and takes its slice), and a TP=1 engine loads exactly the weights a TP=2 engine splits.

Pass it as `EngineConfig(model=RandomCheckpoint(cfg))`; norms ~ N(1, 0.1), everything else ~ N(0, std). It has no
tokenizer (token ids only) unless `tokenizer` names a checkpoint dir or .gguf to take a real one from (its vocabulary
must fit the config's vocab_size): random weights, real text in and out."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llm_engine.model_config import ModelConfig


@dataclass(frozen=True)
class RandomCheckpoint:
    config: ModelConfig
    seed: int = 0
    std: float = 0.02
    tokenizer: str | None = None  # a checkpoint dir (tokenizer.json) or .gguf whose tokenizer the engine uses

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(Hugging Face name, shape) of every tensor the checkpoint holds."""
        c = self.config
        H, q, kv, inter = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c.vocab_size, H))]
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out.append((p + f"self_attn.{name}.weight", (rows, H)))
                if c.attention_bias:
                    out.append((p + f"self_attn.{name}.bias", (rows,)))
            out.append((p + "self_attn.o_proj.weight", (H, q)))
            if c.o_proj_bias:
                out.append((p + "self_attn.o_proj.bias", (H,)))
            out += [(p + "mlp.gate_proj.weight", (inter, H)), (p + "mlp.up_proj.weight", (inter, H)),
                    (p + "mlp.down_proj.weight", (H, inter))]
            if c.post_branch_norms:
                out += [(p + "post_self_attn_layernorm.weight", (H,)), (p + "post_mlp_layernorm.weight", (H,))]
        out.append(("model.norm.weight", (H,)))
        if not c.tie_word_embeddings:
            out.append(("lm_head.weight", (c.vocab_size, H)))
        return out

    def tensors(self, device: torch.device | str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one at a time, drawn on `device` in float32 and cast to dtype."""
        for name, shape in self.shapes():
            g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            t = torch.empty(shape, dtype=torch.float32, device=device)
            if name.endswith("norm.weight"):
                t.normal_(1.0, 0.1, generator=g)
            else:
                t.normal_(0.0, self.std, generator=g)
            yield name, t.to(dtype)
