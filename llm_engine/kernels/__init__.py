"""Triton kernels for the GPU decode path. One file per kernel; each has a launcher and a plain-torch
`reference_*` that defines what it computes (tests compare the two, on CPU under TRITON_INTERPRET=1).

Importing this package imports triton; llm_engine.ops imports it lazily, only for CUDA tensors."""

import os

_GEMV = [os.environ.get("VOICEFAST_DISABLE_GEMV", "") != "1"]


def gemv_enabled() -> bool:
    """Decode-sized CUDA linears may take the Triton GEMV (kernels/gemv.py) where it beats cuBLAS; set
    VOICEFAST_DISABLE_GEMV=1 (or set_gemv_enabled(False), for A/B benchmarks) to keep cuBLAS everywhere."""
    return _GEMV[0]


def set_gemv_enabled(on: bool) -> None:
    _GEMV[0] = bool(on)


PREFILL_ATTN_BACKENDS = ("triton", "sdpa")
# "triton" by default since bench/prefill_gpu.py's A/B on an H200 (52ec6cc, docs/gpu.md): 1.2-8.6x faster steps
# than the SDPA loop (32 x 24 new tokens: 26 vs 207 ms for SmolLM2, 31 vs 267 ms for the GLM-4-9B shape), no
# cuDNN graph build per new shape (the loop's first steps of a new length took up to 0.7-1.6 s), same argmax on
# 15 of 17 rows (bf16 ties). "sdpa" keeps the old path.
_PREFILL = [os.environ.get("VOICEFAST_PREFILL_ATTN", "triton") or "triton"]


def prefill_attention_backend() -> str:
    """How CUDA steps with prefill rows attend: "triton" (kernels/prefill_attention.py, one launch per layer for all
    sequences; the default) or "sdpa" (torch SDPA per sequence over gathered KV: the old path).
    Set by VOICEFAST_PREFILL_ATTN or set_prefill_attention_backend; any other value is an error."""
    if _PREFILL[0] not in PREFILL_ATTN_BACKENDS:
        raise ValueError(f"VOICEFAST_PREFILL_ATTN must be one of {PREFILL_ATTN_BACKENDS}, got {_PREFILL[0]!r}")
    return _PREFILL[0]


def set_prefill_attention_backend(name: str) -> None:
    if name not in PREFILL_ATTN_BACKENDS:
        raise ValueError(f"prefill attention backend must be one of {PREFILL_ATTN_BACKENDS}, got {name!r}")
    _PREFILL[0] = name
