"""EngineConfig: every knob of the LLM engine, validated up front (units in names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    model: str | Path | None = None  # HF checkpoint dir or .gguf; None -> embedded SmolLM2 (model_assets);
    #                                  or a llm_engine.parallel.RandomCheckpoint (random weights of a given shape)
    device: str = "auto"  # "cpu" | "cuda" | "auto" (cuda when available)
    dtype: str = "auto"  # "float32" on CPU, "bfloat16" on CUDA by default
    max_num_seqs: int = 16  # most sequences in one step (running batch)
    kv_block_size: int = 16  # tokens per paged-KV block
    num_kv_blocks: int | None = None  # None -> sized from memory (kv_cache_memory_mib / gpu_memory_utilization)
    max_num_batched_tokens: int = 512  # per-step token budget: decodes + prefill chunks
    max_waiting: int = 64  # admission control: a request beyond this raises EngineOverloaded
    max_model_len: int | None = None  # None -> the model's max_position_embeddings
    quantize: str | None = None  # weight-only "int8" | "int4" module swap (llm_engine.quant); None = off
    quantize_lm_head: bool = False  # with quantize: also swap the lm_head (a tied one gets its own quantized copy)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # GPU runner: no CUDA graphs
    # Additions beyond docs/interfaces.md (all optional):
    cpu_threads: int = 2  # torch intra-op threads on CPU
    kv_cache_memory_mib: int = 512  # CPU: KV pool budget when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of free memory the weights + KV pool may use
    seed: int = 0  # seed for unseeded random sampling
    tensor_parallel: int = 1  # ranks (GPUs of this host; gloo processes on CPU) the model is split over
    # CUDA TP: all-reduces up to this size take the one-shot kernel (0 = NCCL for all). 256 KiB: on 2xH200 (264a9f4)
    # ours took 8.5 us at 128 KiB vs NCCL 16.9 us, but 23.5 vs 21.6 us at 512 KiB (bench/tp_allreduce.py)
    tp_one_shot_max_bytes: int = 256 * 1024
    # Speculative decoding (llm_engine.spec_decode): prompt-lookup drafts verified in one forward pass; exact.
    # drafts per decode step at most; 0 = off (SamplingParams.speculate: per request). None: 4 on CUDA (a verify of
    # a few rows costs about one decode step there), 1 on CPU (2 rows still take the fp16 GEMV; 3+ rows cost ~2x)
    speculative_tokens: int | None = None
    speculative_ngram_min: int = 2  # shortest suffix n-gram looked up in the sequence's earlier tokens
    speculative_ngram_max: int = 4  # longest (tried first)
    speculative_max_rows: int = 32  # drafts only while a step's decode rows (1 + drafts per seq) stay <= this
    # a step slower than this is logged with what it held (prefills, tokens, decodes; schedule / run / postprocess
    # times), at most once a second: None = 250 ms on CUDA (a decode step is a few ms there), off on CPU; 0 = off
    slow_step_ms: float | None = None

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("max_num_seqs", "kv_block_size", "max_num_batched_tokens", "max_waiting", "cpu_threads",
                     "kv_cache_memory_mib"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.kv_block_size & (self.kv_block_size - 1) or self.kv_block_size > 256:
            raise ValueError(f"kv_block_size must be a power of two <= 256, got {self.kv_block_size}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 2):
            raise ValueError(f"num_kv_blocks must be an int >= 2 or None, got {self.num_kv_blocks!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2 or None, got {self.max_model_len!r}")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be None, 'int8' or 'int4', got {self.quantize!r}")
        if not isinstance(self.quantize_lm_head, bool):
            raise ValueError(f"quantize_lm_head must be a bool, got {self.quantize_lm_head!r}")
        if self.quantize_lm_head and self.quantize is None:
            raise ValueError("quantize_lm_head=True needs quantize='int8' or 'int4'")
        if not isinstance(self.tensor_parallel, int) or isinstance(self.tensor_parallel, bool) \
                or not 1 <= self.tensor_parallel <= 8:
            raise ValueError(f"tensor_parallel must be an int in [1, 8], got {self.tensor_parallel!r}")
        if not isinstance(self.tp_one_shot_max_bytes, int) or not 0 <= self.tp_one_shot_max_bytes <= 64 << 20 \
                or self.tp_one_shot_max_bytes % 256:
            raise ValueError(f"tp_one_shot_max_bytes must be a multiple of 256 in [0, 64 MiB], got "
                             f"{self.tp_one_shot_max_bytes!r}")
        if self.slow_step_ms is not None and not (isinstance(self.slow_step_ms, (int, float)) and
                                                  0 <= self.slow_step_ms < 3.6e6):
            raise ValueError(f"slow_step_ms must be >= 0 or None, got {self.slow_step_ms!r}")
        for name in ("speculative_tokens", "speculative_ngram_min", "speculative_ngram_max", "speculative_max_rows"):
            v = getattr(self, name)
            if v is None and name == "speculative_tokens":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "speculative_tokens" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'speculative_tokens' else 'positive'}"
                                 f" int, got {v!r}")
        if self.speculative_ngram_min > self.speculative_ngram_max:
            raise ValueError(f"speculative_ngram_min ({self.speculative_ngram_min}) > speculative_ngram_max "
                             f"({self.speculative_ngram_max})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def model_path(self) -> Path:
        """The checkpoint to load; None resolves the embedded model (model_assets, imported lazily, only here)."""
        if self.model is not None:
            p = Path(self.model).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"model {str(self.model)!r} does not exist")
            return p
        try:
            from model_assets import resolve_llm
        except ImportError as e:  # a copy of the engine without the asset resolver
            raise ValueError("EngineConfig.model is None but model_assets is not importable: pass a model path") from e
        return Path(resolve_llm().path)
