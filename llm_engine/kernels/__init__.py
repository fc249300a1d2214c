"""Triton kernels for the GPU decode path. One file per kernel; each has a launcher and a plain-torch
`reference_*` that defines what it computes (tests compare the two, on CPU under TRITON_INTERPRET=1).

Importing this package imports triton; llm_engine.ops imports it lazily, only for CUDA tensors."""
