"""TPGroup: this process's rank in the tensor-parallel group and the two collectives the sharded model needs —
all-reduce (row-parallel projections, embedding) and all-gather of vocabulary columns (lm_head).

Backends: NCCL on CUDA (captured in CUDA graphs like any kernel), gloo on CPU (tests, CPU-only hosts). On CUDA a
one-shot all-reduce over peer-to-peer buffers (llm_engine/parallel/one_shot.py) takes messages up to
`custom_max_bytes`; larger ones go to NCCL. NVLink multicast (NVLS) is never used: NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set in every process before NCCL starts (`no_multicast_env`)."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("llm_engine")
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def no_multicast_env() -> None:
    """Multicast can take a shared host's GPUs out of service: force it off, whatever the environment says."""
    os.environ.update(NO_MULTICAST_ENV)


class TPGroup:
    def __init__(self, rank: int, world: int, device: torch.device, pg=None):
        self.rank, self.world, self.device, self.pg = rank, world, torch.device(device), pg
        self.custom = None  # OneShotAllReduce, when enabled
        self._regions = None

    @classmethod
    def init(cls, rank: int, world: int, device: torch.device | str, init_method: str,
             timeout_s: float = 600.0) -> TPGroup:
        """Join the group (every rank calls this with the same init_method, e.g. tcp://127.0.0.1:PORT)."""
        no_multicast_env()
        device = torch.device(device)
        kw = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kw["device_id"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s), **kw)
        return cls(rank, world, device, dist.group.WORLD)

    # -- collectives -----------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (may return x itself, summed in place, or a new tensor)."""
        if self.world == 1:
            return x
        if self.custom is not None and self.custom.fits(x):
            return self.custom(x)
        dist.all_reduce(x, group=self.pg)
        return x

    def all_gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C] per rank -> [B, world * C]: rank r's columns at [r*C, (r+1)*C)."""
        if self.world == 1:
            return x
        x = x.contiguous()
        B, C = x.shape
        if x.is_cuda:
            out = torch.empty(self.world * B, C, dtype=x.dtype, device=x.device)  # [W*B, C]
            dist.all_gather_into_tensor(out, x, group=self.pg)
            return out.view(self.world, B, C).permute(1, 0, 2).reshape(B, self.world * C)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.pg)
        return torch.cat(parts, dim=1)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.pg)
        return box[0]

    # -- one-shot all-reduce over peer-to-peer buffers (CUDA) ------------------------------------------
    def enable_custom_all_reduce(self, max_bytes: int = 512 * 1024) -> bool:
        """Every rank calls this (collective); all ranks reach the same verdict. False (NCCL for every size)
        where triton, the driver library or peer-to-peer access between every pair of GPUs is missing."""
        if self.world == 1 or self.device.type != "cuda":
            return False
        reason = ""
        try:
            from llm_engine.parallel.cuda_ipc import CudaDriver, PeerRegions
            from llm_engine.parallel.one_shot import OneShotAllReduce, region_bytes

            drv = CudaDriver()
            OneShotAllReduce(torch.zeros(self.world, dtype=torch.int64), self.rank, self.world, max_bytes)
        except (ImportError, RuntimeError, ValueError) as e:
            reason = str(e)
        idx = self.all_gather_object(self.device.index)
        me = self.device.index
        for j in idx:  # the kernel reads peers' buffers and raises flags in their memory with atomics
            if reason or j == me:
                continue
            try:
                if not torch.cuda.can_device_access_peer(me, j):
                    reason = f"no peer-to-peer access from GPU {me} to GPU {j}"
                elif not drv.p2p_atomics(me, j):
                    reason = f"no peer-to-peer atomics from GPU {me} to GPU {j} (no NVLink?)"
            except RuntimeError as e:
                reason = str(e)
        reasons = [r for r in self.all_gather_object(reason) if r]
        if reasons:
            log.warning("one-shot all-reduce unavailable (%s): NCCL for every size", reasons[0])
            return False
        self._regions = PeerRegions(self.rank, self.world, self.device, region_bytes(max_bytes),
                                    self.all_gather_object)
        self.custom = OneShotAllReduce(self._regions.ptrs, self.rank, self.world, max_bytes)
        return True

    def close(self) -> None:
        if self._regions is not None:
            try:
                torch.cuda.synchronize(self.device)
                self._regions.close()
            except RuntimeError as e:  # a peer that already exited: its mapping goes with this process anyway
                log.warning("closing the peer-to-peer buffers: %s", e)
            self._regions, self.custom = None, None
        if dist.is_initialized():
            dist.destroy_process_group()
