"""voicefast's LLM decode engine: paged KV cache, prefix caching, continuous batching, streaming.

Exports are resolved lazily so the pure-Python bookkeeping (scheduler, block manager) imports without torch."""

from __future__ import annotations

_EXPORTS = {
    "EngineConfig": "llm_engine.config",
    "SamplingParams": "llm_engine.sampling_params",
    "Grammar": "llm_engine.grammar",
    "EngineOverloaded": "llm_engine.scheduler",
    "LLMEngine": "llm_engine.engine",
    "AsyncLLMEngine": "llm_engine.async_engine",
    "ProcessLLMEngine": "llm_engine.engine_process",
    "StreamOutput": "llm_engine.outputs",
    "RequestResult": "llm_engine.outputs",
    "EngineStats": "llm_engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'llm_engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
