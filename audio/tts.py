"""Piper TTS (piper-tts 1.8, ONNX via onnxruntime, espeak-ng phonemes): one voice per process, shared.

The ONNX session is thread-safe; espeak-ng phonemization is not, so only that step takes a lock and several
sessions can synthesize at once."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from audio.heap import trim_if_free_over

_MARKUP = re.compile(r"[*#`_~|<>]+")  # markdown the LLM may emit; never spoken
FREE_HEAP_TRIM_BYTES = 64 << 20  # malloc's free pool beyond this goes back to the OS after a phrase


class PiperTTS:
    def __init__(self, voice: str | None = None, speaking_rate: float = 1.0, *, threads: int = 1):
        try:
            import onnxruntime as ort
            from piper import PiperVoice
            from piper.config import PiperConfig
        except ImportError as e:
            raise RuntimeError("TTS needs piper-tts: pip install piper-tts") from e
        from model_assets import resolve_tts

        if speaking_rate <= 0:
            raise ValueError(f"speaking_rate must be > 0, got {speaking_rate}")
        asset = resolve_tts(voice)
        self.path = Path(asset.path)
        self.name = self.path.name.removesuffix(".onnx")  # e.g. "en_US-joe-medium" (for voices())
        with open(f"{self.path}.json", encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # No onnxruntime CPU arena: it keeps the peak of the longest phrase ever synthesized for good, rounded up
        # to the next power of two (phrases of up to 60 words: RSS 157 -> 819 MiB and climbing in 512 MiB steps;
        # a 25-min server soak saw +128 then +256 MiB mapped at once). Without it the memory goes back to malloc
        # after each phrase, and synthesize() hands malloc's free pool back to the OS once it passes
        # FREE_HEAP_TRIM_BYTES (bench/stage_rss.py tts --long).
        opts.enable_cpu_mem_arena = False
        session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(session=session, config=config)
        self.sample_rate_hz: int = int(config.sample_rate)
        self.speaking_rate = speaking_rate
        self._phonemize_lock = threading.Lock()

    def _syn_config(self, speaking_rate: float | None):
        from piper import SynthesisConfig

        rate = self.speaking_rate if speaking_rate is None else speaking_rate
        if rate <= 0:
            raise ValueError(f"speaking_rate must be > 0, got {rate}")
        base = self.voice.config.length_scale or 1.0
        return SynthesisConfig(length_scale=base / rate)

    def synthesize(self, text: str, speaking_rate: float | None = None) -> Iterator[np.ndarray]:
        """float32 audio at sample_rate_hz, one array per sentence, as each is ready. Blocking."""
        text = _MARKUP.sub(" ", text).strip()
        if not text:
            return
        cfg = self._syn_config(speaking_rate)
        with self._phonemize_lock:
            sentences = self.voice.phonemize(text)
        for phonemes in sentences:
            if not phonemes:
                continue
            ids = self.voice.phonemes_to_ids(phonemes)
            audio = np.asarray(self.voice.phoneme_ids_to_audio(ids, cfg), np.float32).reshape(-1)  # [n]
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
            if peak > 1e-8:
                audio = audio / peak  # Piper's normalize_audio: each sentence peaks at full scale
            yield np.clip(audio * 0.9, -1.0, 1.0).astype(np.float32)
        trim_if_free_over(FREE_HEAP_TRIM_BYTES)
