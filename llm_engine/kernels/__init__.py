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
