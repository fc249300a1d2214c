"""The torch side of constrained decoding (llm_engine.grammar): which sampled rows are constrained this step,
their host bitmasks (pinned on CUDA, uploaded asynchronously) and the -inf fill of disallowed logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llm_engine.grammar import GrammarCompiler, GrammarState


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """In place: logits [S, V] float; rows: the k rows of logits to mask; bitmask [k, ceil(V / 32)] int32 on
    logits' device (bit j of word w allows token 32 w + j). Disallowed tokens get -inf."""
    k, words = bitmask.shape
    S, V = logits.shape
    if logits.device.type == "cpu":  # numpy unpacks bits ~10x faster than shift-and-mask tensor ops
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V]  # [k, V] uint8
        banned = torch.from_numpy(bits == 0)  # [k, V]
    else:
        shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # [32]
        banned = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(k, words * 32)[:, :V] == 0  # [k, V]
    if k == S and rows == list(range(S)):  # every row is constrained: no gather
        logits.masked_fill_(banned, float("-inf"))
        return
    r = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)  # [k]
    sub = logits.index_select(0, r)  # [k, V]
    sub.masked_fill_(banned, float("-inf"))
    logits.index_copy_(0, r, sub)


class MaskBuffer:
    """Host bitmask rows for one step (pinned on CUDA so the upload is asynchronous) and the device copy."""

    def __init__(self, max_rows: int, words: int, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        self.host = torch.zeros((max_rows, words), dtype=torch.int32, pin_memory=pin)  # [B, words]
        self.np = self.host.numpy()

    def masks_for(self, compiler: GrammarCompiler, states: list[GrammarState]) -> torch.Tensor:
        """Fill the masks of `states` (active) into rows 0..k-1 and return them [k, words] int32 on the device."""
        k = len(states)
        compiler.fill_bitmasks(states, self.np[:k])
        if self.device.type == "cpu":
            return self.host[:k]
        return self.host[:k].to(self.device, non_blocking=True)


def active_rows(seqs: list[Any], sample_rows: list[int]) -> tuple[list[GrammarState], list[int]]:
    """The grammar states of the sampled rows that are constrained this step, and their row indexes. A request
    with a grammar samples one row per step: it is never drafted (SamplingParams: speculation is off for it), as
    one state cannot mask the rows of a speculative verify."""
    states, rows = [], []
    prev = -1
    for j, i in enumerate(sample_rows):
        g = seqs[i].grammar
        if g is not None and i == prev:
            raise RuntimeError(f"constrained request {seqs[i].request_id!r} got speculative drafts")
        prev = i
        if g is not None and g.active:
            states.append(g)
            rows.append(j)
    return states, rows
