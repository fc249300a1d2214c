"""SpeechOutput: the assistant's text deltas in, paced-size audio frames out, with an audio-ms -> text map.

Phrases from the TextChunker are synthesized one after another in a worker thread (the next phrase is synthesized
while the previous one's frames are consumed), resampled by one continuous StreamResampler (no clicks at phrase
joins) and cut into `frame_ms` frames (the last one zero-padded, or left short with `pad_last_frame=False`).
Synthesis runs on `executor` (the loop's default one if None; with an audio.tts_pool DeadlinePool each phrase is
dated by deadline_s(), so a first phrase goes before other responses' later ones); `start()` begins it before anyone
reads frames() (a held response synthesizes ahead), at most `max_queued_ms` of frames (plus one phrase) ahead of the
reader. For every phrase the map records which output samples speak which characters of the full text
(proportionally within a phrase), so after a barge-in the server can cut the assistant's text to what was heard:
text_offset_at_ms(played_ms, whole_words=True). cancel() stops synthesis after the current Piper sentence and drops
every queued frame; aclose() also waits for the producer task. `first_phrase_s` / `first_audio_s` (time.monotonic)
mark when the first phrase went to the synthesizer and when its first audio came back."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from audio.pcm import FrameBuffer
from audio.resample import StreamResampler
from audio.text_chunker import Phrase, TextChunker

log = logging.getLogger("voicefast.audio")


@dataclass(frozen=True, slots=True)
class AudioFrame:
    pcm: np.ndarray  # [frame_samples] float32 at out_rate_hz (the last may be shorter: pad_last_frame=False)
    text_end: int  # characters of the full text spoken by the end of this frame
    start_ms: float  # position of the frame's first sample in this output's audio
    index: int


@dataclass(frozen=True, slots=True)
class _Span:
    in_start: int  # TTS-rate sample where the phrase's audio starts
    in_end: int
    text_start: int
    text_end: int


class SpeechOutput:
    def __init__(self, tts, out_rate_hz: int, frame_ms: int = 20, *, chunker: TextChunker | None = None,
                 speaking_rate: float | None = None, executor=None, pad_last_frame: bool = True,
                 max_queued_ms: float = 10_000.0):
        if frame_ms <= 0 or out_rate_hz <= 0:
            raise ValueError(f"frame_ms and out_rate_hz must be > 0, got {frame_ms}, {out_rate_hz}")
        self.tts = tts
        self.out_rate_hz = out_rate_hz
        self.frame_ms = frame_ms
        self.frame_samples = out_rate_hz * frame_ms // 1000
        self.speaking_rate = speaking_rate
        self.executor = executor
        self.pad_last_frame = pad_last_frame
        self.chunker = chunker or TextChunker()
        self._resampler = StreamResampler(tts.sample_rate_hz, out_rate_hz)
        self._framer = FrameBuffer(self.frame_samples)
        self._phrases: asyncio.Queue[Phrase | None] = asyncio.Queue()
        self._spans: list[_Span] = []
        self._span_ends: list[int] = []  # [i] = _spans[i].in_end (for bisect)
        self._in_total = 0  # TTS-rate samples synthesized so far
        self._frames_out = 0
        self._finished = False
        self.cancelled = False
        self._text_len_final: int | None = None
        self._out: asyncio.Queue[AudioFrame | None] = asyncio.Queue()
        # Synthesis runs ahead of the reader by at most max_queued_ms of frames (plus one phrase): a long answer
        # read at real time never holds minutes of audio, and TTS work per response is paced by its listener.
        self.max_queued_ms = max_queued_ms
        self._room = asyncio.Event()
        self.max_queued_frames_seen = 0
        self._producer: asyncio.Task | None = None
        self._drained = False  # every phrase has been synthesized
        self.error: Exception | None = None
        self.first_phrase_s: float | None = None
        self.first_audio_s: float | None = None

    # ---- text in ----
    @property
    def text(self) -> str:
        return self.chunker.text

    def add_text(self, delta: str) -> None:
        """Feed the assistant's next text delta (phrases are queued for synthesis as they complete)."""
        if self._finished:
            raise RuntimeError("SpeechOutput.add_text() after finish()")
        for p in self.chunker.push_phrases(delta):
            self._phrases.put_nowait(p)

    def finish(self) -> None:
        """No more text: speak what is pending; frames() ends after the last frame."""
        if self._finished:
            return
        self._finished = True
        for p in self.chunker.flush_phrases():
            self._phrases.put_nowait(p)
        self._text_len_final = len(self.chunker.text)
        self._phrases.put_nowait(None)

    def say(self, text: str) -> None:
        self.add_text(text)
        self.finish()

    def cancel(self) -> None:
        """Stop: no more synthesis, queued frames are dropped, frames() ends."""
        self.cancelled = True
        self._finished = True
        self._room.set()
        self._phrases.put_nowait(None)
        while not self._out.empty():
            self._out.get_nowait()
        self._out.put_nowait(None)

    async def aclose(self) -> None:
        """cancel() and wait for the producer task to end (a Piper call in flight finishes in its thread)."""
        self.cancel()
        if self._producer is not None and not self._producer.done():
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer

    # ---- audio out ----
    def start(self, name: str | None = None) -> None:
        """Start synthesizing now (frames() does it otherwise); frames queue up until they are read."""
        if self._producer is None:
            self._producer = asyncio.get_running_loop().create_task(self._produce(), name=name)

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Frames as soon as they are synthesized (pacing to real time is the transport's job). A producer task
        synthesizes ahead of the consumer, so the next phrase is ready while this one plays."""
        self.start()
        while True:
            frame = await self._out.get()
            self._room.set()
            if frame is None or self.cancelled:
                if self.error is not None and not self.cancelled:
                    raise RuntimeError(f"speech synthesis failed: {type(self.error).__name__}: {self.error}"
                                       ) from self.error
                return
            yield frame

    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.cancelled:
                phrase = await self._phrases.get()
                if phrase is None:
                    break
                while self._out.qsize() * self.frame_ms > self.max_queued_ms and not self.cancelled:
                    self._room.clear()
                    await self._room.wait()
                if self.cancelled:
                    break
                if self.first_phrase_s is None:
                    self.first_phrase_s = time.monotonic()
                submit_by = getattr(self.executor, "submit_by", None)
                if submit_by is not None:  # a deadline pool (audio.tts_pool): the phrase the listener needs first
                    audio, out = await asyncio.wrap_future(submit_by(self.deadline_s(), self._synthesize, phrase.text))
                else:
                    audio, out = await loop.run_in_executor(self.executor, self._synthesize, phrase.text)
                if self.cancelled:
                    break
                for frame in self._frames_for(audio, out, phrase):
                    self._out.put_nowait(frame)
                self.max_queued_frames_seen = max(self.max_queued_frames_seen, self._out.qsize())
            if not self.cancelled:
                self._drained = True
                for frame in self._tail_frames():
                    self._out.put_nowait(frame)
        except Exception as e:  # surfaced to the consumer by frames()
            log.error("speech synthesis failed", exc_info=True)
            self.error = e
        finally:
            self._out.put_nowait(None)

    def deadline_s(self) -> float:
        """When the listener needs the next phrase (time.monotonic): now for the first one; later, when the audio
        synthesized so far has played out, counted from when the first audio came back (playback starts about
        then; the transport paces it at real time)."""
        now = time.monotonic()
        if self.first_audio_s is None or self._in_total == 0:
            return now
        return max(now, self.first_audio_s + self.ms_synthesized / 1000.0)

    def _synthesize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """On the worker: the phrase's audio at the TTS rate and resampled to the output rate (the resampler is
        this output's alone and phrases go one at a time, so its state needs no lock; it keeps the event loop
        free of the 22.05 -> 24 kHz work)."""
        if self.cancelled:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        chunks = []
        for chunk in self.tts.synthesize(text, self.speaking_rate):
            if self.first_audio_s is None:
                self.first_audio_s = time.monotonic()
            chunks.append(chunk)
            if self.cancelled:  # stop between Piper sentences
                break
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return audio, self._resampler.process(audio)

    def _frames_for(self, audio: np.ndarray, out: np.ndarray, phrase: Phrase) -> list[AudioFrame]:
        if len(audio):
            span = _Span(self._in_total, self._in_total + len(audio), phrase.start, phrase.end)
            self._spans.append(span)
            self._span_ends.append(span.in_end)
            self._in_total = span.in_end
        return self._emit(self._framer.push(out))

    def _tail_frames(self) -> list[AudioFrame]:
        frames = self._framer.push(self._resampler.flush())
        rest = self._framer.flush()
        if len(rest):  # the last frame is zero-padded to full size (or left short)
            pad = self.frame_samples - len(rest) if self.pad_last_frame else 0
            frames.append(np.concatenate([rest, np.zeros(pad, np.float32)]))
        out = self._emit(frames)
        if out:  # the last frame ends the speech: all of the text is spoken by its end
            out[-1] = dataclasses.replace(out[-1], text_end=self._text_len_final)
        return out

    def _emit(self, pcms: list[np.ndarray]) -> list[AudioFrame]:
        out = []
        for pcm in pcms:
            start_ms = self._frames_out * self.frame_ms
            self._frames_out += 1
            end_ms = start_ms + len(pcm) * 1000.0 / self.out_rate_hz
            out.append(AudioFrame(pcm, self.text_offset_at_ms(end_ms), start_ms, self._frames_out - 1))
        return out

    # ---- the map ----
    @property
    def ms_synthesized(self) -> float:
        return self._in_total * 1000.0 / self.tts.sample_rate_hz

    @property
    def phrase_spans_ms(self) -> list[tuple[float, float, int, int]]:
        """(audio start ms, audio end ms, text start, text end) of every phrase synthesized so far."""
        k = 1000.0 / self.tts.sample_rate_hz
        return [(s.in_start * k, s.in_end * k, s.text_start, s.text_end) for s in self._spans]

    def text_offset_at_ms(self, ms: float, *, whole_words: bool = False) -> int:
        """Characters of the full text spoken by `ms` of this output's audio (monotonic in ms). Proportional
        within a phrase; `whole_words` moves a cut inside a word back to that word's start (still monotonic)."""
        pos = ms * self.tts.sample_rate_hz / 1000.0  # TTS-rate sample position
        if not self._spans or pos <= 0:
            return 0
        if pos >= self._in_total:
            return self._text_len_final if self._drained else self._spans[-1].text_end
        i = bisect.bisect_right(self._span_ends, pos)
        s = self._spans[i]
        if pos <= s.in_start:
            return self._spans[i - 1].text_end if i else 0
        frac = (pos - s.in_start) / (s.in_end - s.in_start)
        cut = s.text_start + int(frac * (s.text_end - s.text_start))
        if whole_words:
            text = self.chunker.text
            while cut > s.text_start and not text[cut].isspace() and not text[cut - 1].isspace():
                cut -= 1
        return cut
