"""Peer-to-peer buffers between the GPUs of one host through CUDA IPC, with the CUDA driver API over ctypes
(libcuda.so.1 ships with every NVIDIA driver; no compiled extension, no torch symmetric memory, no multicast).

Each rank allocates one region with cuMemAlloc (outside torch's caching allocator, so the region IS an allocation
base and its IPC handle covers exactly it), zeroes it, exports a handle; the ranks exchange handles through the
process group; each rank opens its peers' handles in its own device's context (cuIpcOpenMemHandle with lazy peer
access) and ends up with every region's address in its own address space: `PeerRegions.ptrs`, int64 [W] on its
GPU, for the kernels.

The handle is a 64-byte struct (CUipcMemHandle) passed BY VALUE to cuIpcOpenMemHandle. It is opaque binary
(NUL bytes included): it is kept as a ctypes array of unsigned bytes and moved with bytes(struct) /
from_buffer_copy — a `c_char` array field would read back as a NUL-terminated, truncated `bytes`, and writing
into that temporary leaves the struct zeroed (the driver then answers "invalid argument").

Torch's own CUDA IPC (torch.multiprocessing: storage._share_cuda_ / _new_shared_cuda) is not used: it maps a
peer's memory in the context of the PEER's device (a second context in this process, and kernels of this device
would need peer access enabled by hand), where the kernels here need it mapped in this device's context.

Setting up is collective and fails the same way on every rank: a local failure (export or open) is gathered, and
every rank raises the first one, after the same number of exchanges (so the process group stays in step)."""

from __future__ import annotations

import contextlib
import ctypes

import torch

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED = 3
HANDLE_BYTES = 64


class IpcHandle(ctypes.Structure):
    """CUipcMemHandle: 64 opaque bytes (unsigned: NUL bytes are data, not a terminator)."""
    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]


class CudaDriver:
    def __init__(self, path: str = "libcuda.so.1"):
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise RuntimeError(f"CUDA IPC needs the NVIDIA driver's libcuda.so.1: {e}") from e
        L = self.lib
        L.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        L.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        L.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        L.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        L.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]
        L.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(IpcHandle), ctypes.c_uint64]
        # cuda.h maps cuIpcOpenMemHandle to the _v2 entry point (same signature); the handle goes by value
        self._open = getattr(L, "cuIpcOpenMemHandle_v2", None) or L.cuIpcOpenMemHandle
        self._open.argtypes = [ctypes.POINTER(ctypes.c_uint64), IpcHandle, ctypes.c_uint]
        L.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
        L.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        L.cuDeviceGetP2PAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int, ctypes.c_int]
        for fn in ("cuGetErrorString", "cuCtxGetCurrent", "cuMemAlloc_v2", "cuMemFree_v2", "cuMemsetD8_v2",
                   "cuIpcGetMemHandle", "cuIpcCloseMemHandle", "cuDeviceGet", "cuDeviceGetP2PAttribute"):
            getattr(L, fn).restype = ctypes.c_int
        self._open.restype = ctypes.c_int

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")

    def require_context(self) -> None:
        """The driver calls act on the calling thread's current context (torch's primary context of the device)."""
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise RuntimeError("no CUDA context is current in this thread (call torch.cuda.set_device and run "
                               "one CUDA operation first)")

    def p2p_atomics(self, src_ordinal: int, dst_ordinal: int) -> bool:
        """Can GPU src do atomics on GPU dst's memory (NVLink: yes; PCIe: usually not)?"""
        src, dst, v = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(src), src_ordinal), "cuDeviceGet")
        self.check(self.lib.cuDeviceGet(ctypes.byref(dst), dst_ordinal), "cuDeviceGet")
        self.check(self.lib.cuDeviceGetP2PAttribute(ctypes.byref(v), CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED,
                                                    src.value, dst.value), "cuDeviceGetP2PAttribute")
        return bool(v.value)

    def alloc_zeroed(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(p), nbytes), "cuMemAlloc")
        self.check(self.lib.cuMemsetD8_v2(p.value, 0, nbytes), "cuMemsetD8")
        return p.value

    def free(self, ptr: int) -> None:
        self.check(self.lib.cuMemFree_v2(ptr), "cuMemFree")

    def export(self, ptr: int) -> bytes:
        """The IPC handle of an allocation base (64 bytes, NULs included)."""
        h = IpcHandle()
        self.check(self.lib.cuIpcGetMemHandle(ctypes.byref(h), ptr), "cuIpcGetMemHandle")
        return bytes(h)

    def open(self, handle: bytes) -> int:
        """Map a peer's allocation (its exported handle) in the current context; returns its address here."""
        if len(handle) != HANDLE_BYTES:
            raise ValueError(f"a CUDA IPC handle is {HANDLE_BYTES} bytes, got {len(handle)}")
        h = IpcHandle.from_buffer_copy(handle)
        p = ctypes.c_uint64()
        self.check(self._open(ctypes.byref(p), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
        return p.value

    def close(self, ptr: int) -> None:
        self.check(self.lib.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")


def _first_error(gathered: list) -> str:
    return next((e for e in gathered if e), "")


class PeerRegions:
    """One zeroed region of `nbytes` per rank, every one addressable from this process (`ptrs`, int64 [W]).
    Collective: every rank constructs it with the same nbytes; on any rank's failure every rank raises
    RuntimeError (the first failure's message) and nothing stays allocated or mapped."""

    def __init__(self, rank: int, world: int, device: torch.device, nbytes: int, all_gather_object,
                 driver: CudaDriver | None = None):
        """all_gather_object(obj) -> list of every rank's obj (the process group's object all-gather)."""
        self.rank, self.world, self.own, self.peers = rank, world, 0, {}
        self.drv = driver
        handle, err = None, ""
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                torch.cuda.synchronize(device)  # the primary context exists and is current on this thread
            self.drv = self.drv or CudaDriver()
            self.drv.require_context()
            self.own = self.drv.alloc_zeroed(nbytes)
            handle = self.drv.export(self.own)
        except (RuntimeError, OSError, ValueError) as e:
            err = f"rank {rank}: {e}"
        exchanged = all_gather_object((handle, err))  # [(handle, error)] per rank
        err = _first_error([e for _, e in exchanged])
        if not err:
            mine = ""
            try:
                for r, (h, _) in enumerate(exchanged):
                    if r != rank:
                        self.peers[r] = self.drv.open(h)
            except (RuntimeError, ValueError) as e:
                mine = f"rank {rank}: {e}"
            err = _first_error(all_gather_object(mine))  # also the barrier: every rank mapped every region
        if err:
            self.close()
            raise RuntimeError(err)
        self.addrs = [self.own if r == rank else self.peers[r] for r in range(world)]
        self.ptrs = torch.tensor(self.addrs, dtype=torch.int64, device=device)  # [W]

    def close_peers(self) -> None:
        """Unmap the peers' regions (after every kernel using them finished)."""
        for a in self.peers.values():
            with contextlib.suppress(RuntimeError):
                self.drv.close(a)
        self.peers = {}

    def close(self) -> None:
        """Unmap the peers' regions and free this rank's (once no peer reads it any more)."""
        self.close_peers()
        if self.own:
            own, self.own = self.own, 0
            self.drv.free(own)
