/* A stand-in for the few libcuda.so.1 entry points llm_engine/parallel/cuda_ipc.py calls, compiled by
   tests/test_tp_setup.py to check the ctypes ABI on a machine without a GPU: CUipcMemHandle is a 64-byte struct
   passed BY VALUE to cuIpcOpenMemHandle_v2, and its bytes (NULs included) must arrive intact.
   "Device memory" is host memory; a handle encodes its pointer in bytes 8..15, NUL bytes elsewhere, and a
   checksum of all 64 bytes in the last byte; opening checks every byte and returns the pointer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { unsigned char reserved[64]; } CUipcMemHandle;

int fail_open = 0;   /* tests set it: every cuIpcOpenMemHandle_v2 then fails with error 1 */
int live_allocs = 0; /* cuMemAlloc_v2 minus cuMemFree_v2 */
int open_mappings = 0;

static const char *errs[] = {"no error", "invalid argument"};

int cuGetErrorString(int rc, const char **msg) { *msg = rc == 0 || rc == 1 ? errs[rc] : "unknown"; return 0; }
int cuCtxGetCurrent(void **ctx) { static int c; *ctx = &c; return 0; }
int cuMemAlloc_v2(uint64_t *p, size_t n) { *p = (uint64_t)(uintptr_t)malloc(n); live_allocs++; return *p ? 0 : 2; }
int cuMemFree_v2(uint64_t p) { free((void *)(uintptr_t)p); live_allocs--; return 0; }
int cuMemsetD8_v2(uint64_t p, unsigned char v, size_t n) { memset((void *)(uintptr_t)p, v, n); return 0; }
int cuDeviceGet(int *d, int ordinal) { *d = ordinal; return 0; }
int cuDeviceGetP2PAttribute(int *v, int attr, int src, int dst) { *v = attr == 3 && src != dst; return 0; }

static unsigned char checksum(const unsigned char *b) {
    unsigned char s = 0x5a;
    for (int i = 0; i < 63; i++) s = (unsigned char)(s * 31 + b[i]);
    return s;
}

int cuIpcGetMemHandle(CUipcMemHandle *h, uint64_t p) {
    memset(h->reserved, 0, 64);
    h->reserved[0] = 0xab;                 /* then NULs: a C-string copy would stop at byte 1 */
    memcpy(h->reserved + 8, &p, 8);
    for (int i = 16; i < 63; i += 3) h->reserved[i] = (unsigned char)(i * 7 + 1);
    h->reserved[63] = checksum(h->reserved);
    return 0;
}

int cuIpcOpenMemHandle_v2(uint64_t *p, CUipcMemHandle h, unsigned int flags) {
    if (fail_open || flags != 1 || h.reserved[0] != 0xab || h.reserved[63] != checksum(h.reserved)) return 1;
    memcpy(p, h.reserved + 8, 8);
    open_mappings++;
    return 0;
}

int cuIpcCloseMemHandle(uint64_t p) { (void)p; open_mappings--; return 0; }
