"""Per-host defaults: CPU threads, worker pools and limits as pure functions of the host's CPU cores and where the
LLM and the ASR run, so `voicefast serve` sizes itself for a 2-core laptop and a 16-core GPU host alike. Any flag
or VOICEFAST_* variable the user sets wins; `voicefast serve` prints the result at start-up (HostReport.describe).

The model behind the numbers (docs/gpu.md, "Where each stage runs"): one caller costs the CPU stages about 0.25
core on average at full duty — per ~9 s turn cycle, ~4-5 Whisper tiny.en decodes (streaming partials every
800 ms, the speculative and the final decode: ~90 ms each at 2 threads), ~0.3 s of Piper for a ~6 s reply, plus
the end-of-turn model, VAD and the event loop. A GPU host therefore takes ~4 callers per core; ASR gets ~55 % of
the cores not reserved for the event loop and the engine thread, TTS ~30 %. A CPU-only host keeps the small
defaults it always had (16 sessions, 16 sequences) and gives the LLM a quarter of its cores."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

HOST_FIELDS = ("torch_threads", "asr_cpu_threads", "asr_workers", "tts_threads", "tts_workers", "vad_threads",
               "turn_workers", "gil_switch_interval_us", "engine_process", "max_sessions", "max_num_seqs",
               "max_waiting")
MAX_SESSIONS_CAP = 256  # CUDA graphs are captured up to max_num_seqs; beyond this a host needs replicas anyway


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What `voicefast serve` found on this machine (detect_host) or what a test says it has."""

    cpu_cores: int
    gpus: int = 0  # CUDA devices torch sees
    gpu_name: str | None = None
    asr_cuda: bool = False  # CTranslate2 can run Whisper on CUDA here (a device and CUDA 12 cuBLAS)
    asr_cuda_note: str = ""  # why not, when not

    def __post_init__(self) -> None:
        if self.cpu_cores < 1 or self.gpus < 0:
            raise ValueError(f"cpu_cores must be >= 1 and gpus >= 0, got {self.cpu_cores}, {self.gpus}")


def placement(facts: HostFacts, device: str = "auto", asr_device: str = "auto") -> tuple[str, str]:
    """(LLM device, ASR device) for the `device` / `asr_device` settings on this host."""
    llm = "cuda" if device == "cuda" or (device == "auto" and facts.gpus > 0) else "cpu"
    if asr_device != "auto":
        return llm, asr_device
    return llm, ("cuda" if llm == "cuda" and facts.asr_cuda else "cpu")


def host_defaults(cpu_cores: int, llm_device: str, asr_device: str) -> dict[str, int | bool]:
    """Every HOST_FIELDS value for a host with `cpu_cores` cores, the LLM on `llm_device` and the ASR on
    `asr_device` ("cpu" | "cuda"). Pure: the same inputs always give the same sizes."""
    if cpu_cores < 1:
        raise ValueError(f"cpu_cores must be >= 1, got {cpu_cores}")
    if llm_device not in ("cpu", "cuda") or asr_device not in ("cpu", "cuda"):
        raise ValueError(f"devices must be 'cpu' or 'cuda', got {llm_device!r}, {asr_device!r}")
    c = cpu_cores
    if llm_device == "cuda":
        torch_threads = 1  # the engine thread only stages inputs and replays CUDA graphs
        reserved = 2  # the event loop and the engine thread
        max_sessions = min(MAX_SESSIONS_CAP, max(16, 4 * c))
        max_num_seqs = max_sessions  # one running response per session fits one batch (graph buckets up to it)
    else:
        torch_threads = max(1, c // 4)
        reserved = 1 + torch_threads
        max_sessions = max(16, 2 * c)
        max_num_seqs = 16  # a CPU decode step grows with the batch: more sequences only wait longer together
    free = max(1, c - reserved)
    if asr_device == "cuda":  # the GPU batches finals; a second worker keeps a partial from blocking them
        asr_cpu_threads, asr_workers = 1, min(2, max(1, free // 4))
        tts_workers = max(1, round(free * 0.5))
    else:
        asr_cores = max(1, round(free * 0.55))
        asr_cpu_threads = 2 if asr_cores >= 4 else 1  # 2 threads: ~1.6x faster per decode, at least 2 workers
        asr_workers = asr_cores // asr_cpu_threads
        if llm_device == "cuda":
            # Decodes are bursty (finals queue behind partials), so a GPU host oversubscribes its ASR share 1.5x:
            # on the H200 host, 64 real-time callers, 6 x 2 threads gave final p95 167 ms using 9.7 cores where
            # 4 x 2 gave 268 ms using 10.3 (bench/gpu_voice/asr_host.py; docs/gpu.md, "Per-host defaults").
            asr_workers = max(1, asr_cores * 3 // (2 * asr_cpu_threads))
        tts_workers = max(1, round(free * 0.3))
    return {"torch_threads": torch_threads, "asr_cpu_threads": asr_cpu_threads, "asr_workers": asr_workers,
            "tts_threads": 1, "tts_workers": tts_workers, "vad_threads": max(1, c // 8),
            # the end-of-turn model: ~30-50 ms per check. On the H200 host at 32 callers (0d28475, same session) 2
            # workers queued the first turns' checks (turn model p50 531 ms, steady v2v p50 / p95 673 / 1,789 ms); 4
            # cut that to 232 ms (487 / 1,075 ms). A GPU host gives it a quarter of its cores, a CPU host an eighth
            "turn_workers": max(1, c // 4) if llm_device == "cuda" else max(1, c // 8),
            # The engine thread's eager prefill makes ~470 torch calls, each giving the GIL up and waiting to get it
            # back from whichever thread holds it, up to the switch interval each time. On the H200 host at 32
            # callers a 1-30-token prefill took 0.3-1.0 s under Python's 5 ms; 0.5 ms cut LLM TTFT p95 1,295 -> 728
            # ms and voice-to-voice p50 2,171 -> 1,777 ms (docs/gpu.md). A CPU host keeps Python's default.
            "gil_switch_interval_us": 500 if llm_device == "cuda" else 5000,
            # The engine in its own process where it runs on a GPU: its eager prefill then waits for no server
            # thread. On the H200 host at 32 callers (72c7bec, same session): LLM TTFT p95 1,258 -> 136 ms, slow
            # steps 17 -> 0, voice-to-voice p50 2,458 -> 723 ms (docs/gpu.md). A CPU engine computes its steps on
            # the cores the server's stages also need, so a CPU host keeps it on a thread (one process, less memory).
            "engine_process": llm_device == "cuda", "max_sessions": max_sessions,
            "max_num_seqs": max_num_seqs, "max_waiting": max(64, 2 * max_sessions)}


@dataclass(frozen=True, slots=True)
class HostReport:
    facts: HostFacts
    llm_device: str
    asr_device: str
    values: dict[str, int | bool]  # the HOST_FIELDS values in force
    auto: frozenset[str] = field(default_factory=frozenset)  # which of them came from host_defaults

    def describe(self) -> str:
        f = self.facts
        gpu = f"{f.gpus} GPU{'s' if f.gpus != 1 else ''}" + (f" ({f.gpu_name})" if f.gpu_name else "")
        asr_note = f" ({f.asr_cuda_note})" if self.asr_device == "cpu" and f.gpus and f.asr_cuda_note else ""
        v = self.values

        def val(k: str) -> str:
            return f"{v[k]}" + ("" if k in self.auto else "*")

        engine = ("its own process" if v["engine_process"] else "a thread") + ("" if "engine_process" in self.auto
                                                                              else "*")

        return (f"host: {f.cpu_cores} CPU cores, {gpu}; LLM on {self.llm_device}, ASR on {self.asr_device}{asr_note}; "
                f"ASR {val('asr_workers')} workers x {val('asr_cpu_threads')} threads, TTS {val('tts_workers')} "
                f"workers x {val('tts_threads')} thread(s), torch {val('torch_threads')} thread(s), VAD "
                f"{val('vad_threads')}, end-of-turn model {val('turn_workers')}, GIL switch "
                f"{val('gil_switch_interval_us')} us, engine in {engine}; max_sessions {val('max_sessions')}, "
                f"max_num_seqs {val('max_num_seqs')}, "
                f"max_waiting {val('max_waiting')}" + ("  (* = set by flag/env)" if set(v) - self.auto else ""))

    def to_dict(self) -> dict:
        f = self.facts
        return {"cpu_cores": f.cpu_cores, "gpus": f.gpus, "gpu_name": f.gpu_name, "asr_cuda": f.asr_cuda,
                "asr_cuda_note": f.asr_cuda_note, "llm_device": self.llm_device, "asr_device": self.asr_device,
                "values": dict(self.values), "auto": sorted(self.auto)}


def resolve_host(explicit: dict, facts: HostFacts) -> tuple[dict, HostReport]:
    """Fill the HOST_FIELDS the user did not set (`explicit`: the values given by flag or env) from
    host_defaults. Returns (the merged values, the report)."""
    llm, asr = placement(facts, explicit.get("device", "auto"), explicit.get("asr_device", "auto"))
    defaults = host_defaults(facts.cpu_cores, llm, asr)
    auto = frozenset(k for k in HOST_FIELDS if explicit.get(k) is None)
    merged = {**explicit, **{k: defaults[k] for k in auto}}
    return merged, HostReport(facts, llm, asr, {k: merged[k] for k in HOST_FIELDS}, auto)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def detect_host(device: str = "auto") -> HostFacts:
    """This machine: CPU cores, CUDA devices (skipped for device="cpu") and whether CTranslate2 can use CUDA."""
    cores = cpu_cores()
    if device == "cpu":
        return HostFacts(cores)
    gpus, name = 0, None
    try:
        import torch

        if torch.cuda.is_available():
            gpus, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU host
        gpus = 0
    if gpus == 0:
        return HostFacts(cores, 0, None, False, "no GPU")
    try:
        from audio.asr import ctranslate2_cuda

        ok, note = ctranslate2_cuda()
    except ImportError as e:
        ok, note = False, f"faster-whisper/ctranslate2 not importable: {e}"
    return HostFacts(cores, gpus, name, ok, note)
