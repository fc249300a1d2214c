"""One host-to-device copy for an eager step's inputs (GpuModelRunner): the host arrays (token ids, positions, slots,
cu_seqlens, sequence lengths, block tables, sampling parameters, seeds) are packed into one pinned buffer, copied
with ONE non-blocking copy into a persistent device buffer, and handed out as typed device views.

Why: a non_blocking copy from ordinary (pageable) host memory is not asynchronous: CUDA stages it and makes the
host wait until the stream reaches it, so ten such copies per step were ten host round trips, and one issued
after the forward was queued (the sampler's seeds) made the host wait for the whole forward. From pinned memory
the copy is queued and the host moves on.

Reuse is safe without a per-step wait: the device buffer is only written by the next step's copy, which the
stream orders after this step's kernels; the pinned buffer is rewritten only after the event recorded behind the
previous copy has completed (already true whenever a step ended with its usual token read-back)."""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes: every section 16-byte aligned, as Triton specializes pointers on it (no variant per step)


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dt)).dtype


class PinnedUpload:
    def __init__(self, device: torch.device, capacity_bytes: int = 1 << 16):
        self.device = torch.device(device)
        self.capacity = 0
        self.num_copies = 0  # host-to-device copies issued (one per upload)
        self._copied: torch.cuda.Event | None = None
        self._grow(capacity_bytes)

    def _grow(self, nbytes: int) -> None:
        cap = max(nbytes, 2 * self.capacity)
        pin = self.device.type == "cuda"  # (a CPU device packs too: the tests check the layout there)
        self._host = torch.empty(cap, dtype=torch.uint8, pin_memory=pin)  # [cap] bytes, pinned on CUDA
        self._host_np = self._host.numpy()
        self._dev = torch.empty(cap, dtype=torch.uint8, device=self.device)  # [cap] bytes
        self.capacity = cap

    def upload(self, host: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """name -> host array (any shape, int/float dtypes, any strides) -> name -> contiguous device tensor of the
        same shape and dtype. The device tensors stay valid until the next upload's copy runs (stream order)."""
        layout, off = [], 0
        for name, a in host.items():
            nbytes = a.size * a.itemsize
            layout.append((name, a, off, nbytes))
            off += -(-nbytes // _ALIGN) * _ALIGN
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the pinned buffer (normally long done)
        if off > self.capacity:
            self._grow(off)  # the old device buffer is freed in stream order: queued kernels still read it safely
        for _, a, o, nbytes in layout:
            self._host_np[o:o + nbytes].view(a.dtype).reshape(a.shape)[...] = a
        self._dev[:off].copy_(self._host[:off], non_blocking=True)  # the step's one host-to-device copy
        if self.device.type == "cuda":
            self._copied = self._copied or torch.cuda.Event()
            self._copied.record()
        self.num_copies += 1
        out = {}
        for name, a, o, nbytes in layout:
            t = self._dev[o:o + nbytes].view(_torch_dtype(a.dtype))  # [a.size]
            out[name] = t if a.ndim == 1 else t.view(a.shape)
        return out
