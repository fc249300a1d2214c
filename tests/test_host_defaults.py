"""voicefast/host.py: per-host threads, pools and limits as pure functions of core count and device, and how
`voicefast serve` applies them under the user's flags and env."""

from __future__ import annotations

import pytest

from voicefast.config import ServerConfig
from voicefast.host import HOST_FIELDS, HostFacts, cpu_cores, detect_host, host_defaults, placement, resolve_host
from voicefast.serve import resolve_config

H200 = HostFacts(16, 1, "NVIDIA H200", False, "libcublas.so.12 (CUDA 12 cuBLAS) not found")


def _cores_used(d: dict, llm_device: str, asr_device: str = "cpu") -> float:
    """Cores the pools may keep busy. A GPU host's CPU ASR pool is oversubscribed 1.5x on purpose (bursty decodes;
    measured on the H200 host, see voicefast/host.py), so its threads count 2/3 of a core each there."""
    loop_and_engine = 2 if llm_device == "cuda" else 1 + d["torch_threads"]
    asr_weight = 2 / 3 if (llm_device, asr_device) == ("cuda", "cpu") else 1.0
    return (loop_and_engine + d["asr_workers"] * d["asr_cpu_threads"] * asr_weight
            + d["tts_workers"] * d["tts_threads"])


def test_a_2_core_cpu_host_keeps_the_small_defaults():
    d = host_defaults(2, "cpu", "cpu")
    base = ServerConfig()
    assert d == {k: getattr(base, k) for k in HOST_FIELDS}  # the dataclass defaults are the 2-core values


def test_a_16_core_gpu_host_is_sized_for_64_callers():
    d = host_defaults(16, "cuda", "cpu")
    assert d["max_sessions"] == 64 and d["max_num_seqs"] == 64 and d["max_waiting"] >= 2 * 64
    assert d["torch_threads"] == 1  # the engine thread only replays CUDA graphs
    assert (d["asr_workers"], d["asr_cpu_threads"], d["tts_workers"]) == (6, 2, 4)  # the measured best ASR pool
    assert d["vad_threads"] == 2  # the VAD model off the event loop (27 % of it at 64 callers when inline)
    assert d["turn_workers"] == 4 and host_defaults(2, "cpu", "cpu")["turn_workers"] == 1
    assert host_defaults(16, "cpu", "cpu")["turn_workers"] == 2
    assert d["gil_switch_interval_us"] == 500 and host_defaults(16, "cpu", "cpu")["gil_switch_interval_us"] == 5000
    assert d["engine_process"] is True and host_defaults(16, "cpu", "cpu")["engine_process"] is False
    assert _cores_used(d, "cuda") <= 16  # ASR + TTS pools + event loop + engine thread fit the cores


def test_asr_on_the_gpu_frees_cores_for_tts():
    cpu, gpu = host_defaults(16, "cuda", "cpu"), host_defaults(16, "cuda", "cuda")
    assert (gpu["asr_workers"], gpu["asr_cpu_threads"]) == (2, 1)
    assert gpu["tts_workers"] > cpu["tts_workers"]
    assert (gpu["max_sessions"], gpu["max_num_seqs"]) == (cpu["max_sessions"], cpu["max_num_seqs"])


@pytest.mark.parametrize("llm, asr", [("cpu", "cpu"), ("cuda", "cpu"), ("cuda", "cuda")])
def test_sizes_grow_with_cores_and_stay_within_them(llm, asr):
    prev = None
    for c in range(1, 129):
        d = host_defaults(c, llm, asr)
        assert all(isinstance(v, int) and v >= 1 for k, v in d.items() if k != "engine_process")
        assert d["engine_process"] is (llm == "cuda")
        assert d["max_num_seqs"] <= d["max_sessions"] <= 256 and d["max_waiting"] >= d["max_sessions"]
        if c >= 4:
            assert _cores_used(d, llm, asr) <= c, (c, d)
        if prev is not None:
            assert all(d[k] >= prev[k] for k in ("max_sessions", "max_num_seqs", "max_waiting")), (c, d)
            assert d["asr_workers"] * d["asr_cpu_threads"] + d["tts_workers"] >= \
                prev["asr_workers"] * prev["asr_cpu_threads"] + prev["tts_workers"], (c, d)
        prev = d
    assert host_defaults(128, "cuda", "cpu")["max_sessions"] == 256  # capped: beyond it, run replicas


def test_host_defaults_reject_bad_inputs():
    with pytest.raises(ValueError, match="cpu_cores"):
        host_defaults(0, "cpu", "cpu")
    with pytest.raises(ValueError, match="devices"):
        host_defaults(8, "tpu", "cpu")
    with pytest.raises(ValueError, match="cpu_cores"):
        HostFacts(0)


def test_placement():
    assert placement(H200) == ("cuda", "cpu")  # CTranslate2 cannot use CUDA without cuBLAS 12
    assert placement(HostFacts(16, 1, "H200", asr_cuda=True)) == ("cuda", "cuda")
    assert placement(HostFacts(16, 1, "H200", asr_cuda=True), device="cpu") == ("cpu", "cpu")
    assert placement(HostFacts(2)) == ("cpu", "cpu")
    assert placement(H200, asr_device="cuda") == ("cuda", "cuda")  # explicit: WhisperASR then says why not


def test_explicit_values_win_and_are_reported():
    merged, rep = resolve_host({"asr_workers": 3, "max_sessions": 100, "port": 1}, H200)
    assert merged["asr_workers"] == 3 and merged["max_sessions"] == 100 and merged["port"] == 1
    assert merged["max_num_seqs"] == 64 and merged["tts_workers"] == 4
    assert "asr_workers" not in rep.auto and "tts_workers" in rep.auto
    text = rep.describe()
    assert "16 CPU cores, 1 GPU (NVIDIA H200)" in text and "ASR on cpu (libcublas.so.12" in text
    assert "ASR 3* workers x 2 threads" in text and "max_sessions 100*" in text and "max_num_seqs 64," in text
    assert rep.to_dict()["values"]["asr_workers"] == 3
    assert "engine in its own process;" in text  # the GPU-host default
    _, rep = resolve_host({"engine_process": False}, H200)
    assert "engine in a thread*;" in rep.describe()


def test_serve_resolves_flags_env_then_host_defaults():
    seen = []

    def detect(device):
        seen.append(device)
        return H200

    opts, rep = resolve_config(["--asr-workers", "5"], {"VOICEFAST_MAX_SESSIONS": "32"}, detect=detect)
    assert seen == ["auto"]
    assert (opts.asr_workers, opts.max_sessions, opts.max_num_seqs, opts.tts_workers) == (5, 32, 64, 4)
    assert rep.llm_device == "cuda" and rep.asr_device == "cpu" and opts.engine_process is True
    opts, _ = resolve_config(["--no-engine-process"], {}, detect=detect)
    assert opts.engine_process is False  # an explicit flag wins over the host default
    opts, _ = resolve_config([], {"VOICEFAST_ENGINE_PROCESS": "0"}, detect=detect)
    assert opts.engine_process is False
    opts, rep = resolve_config(["--device", "cpu"], {}, detect=lambda d: seen.append(d) or HostFacts(16))
    assert seen[-1] == "cpu" and opts.max_num_seqs == 16 and opts.torch_threads == 4 and rep.llm_device == "cpu"
    assert opts.engine_process is False
    with pytest.raises(ValueError, match="asr_workers"):
        resolve_config(["--asr-workers", "0"], {}, detect=detect)
    with pytest.raises(ValueError, match="asr_device"):
        resolve_config(["--asr-device", "tpu"], {}, detect=detect)


def test_detect_host_on_this_machine():
    facts = detect_host("cpu")  # device cpu: no GPU probe
    assert facts.cpu_cores == cpu_cores() >= 1 and facts.gpus == 0


def test_vad_threads_zero_runs_the_vad_on_the_loop_and_negative_is_rejected():
    from fakes import make_stack

    assert ServerConfig(vad_threads=0).vad_threads == 0
    with pytest.raises(ValueError, match="vad_threads"):
        ServerConfig(vad_threads=-1)
    assert make_stack(vad_threads=0).vad_executor is None
    pool = make_stack(vad_threads=2).vad_executor
    assert pool is not None and pool._max_workers == 2
    pool.shutdown()

