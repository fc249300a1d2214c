"""The messages rank 0 sends its workers (llm_engine/parallel/channel.py), encoded to bytes.

    INIT   {"kwargs": the runner's constructor arguments}      -> each worker builds the same runner class
    EAGER  the step's StepInputs (a prefill or mixed step)     -> forward (+ lm_head) on the worker's shard
    GRAPH  b, the staging rows [b, w] of a decode graph step   -> copy into its staging buffer, replay bucket b
    CALL   {"fn": "module:function", "args": (...)}            -> fn(runner, *args) (checks, benchmarks)
    STOP                                                       -> the worker exits

GRAPH is the hot path (every decode step): raw int64 rows, no pickle. EAGER is generic over StepInputs and its
AttnMetadata: every tensor field must have been made by `ModelRunner._upload` from a host array (the rank-0
runner records them, `pack_inputs`), other fields travel as they are, per-request torch generators as None
(workers never sample: rank 0 samples from the gathered logits)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import torch

INIT, EAGER, GRAPH, CALL, STOP = range(5)


@dataclasses.dataclass(slots=True)
class _Array:
    a: np.ndarray


@dataclasses.dataclass(slots=True)
class _Dataclass:
    cls: type
    values: dict


def encode(kind: int, obj=None) -> bytes:
    return np.int64(kind).tobytes() + (b"" if obj is None else pickle.dumps(obj, protocol=5))


def encode_graph(b: int, rows: np.ndarray) -> bytes:
    """rows: int64 [b, w], the first w staging columns of the step's b rows."""
    return np.array([GRAPH, b, rows.shape[1]], np.int64).tobytes() + np.ascontiguousarray(rows).tobytes()


def decode(payload: memoryview) -> tuple[int, object]:
    kind = int(np.frombuffer(payload[:8], np.int64)[0])
    if kind == GRAPH:
        b, w = (int(v) for v in np.frombuffer(payload[8:24], np.int64))
        return kind, (b, np.frombuffer(payload[24:], np.int64).reshape(b, w))
    return kind, (pickle.loads(payload[8:]) if len(payload) > 8 else None)


def pack_inputs(value, arrays: dict[int, np.ndarray]):
    """StepInputs (or any field of it) -> a picklable tree; `arrays` maps id(tensor) -> the host array it came
    from (copied here: the runner reuses its host buffers next step)."""
    if isinstance(value, torch.Tensor):
        a = arrays.get(id(value))
        if a is None:
            raise RuntimeError("tensor-parallel step: a StepInputs tensor was not made by ModelRunner._upload, so it "
                               "cannot be sent to the worker ranks")
        return _Array(np.array(a))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _Dataclass(type(value), {f.name: pack_inputs(getattr(value, f.name), arrays)
                                        for f in dataclasses.fields(value)})
    if isinstance(value, list) and any(isinstance(v, torch.Generator) for v in value):
        return [None] * len(value)
    return value


def unpack_inputs(tree, to_tensor):
    """The inverse of pack_inputs on a worker: arrays become tensors through `to_tensor` (its runner's)."""
    if isinstance(tree, _Array):
        return to_tensor(tree.a)
    if isinstance(tree, _Dataclass):
        return tree.cls(**{k: unpack_inputs(v, to_tensor) for k, v in tree.values.items()})
    return tree
