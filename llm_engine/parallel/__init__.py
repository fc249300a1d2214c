"""Tensor parallelism over the GPUs of one host (gloo processes on CPU): Megatron-style sharding
(sharding.py), the group and its collectives (group.py; one-shot all-reduce over CUDA IPC buffers for small
messages: one_shot.py, cuda_ipc.py), the per-step broadcast from rank 0 (channel.py, steps.py, runner.py) and the
worker processes (launch.py). Enabled by `EngineConfig(tensor_parallel=N)` / `voicefast serve --tensor-parallel N`."""

from llm_engine.parallel.random_checkpoint import RandomCheckpoint

__all__ = ["RandomCheckpoint"]
