"""End-of-turn classifier: Smart Turn v3 (a Whisper-encoder audio model, ONNX) run with onnxruntime.

Input: the last `WINDOW_S` seconds of a turn's 16 kHz mono audio (left-padded with zeros when shorter), normalised
to zero mean and unit variance, as Whisper log-mel features [1, 80, 800] (audio/mel.py). Output: the probability
that the speaker has finished their turn. The model sees prosody and rhythm only, not words: a phrase cut off
with a falling pitch ("I'd like to book a table for") can score high, so callers combine it with the transcript.

One SmartTurnModel per process, shared by every session: predict() is blocking and thread-safe; submit() runs
it on the model's own worker threads (`workers`, one inference each at one intra-op thread: one on a small host,
more where many callers' checks would queue) and returns a concurrent Future. The model file is given by path;
where the embedded one lives is the caller's business."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from audio.mel import SAMPLE_RATE_HZ, log_mel_spectrogram, normalize_waveform

WINDOW_S = 8
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE_HZ  # 128_000


def model_window(x16k: np.ndarray) -> np.ndarray:
    """The model's view of a turn: its last WINDOW_SAMPLES samples, zero-padded on the left. [WINDOW_SAMPLES]"""
    x = np.asarray(x16k, dtype=np.float32).reshape(-1)[-WINDOW_SAMPLES:]
    return np.pad(x, (WINDOW_SAMPLES - len(x), 0))


def turn_features(x16k: np.ndarray) -> np.ndarray:
    """[80, 800] float32 Whisper log-mel of the model window (normalised over the padded window, as in training)."""
    return log_mel_spectrogram(normalize_waveform(model_window(x16k)))


class SmartTurnModel:
    def __init__(self, path: str | Path, *, threads: int = 1, workers: int = 1):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
            raise RuntimeError("the end-of-turn model needs onnxruntime: pip install onnxruntime") from e
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"end-of-turn model {self.path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [80, 800]:
            raise ValueError(f"{self.path} is not a Smart Turn v3 model (expected one [batch, 80, 800] input, "
                             f"got {[(i.name, i.shape) for i in inputs]})")
        self._input = inputs[0].name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def predict(self, x16k: np.ndarray) -> float:
        """Probability in [0, 1] that the turn is complete, from its audio so far (16 kHz float32). Blocking."""
        x = np.asarray(x16k, dtype=np.float32).reshape(-1)
        if not len(x):
            raise ValueError("end-of-turn model needs some audio, got none")
        if not np.all(np.isfinite(x)):
            raise ValueError("end-of-turn model input contains NaN or Inf")
        (out,) = self._session.run(None, {self._input: turn_features(x)[None]})  # [1, 1] sigmoid output
        return float(np.clip(out.reshape(-1)[0], 0.0, 1.0))

    def submit(self, x16k: np.ndarray) -> Future:
        """predict() on one of the model's `workers` threads; cancelling the Future drops it if it has not started."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="voicefast-turn")
            return self._pool.submit(self.predict, np.array(x16k, dtype=np.float32))

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
