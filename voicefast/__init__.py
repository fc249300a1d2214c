"""voicefast: a real-time voice agent stack (VAD -> streaming ASR -> LLM engine -> incremental TTS)."""

__version__ = "0.1.0"
