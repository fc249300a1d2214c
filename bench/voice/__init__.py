"""`voicefast bench voice`: simulated callers stream real speech over the Realtime protocol and measure
voice-to-voice latency from the TRUE end of speech in the audio they sent (see docs/bench.md)."""

from bench.voice.runner import main

__all__ = ["main"]
