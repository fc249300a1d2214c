"""The torch side of constrained decoding (llm_engine.grammar): which sampled rows are constrained this step,
their host bitmasks (pinned on CUDA, uploaded asynchronously) and the -inf fill of disallowed logits."""

from __future__ import annotations

from typing import Any

import torch

from llm_engine.grammar import GrammarCompiler, GrammarState


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [S, V] float; rows [k] int64 (rows of logits to mask); bitmask [k, ceil(V / 32)] int32
    (bit j of word w allows token 32 w + j). Disallowed tokens get -inf."""
    k, words = bitmask.shape
    V = logits.shape[1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # [32]
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(k, words * 32)[:, :V].bool()  # [k, V]
    sub = logits.index_select(0, rows)  # [k, V]
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)


class MaskBuffer:
    """Host bitmask rows for one step (pinned on CUDA so the upload is asynchronous) and the device copy."""

    def __init__(self, max_rows: int, words: int, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        self.host = torch.zeros((max_rows, words), dtype=torch.int32, pin_memory=pin)  # [B, words]
        self.np = self.host.numpy()

    def masks_for(self, compiler: GrammarCompiler, states: list[GrammarState], rows: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the masks of `states` (active) and return (rows [k] int64, bitmask [k, words] int32) on device."""
        k = len(states)
        compiler.fill_bitmasks(states, self.np[:k])
        r = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cpu":
            return r, self.host[:k]
        return r.to(self.device, non_blocking=True), self.host[:k].to(self.device, non_blocking=True)


def active_rows(seqs: list[Any], sample_rows: list[int]) -> tuple[list[GrammarState], list[int]]:
    """The grammar states of the sampled rows that are constrained this step, and their row indexes."""
    states, rows = [], []
    for j, i in enumerate(sample_rows):
        g = seqs[i].grammar
        if g is not None and g.active:
            states.append(g)
            rows.append(j)
    return states, rows
