"""TPGroup: this process's rank in the tensor-parallel group and the two collectives the sharded model needs —
all-reduce (row-parallel projections, embedding) and all-gather of vocabulary columns (lm_head).

Backends: NCCL on CUDA (captured in CUDA graphs like any kernel), gloo on CPU (tests, CPU-only hosts). On CUDA a
one-shot all-reduce over peer-to-peer buffers (llm_engine/parallel/one_shot.py) takes messages up to
`custom_max_bytes`; larger ones go to NCCL. NVLink multicast (NVLS) is never used: NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set in every process before NCCL starts (`no_multicast_env`)."""

from __future__ import annotations

import logging
import os
import threading
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
        self.custom_reason = "not set up"  # why the one-shot all-reduce is off ('' when on)
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
    def enable_custom_all_reduce(self, max_bytes: int = 256 * 1024, open_regions=None) -> bool:
        """Every rank calls this (collective); all ranks reach the same verdict and never raise: False (NCCL for
        every size, `custom_reason` says why) where a precondition is missing or the set-up or its self-test
        fails (llm_engine/parallel/one_shot_setup.py). open_regions: tests only (CPU stand-ins for CUDA IPC)."""
        if self.world == 1 or (self.device.type != "cuda" and open_regions is None):
            self.custom_reason = "one rank" if self.world == 1 else "not on CUDA"
            return False
        from llm_engine.parallel.one_shot_setup import setup_one_shot

        self.custom, self._regions, reason = setup_one_shot(self, max_bytes, open_regions)
        self.custom_reason = reason
        if reason:
            log.warning("one-shot all-reduce unavailable (%s): NCCL for every size", reason)
        return self.custom is not None

    def close(self, destroy: bool = True, destroy_timeout_s: float = 20.0) -> bool:
        """Release the peer buffers and leave the process group. Destroying an NCCL communicator is collective
        (every rank of the host must take part), so every rank calls close() at the same point; it is bounded
        by destroy_timeout_s (a peer that is gone or stuck: the group is left behind, logged, and False is
        returned). destroy=False: a peer is known to be gone, do not even try. This rank's own one-shot buffer
        is freed only after the group is left (the peers have passed their last kernel by then) or the peers
        are gone; otherwise it stays allocated (1 MiB) rather than be freed under a peer still reading it."""
        regions, self._regions, custom, self.custom = self._regions, None, self.custom, None
        if regions is not None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                n = custom.timeouts()
                if n:
                    log.error("the one-shot all-reduce gave up waiting for a peer %d time(s): those sums were wrong", n)
                regions.close_peers()
            except Exception as e:  # noqa: BLE001 - a broken context or a peer gone: the mappings go with the process
                log.warning("closing the peer-to-peer buffers: %s", e)
        left = self._leave(destroy, destroy_timeout_s)
        if regions is not None and (left or not destroy):
            try:
                regions.close()
            except RuntimeError as e:
                log.warning("freeing the peer-to-peer buffer: %s", e)
        return left

    def _leave(self, destroy: bool, timeout_s: float) -> bool:
        if not dist.is_initialized():
            return True
        if not destroy:
            log.warning("tensor-parallel rank %d: a peer is gone; the process group is left to process exit",
                        self.rank)
            return False
        done, failed = threading.Event(), []

        def run():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - reported below
                failed.append(e)
            finally:
                done.set()

        threading.Thread(target=run, name="tp-destroy-group", daemon=True).start()
        if not done.wait(timeout_s):
            log.error("tensor-parallel rank %d: leaving the process group did not finish in %.0f s (a peer rank "
                      "gone or stuck?); left behind", self.rank, timeout_s)
            return False
        if failed:
            log.error("tensor-parallel rank %d: leaving the process group failed: %s", self.rank, failed[0])
            return False
        return True
