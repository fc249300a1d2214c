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
    """Per-utterance streaming transcription on a shared ASR, with bounded memory and bounded cost per decode.

    feed(x16k) appends audio; at most `max_audio_ms` of it is kept (the oldest is dropped beyond that: the
    session ends a turn at its max utterance length well before). `await partial()` returns the newly stable
    words ("" when nothing is due or new): a partial decode runs only after `partial_interval_ms` of new audio,
    never while another partial or a final is pending, and only words two consecutive hypotheses agree on are
    published, so the published text only ever grows. A partial decodes at most `partial_window_ms` of audio:
    when the current segment grows past that, it is sealed at its quietest 20 ms in the last quarter (one decode
    of the sealed audio publishes its remaining words) and the next segment starts there, so a minute of speech
    costs the same per partial as ten seconds. `await final(end_sample)` decodes the kept audio up to end_sample
    (+ final_tail_ms); called at early_silence it starts the final speculatively, and a second call with the
    same end (at speech_stopped) reuses that decode. discard_final() drops it when speech resumes.
    `submit_kw` goes to every asr.submit (e.g. owner= and request= for the shared pool)."""

    def __init__(self, asr, *, start_sample: int = 0, partial_interval_ms: int = 800, min_partial_ms: int = 500,
                 final_tail_ms: int = 150, max_audio_ms: int = 60_000, partial_window_ms: int = 10_000,
                 submit_kw: dict | None = None):
        if partial_interval_ms <= 0 or min_partial_ms < 0 or final_tail_ms < 0:
            raise ValueError("partial_interval_ms must be > 0, min_partial_ms and final_tail_ms >= 0")
        if partial_window_ms < 2000 or max_audio_ms < partial_window_ms:
            raise ValueError(f"need partial_window_ms >= 2000 and max_audio_ms >= partial_window_ms, got "
                             f"{partial_window_ms}, {max_audio_ms}")
        self.asr = asr
        self.start_sample = start_sample
        self._interval = partial_interval_ms * SAMPLE_RATE_HZ // 1000
        self._min_partial = min_partial_ms * SAMPLE_RATE_HZ // 1000
        self._tail = final_tail_ms * SAMPLE_RATE_HZ // 1000
        self._cap = max_audio_ms * SAMPLE_RATE_HZ // 1000
        self._window = partial_window_ms * SAMPLE_RATE_HZ // 1000
        self._submit_kw = dict(submit_kw or {})
        # Utterance sample u (0 = the first sample fed) lives at self._audio[u - self._dropped].
        self._audio = np.zeros(16_000, np.float32)  # [capacity <= _cap + one chunk]; first _n - _dropped valid
        self._n = 0  # samples fed so far
        self._dropped = 0  # samples dropped from the front (beyond max_audio_ms)
        self._seg = 0  # utterance sample where the partials' current segment starts
        self._seg_first = 0  # index in `published` of the current segment's first word
        self._last_partial_n = 0
        self._prev_hyp: list[str] = []
        self.published: list[str] = []  # stable words published so far
        self._partial_job: Future | None = None
        self._final_job: tuple[int, Future] | None = None  # (speech end it was started for, job)
        self.partial_decodes = 0
        self.max_decode_samples = 0  # the longest audio any partial decoded (bounded by the window)

    # ---- audio in ----
    def feed(self, x16k: np.ndarray) -> None:
        x = np.asarray(x16k, dtype=np.float32).reshape(-1)
        if len(x) > self._cap:  # one chunk longer than the cap: only its tail is kept
            self._n += len(x) - self._cap
            self._dropped = self._n
            x = x[-self._cap:]
        kept = self._n - self._dropped
        if kept + len(x) > self._cap:  # drop the oldest, at least a second at a time (not a shift per chunk)
            cut = min(kept, kept + len(x) - self._cap + SAMPLE_RATE_HZ)
            self._audio[:kept - cut] = self._audio[cut:kept]
            self._dropped += cut
            kept -= cut
        if kept + len(x) > len(self._audio):
            grown = np.zeros(min(max(2 * len(self._audio), kept + len(x)), self._cap + SAMPLE_RATE_HZ), np.float32)
            grown[:kept] = self._audio[:kept]
            self._audio = grown
        self._audio[kept:kept + len(x)] = x
        self._n += len(x)

    @property
    def samples(self) -> int:
        """Samples fed so far (including any dropped)."""
        return self._n

    @property
    def audio(self) -> np.ndarray:
        """The kept audio (the newest max_audio_ms at most)."""
        return self._audio[:self._n - self._dropped]

    @property
    def buffer_bytes(self) -> int:
        return self._audio.nbytes

    def _span(self, a: int, b: int) -> np.ndarray:
        """A copy of utterance samples [a, b) that are still kept."""
        a = max(a, self._dropped)
        return self._audio[a - self._dropped:max(a, b) - self._dropped].copy()

    @property
    def text(self) -> str:
        """All stable words published so far."""
        return " ".join(self.published)

    # ---- partials ----
    def partial_due(self) -> bool:
        return (self._final_job is None and self._partial_job is None and self._n >= self._min_partial
                and self._n - self._last_partial_n >= self._interval)

    def _quiet_cut(self, a: int, b: int) -> int:
        """The middle of the quietest 20 ms frame in utterance samples [a, b): a likely gap between words."""
        x = self._span(a, b)
        frame = SAMPLE_RATE_HZ // 50
        k = len(x) // frame
        if k == 0:
            return b
        energy = np.square(x[:k * frame]).reshape(k, frame).sum(axis=1)
        last_min = k - 1 - int(np.argmin(energy[::-1]))  # the latest of equally quiet frames: a longer segment
        return max(a, self._dropped) + last_min * frame + frame // 2

    async def partial(self) -> str:
        """Newly stable words since the last call ("" if none, or if no decode is due)."""
        if not self.partial_due():
            return ""
        self._last_partial_n = self._n
        self._seg = max(self._seg, self._dropped)
        seal = self._n - self._seg > self._window
        end = self._quiet_cut(self._seg + self._window * 3 // 4, self._seg + self._window) if seal else self._n
        audio = self._span(self._seg, end)
        kw = dict(self._submit_kw, replace=True) if "owner" in self._submit_kw else self._submit_kw
        job = self.asr.submit(audio, final=False, **kw)
        self._partial_job = job
        self.partial_decodes += 1
        self.max_decode_samples = max(self.max_decode_samples, len(audio))
        try:
            hyp = (await asyncio.shield(asyncio.wrap_future(job))).split()
        except asyncio.CancelledError:
            if job.cancelled():
                return ""  # a final (or a newer partial) superseded this partial
            job.cancel()
            raise
        finally:
            self._partial_job = None
        if self._final_job is not None:
            return ""  # the final is authoritative from here on
        seg_pub = self.published[self._seg_first:]
        agrees = stable_prefix_len(seg_pub, hyp) == len(seg_pub)
        if seal:  # the sealed audio is fixed: its hypothesis is as good as a partial gets
            agrees = stable_prefix_len(seg_pub, hyp) == min(len(seg_pub), len(hyp))
            new = hyp[len(seg_pub):] if agrees else []
            self.published += new
            # Words already published past the cut (heard in the last partial) carry into the next segment.
            carry = max(0, len(seg_pub) - len(hyp)) if agrees else 0
            self._seg, self._seg_first, self._prev_hyp = end, len(self.published) - carry, []
            return " ".join(new)
        k = stable_prefix_len(self._prev_hyp, hyp)
        self._prev_hyp = hyp
        if k <= len(seg_pub) or not agrees:
            return ""  # nothing new agreed on, or the hypothesis now contradicts what was published: wait
        new = hyp[len(seg_pub):k]
        self.published += new
        return " ".join(new)

    # ---- final ----
    def _local_end(self, end_sample: int | None) -> int:
        """Utterance sample where the final's audio ends."""
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
        job = self.asr.submit(self._span(0, end), final=True, **self._submit_kw)
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
