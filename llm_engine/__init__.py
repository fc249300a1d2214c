"""voicefast's LLM decode engine: paged KV cache, prefix caching, continuous batching, streaming."""
