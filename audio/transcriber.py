"""StreamingTranscriber: one utterance's growing audio -> paced append-only partials and a (speculative) final.

Works with any `asr` that has submit(x16k, final: bool) -> concurrent.futures.Future[str] (WhisperASR, or a
fake in tests). Sample offsets given to final() are offsets into the session's 16 kHz input, like VadEvent's."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Future

import numpy as np

SAMPLE_RATE_HZ = 16_000
_NON_WORD = re.compile(r"[^\w']+")


def _norm_word(w: str) -> str:
    return _NON_WORD.sub("", w.lower())


def stable_prefix_len(a: list[str], b: list[str]) -> int:
    """How many leading words two hypotheses agree on (case and punctuation ignored)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if _norm_word(x) != _norm_word(y):
            break
        n += 1
    return n


class StreamingTranscriber:
    """Per-utterance streaming transcription on a shared ASR.

    feed(x16k) appends audio. `await partial()` returns the newly stable words ("" when nothing is due or
    new): a partial decode runs only after `partial_interval_ms` of new audio, never while another partial or
    a final is pending, and only words two consecutive hypotheses agree on are published, so the published
    text only ever grows. `await final(end_sample)` decodes the audio up to end_sample (+ final_tail_ms);
    called at early_silence it starts the final speculatively, and a second call with the same end (at
    speech_stopped) reuses that decode. discard_final() drops it when speech resumes."""

    def __init__(self, asr, *, start_sample: int = 0, partial_interval_ms: int = 800, min_partial_ms: int = 500,
                 final_tail_ms: int = 150):
        if partial_interval_ms <= 0 or min_partial_ms < 0 or final_tail_ms < 0:
            raise ValueError("partial_interval_ms must be > 0, min_partial_ms and final_tail_ms >= 0")
        self.asr = asr
        self.start_sample = start_sample
        self._interval = partial_interval_ms * SAMPLE_RATE_HZ // 1000
        self._min_partial = min_partial_ms * SAMPLE_RATE_HZ // 1000
        self._tail = final_tail_ms * SAMPLE_RATE_HZ // 1000
        self._audio = np.zeros(16_000, np.float32)  # [capacity] growing buffer; first _n samples valid
        self._n = 0
        self._last_partial_n = 0
        self._prev_hyp: list[str] = []
        self.published: list[str] = []  # stable words published so far
        self._partial_job: Future | None = None
        self._final_job: tuple[int, Future] | None = None  # (speech end it was started for, job)
        self.partial_decodes = 0

    # ---- audio in ----
    def feed(self, x16k: np.ndarray) -> None:
        x = np.asarray(x16k, dtype=np.float32).reshape(-1)
        if self._n + len(x) > len(self._audio):
            grown = np.zeros(max(2 * len(self._audio), self._n + len(x)), np.float32)
            grown[:self._n] = self._audio[:self._n]
            self._audio = grown
        self._audio[self._n:self._n + len(x)] = x
        self._n += len(x)

    @property
    def samples(self) -> int:
        return self._n

    @property
    def audio(self) -> np.ndarray:
        return self._audio[:self._n]

    @property
    def text(self) -> str:
        """All stable words published so far."""
        return " ".join(self.published)

    # ---- partials ----
    def partial_due(self) -> bool:
        return (self._final_job is None and self._partial_job is None and self._n >= self._min_partial
                and self._n - self._last_partial_n >= self._interval)

    async def partial(self) -> str:
        """Newly stable words since the last call ("" if none, or if no decode is due)."""
        if not self.partial_due():
            return ""
        self._last_partial_n = self._n
        job = self.asr.submit(self._audio[:self._n].copy(), final=False)
        self._partial_job = job
        self.partial_decodes += 1
        try:
            hyp = (await asyncio.shield(asyncio.wrap_future(job))).split()
        except asyncio.CancelledError:
            if job.cancelled():
                return ""  # a final superseded this partial
            job.cancel()
            raise
        finally:
            self._partial_job = None
        if self._final_job is not None:
            return ""  # the final is authoritative from here on
        k = stable_prefix_len(self._prev_hyp, hyp)
        self._prev_hyp = hyp
        if k <= len(self.published) or stable_prefix_len(self.published, hyp) < len(self.published):
            return ""  # nothing new agreed on, or the hypothesis now contradicts what was published: wait
        new = hyp[len(self.published):k]
        self.published += new
        return " ".join(new)

    # ---- final ----
    def _local_end(self, end_sample: int | None) -> int:
        if end_sample is None:
            return self._n
        return max(0, min(self._n, end_sample - self.start_sample + self._tail))

    def start_final(self, end_sample: int | None = None) -> Future:
        """Start (or reuse) the final decode of audio up to end_sample (+ tail, as far as it has arrived).

        A job started for the same end of speech is reused even if less of the tail had arrived then: the
        speech itself is all there, and the tail is only silence."""
        end = self._local_end(end_sample)
        key = self.start_sample + end if end_sample is None else end_sample
        if self._final_job is not None:
            if self._final_job[0] == key and not self._final_job[1].cancelled():
                return self._final_job[1]
            self._final_job[1].cancel()
        if self._partial_job is not None:
            self._partial_job.cancel()  # drops it if still queued; finals outrank partials anyway
        job = self.asr.submit(self._audio[:end].copy(), final=True)
        self._final_job = (key, job)
        return job

    async def final(self, end_sample: int | None = None) -> str:
        """The utterance's final text (audio up to end_sample + tail; all audio when None)."""
        job = self.start_final(end_sample)
        # shield: cancelling this awaiting task leaves the shared job alone (another caller may reuse it);
        # discard_final() cancels the job itself, and then this raises CancelledError.
        return (await asyncio.shield(asyncio.wrap_future(job))).strip()

    @property
    def final_pending(self) -> bool:
        return self._final_job is not None and not self._final_job[1].done()

    def discard_final(self) -> None:
        """Speech resumed after a speculative final: drop it (cancelled if queued, ignored if running)."""
        if self._final_job is not None:
            self._final_job[1].cancel()
            self._final_job = None

    def close(self) -> None:
        """Cancel anything still queued for this utterance."""
        for job in (self._partial_job, self._final_job[1] if self._final_job else None):
            if job is not None:
                job.cancel()
        self._partial_job = None
        self._final_job = None
