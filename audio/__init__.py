"""Audio for voicefast: VAD, streaming ASR, incremental TTS, resampling and phone codecs."""
