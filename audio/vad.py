"""Streaming voice activity detection: Silero VAD v6 (ONNX, onnxruntime) behind a state machine.

SileroVadModel is loaded once per process and shared by every session (onnxruntime's run() is thread-safe);
each VadStream owns its LSTM state (h, c), the 64-sample context and the re-buffer. VadStateMachine turns
per-window speech probabilities into events and knows nothing about the model, so it is tested with a fake
probability source. Event samples are offsets into the stream's 16 kHz input:

  speech_started.sample  = first sample of the first speech window (the true onset, without prefix padding)
  early_silence.sample   = speech_stopped.sample = where the silence began (end of speech)
  speech_resumed.sample  = where speech came back after an early_silence
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import numpy as np

from audio.pcm import FrameBuffer
from audio.vad_refine import BoundaryRefiner, block_rms

SAMPLE_RATE_HZ = 16_000
WINDOW_SAMPLES = 512  # 32 ms: the only window size Silero v5/v6 accepts at 16 kHz
CONTEXT_SAMPLES = 64


@dataclass(slots=True)
class VadParams:
    """OpenAI server_vad parameters plus our guards. All durations in ms of input audio."""

    threshold: float = 0.5  # speech probability that starts speech
    prefix_padding_ms: int = 300  # audio before the onset the server keeps for ASR (not used for events)
    silence_duration_ms: int = 500  # silence that ends a turn (speech_stopped)
    early_silence_ms: int = 160  # silence after which early_silence fires (speculative ASR final / prefill)
    min_speech_ms: int = 96  # speech shorter than this is a click, not a turn
    neg_threshold: float | None = None  # probability below which a window counts as silence; None: threshold-0.15
    # Silero's LSTM state drifts during a long silence until speech is heard late, split or missed (narrowband
    # worst: after 40 s, onsets up to 1.5 s late; `voicefast bench phone`). The state is reset after this much
    # continuous quiet (0: never).
    reset_after_quiet_ms: int = 5000

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("prefix_padding_ms", "silence_duration_ms", "early_silence_ms", "min_speech_ms",
                     "reset_after_quiet_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.early_silence_ms > self.silence_duration_ms:
            raise ValueError(f"early_silence_ms ({self.early_silence_ms}) must not exceed silence_duration_ms "
                             f"({self.silence_duration_ms})")
        if self.neg_threshold is None:
            self.neg_threshold = max(0.01, self.threshold - 0.15)
        if not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be in [0, threshold], got {self.neg_threshold}")

    @property
    def prefix_padding_samples(self) -> int:
        return self.prefix_padding_ms * SAMPLE_RATE_HZ // 1000


@dataclass(frozen=True, slots=True)
class VadEvent:
    kind: str  # "speech_started" | "early_silence" | "speech_resumed" | "speech_stopped"
    sample: int  # offset into this stream's 16 kHz input
    ms: int  # the same offset in ms


class VadState(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


def _ev(kind: str, sample: int) -> VadEvent:
    return VadEvent(kind, sample, sample * 1000 // SAMPLE_RATE_HZ)


class VadStateMachine:
    """quiet -> starting -> speaking -> stopping -> (speaking | quiet), one speech probability per window."""

    def __init__(self, params: VadParams | None = None, window_samples: int = WINDOW_SAMPLES):
        self.params = params or VadParams()
        self.window_samples = window_samples
        self.state = VadState.QUIET
        self.samples_seen = 0  # input samples consumed (multiple of window_samples)
        self._onset = 0  # first sample of the candidate / current speech
        self._silence_start = 0  # first sample of the current silence (in STOPPING)
        self._early_sent = False
        self._last_speech_end = 0
        self.refiner = BoundaryRefiner(window_samples)
        ms = SAMPLE_RATE_HZ // 1000
        self._min_speech = self.params.min_speech_ms * ms
        self._early = self.params.early_silence_ms * ms
        self._silence = self.params.silence_duration_ms * ms

    def push(self, prob: float, rms: np.ndarray | None = None) -> list[VadEvent]:
        """Advance by one window with speech probability `prob`; returns the events it caused.

        `rms` (the window's 8 ms block energies, optional) lets the refiner place boundaries within windows;
        without it boundaries fall on window edges."""
        p, start = self.params, self.samples_seen
        self.samples_seen = end = start + self.window_samples
        speech, silence = prob >= p.threshold, prob < p.neg_threshold
        if rms is not None:
            self.refiner.observe(start, prob, rms, quiet=self.state is VadState.QUIET and not speech)
        out: list[VadEvent] = []
        if speech:
            self._last_speech_end = end
        if self.state is VadState.QUIET and speech:
            self.state, self._onset = VadState.STARTING, start
        if self.state is VadState.STARTING:
            if silence:
                self.state = VadState.QUIET  # too short: a click or a breath
            elif end - self._onset >= max(self._min_speech, 1):
                self.state = VadState.SPEAKING
                out.append(_ev("speech_started", self.refiner.refine_onset(self._onset)))
            return out
        if self.state is VadState.SPEAKING:
            if silence:
                # Silence began where the last confident speech window ended (windows in the hysteresis band
                # between neg_threshold and threshold are trailing sound, not speech).
                end_of_speech = self.refiner.refine_end(self._last_speech_end)
                self.state, self._silence_start, self._early_sent = VadState.STOPPING, end_of_speech, False
            else:
                return out
        if self.state is VadState.STOPPING:
            if speech:
                self.state = VadState.SPEAKING
                if self._early_sent:
                    out.append(_ev("speech_resumed", start))
                return out
            quiet = end - self._silence_start
            if not self._early_sent and quiet >= self._early:
                self._early_sent = True
                out.append(_ev("early_silence", self._silence_start))
            if quiet >= self._silence:
                self.state = VadState.QUIET
                out.append(_ev("speech_stopped", self._silence_start))
        return out

    def end_of_input(self) -> list[VadEvent]:
        """The input ended: close an open turn (speech_stopped where the silence began, or at the end)."""
        if self.state in (VadState.SPEAKING, VadState.STOPPING):
            at = self._silence_start if self.state is VadState.STOPPING else self.samples_seen
            # early_silence always precedes speech_stopped, so a speculative final can rely on it
            need_early = self.state is VadState.SPEAKING or not self._early_sent
            out = [_ev("early_silence", at)] if need_early else []
            self.state = VadState.QUIET
            return out + [_ev("speech_stopped", at)]
        self.state = VadState.QUIET
        return []


class SileroVadModel:
    """The Silero VAD v6 ONNX graph, one per process; stateless (streams pass their own state)."""

    def __init__(self, path: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
            raise RuntimeError("Silero VAD needs onnxruntime: pip install onnxruntime") from e
        from model_assets import resolve_vad

        self.path = str(resolve_vad(path).path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # one 32 ms window is ~0.2 ms of work: threads only add overhead
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        self._session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()  # only guards lazy bookkeeping; run() itself is thread-safe

    @staticmethod
    def initial_state() -> np.ndarray:
        return np.zeros((2, 1, 1, 128), np.float32)  # [h|c, layers, batch, hidden]

    def __call__(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """window: [CONTEXT_SAMPLES + WINDOW_SAMPLES] float32 -> (speech probability, new state)."""
        prob, h, c = self._session.run(None, {"input": window.reshape(1, -1), "h": state[0], "c": state[1]})
        return float(prob.reshape(-1)[0]), np.stack([h, c])


class VadStream:
    """Per-session streaming VAD: feed 16 kHz float32 chunks of any size, get VadEvents."""

    def __init__(self, model, params: VadParams | None = None):
        self.model = model
        self.params = params or VadParams()
        self.machine = VadStateMachine(self.params)
        self._frames = FrameBuffer(WINDOW_SAMPLES)
        self._state = model.initial_state() if hasattr(model, "initial_state") else None
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)  # [64] tail of the previous window
        self.last_prob = 0.0
        self._quiet_windows = 0  # consecutive windows judged silence while no speech is open
        self._reset_windows = self.params.reset_after_quiet_ms * SAMPLE_RATE_HZ // 1000 // WINDOW_SAMPLES
        self.state_resets = 0

    @property
    def state(self) -> VadState:
        return self.machine.state

    @property
    def samples_seen(self) -> int:
        """Samples the VAD has judged (whole windows); at most WINDOW_SAMPLES-1 behind the input."""
        return self.machine.samples_seen

    def judges(self, n_samples: int) -> bool:
        """Whether feeding n_samples more completes a window (runs the model) rather than only buffering."""
        return self._frames.pending + n_samples >= WINDOW_SAMPLES

    def process(self, x16k: np.ndarray) -> list[VadEvent]:
        x = np.asarray(x16k, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise ValueError("VAD input contains NaN or Inf")
        events: list[VadEvent] = []
        for w in self._frames.push(x):
            window = np.concatenate([self._context, w])  # [576]
            self.last_prob, self._state = self.model(window, self._state)
            self._context = w[-CONTEXT_SAMPLES:].copy()
            events += self.machine.push(self.last_prob, block_rms(w))
            self._after_quiet()
        return events

    def _after_quiet(self) -> None:
        """A fresh model state after a long quiet: only the LSTM state, never the events or the offsets."""
        if self.machine.state is VadState.QUIET and self.last_prob < self.params.neg_threshold:
            self._quiet_windows += 1
        else:
            self._quiet_windows = 0
        can_reset = self._reset_windows and hasattr(self.model, "initial_state")
        if can_reset and self._quiet_windows >= self._reset_windows:
            self._state = self.model.initial_state()
            self._quiet_windows = 0
            self.state_resets += 1

    def end_of_input(self) -> list[VadEvent]:
        return self.machine.end_of_input()

    def reset(self) -> None:
        """Forget the audio so far (e.g. after input_audio_buffer.clear); sample offsets keep counting."""
        seen = self.machine.samples_seen
        self.machine = VadStateMachine(self.params)
        self.machine.samples_seen = seen
        self._state = self.model.initial_state() if hasattr(self.model, "initial_state") else None
        self._context[:] = 0
