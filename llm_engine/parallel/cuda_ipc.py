"""Peer-to-peer buffers between the GPUs of one host through CUDA IPC, with the CUDA driver API over ctypes
(libcuda.so.1 ships with every NVIDIA driver; no compiled extension, no torch symmetric memory, no multicast).

Each rank allocates one region with cuMemAlloc (outside torch's caching allocator, so the IPC handle covers
exactly it), zeroes it, exports a handle; the ranks exchange handles through the process group; each rank opens
its peers' handles (cuIpcOpenMemHandle, peer access enabled lazily) and ends up with every region's address in
its own address space: `PeerRegions.ptrs`, an int64 tensor [W] on its GPU for the kernels."""

from __future__ import annotations

import ctypes

import torch

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED = 3


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class CudaDriver:
    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeError(f"CUDA IPC needs the NVIDIA driver's libcuda.so.1: {e}") from e
        L = self.lib
        L.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        L.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        L.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        L.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]
        L.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), ctypes.c_uint64]
        self._open = getattr(L, "cuIpcOpenMemHandle_v2", None) or L.cuIpcOpenMemHandle
        self._open.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
        L.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
        L.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        L.cuDeviceGetP2PAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")

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
        h = _Handle()
        self.check(self.lib.cuIpcGetMemHandle(ctypes.byref(h), ptr), "cuIpcGetMemHandle")
        return bytes(h.reserved)

    def open(self, handle: bytes) -> int:
        h = _Handle()
        ctypes.memmove(h.reserved, handle, 64)
        p = ctypes.c_uint64()
        self.check(self._open(ctypes.byref(p), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
        return p.value

    def close(self, ptr: int) -> None:
        self.check(self.lib.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")


class PeerRegions:
    """One zeroed region of `nbytes` per rank, every one addressable from this process (`ptrs`, int64 [W])."""

    def __init__(self, rank: int, world: int, device: torch.device, nbytes: int, all_gather_object):
        """all_gather_object(obj) -> list of every rank's obj (the process group's object all-gather)."""
        torch.cuda.set_device(device)
        torch.cuda.synchronize(device)  # the primary context is current on this thread (driver calls below)
        self.drv = CudaDriver()
        self.rank, self.own = rank, self.drv.alloc_zeroed(nbytes)
        handles = all_gather_object(self.drv.export(self.own))  # the caller checked peer access between all GPUs
        self.addrs = [self.own if r == rank else self.drv.open(h) for r, h in enumerate(handles)]
        self.ptrs = torch.tensor(self.addrs, dtype=torch.int64, device=device)  # [W]
        all_gather_object(None)  # every rank has opened every handle before anyone may free its region

    def close(self) -> None:
        for r, a in enumerate(self.addrs):
            if r != self.rank:
                self.drv.close(a)
        self.drv.free(self.own)
        self.addrs = []
