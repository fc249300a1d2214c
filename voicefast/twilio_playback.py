"""What a phone caller has heard (pure bookkeeping): assistant audio goes to Twilio as `media` frames, each chunk
followed by a `mark`; Twilio echoes a mark once the audio queued before it has played. `clear` flushes Twilio's
buffer, and Twilio then echoes every pending mark at once: those echoes are NOT heard audio, so the names of the
marks pending at a clear are remembered and their echoes ignored. What was heard of a source is therefore the
end of its last mark echoed before the clear was sent (conservative by at most the network round trip).

A source is one response (id = response id) or one prompt. An end mark (`end:<status>:<n>`) follows a
source's last chunk, so its echo says the caller has heard all of it."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

from voicefast.twilio import clear_message, mark_message, media_message

END_MARK_PREFIX = "end:"
ULAW_BYTES_PER_MS = 8  # 8 kHz, one byte per sample


@dataclass(slots=True)
class Source:
    id: str
    kind: str  # "response" | "prompt"
    item_id: str | None = None  # responses: the assistant item to truncate
    text: str = ""  # prompts: what is said
    sent_ms: float = 0.0
    heard_ms: float = 0.0
    heard_text_end: int = 0  # prompts: characters spoken by heard_ms
    pending: int = 0  # marks sent and not yet settled
    finished: bool = False  # no more audio will come (response.done seen / prompt fully handed over)
    cut: bool = False  # cleared by a barge-in
    hangup: bool = False  # prompts: end the call once it has been heard
    add_item: bool = True  # prompts: add what was heard to the conversation


@dataclass(frozen=True, slots=True)
class _Mark:
    name: str
    source: str
    end_ms: float | None  # the source's audio sent up to this mark (None: an end mark)
    text_end: int | None


class Playback:
    def __init__(self, *, media_frame_ms: int = 20, max_pending_marks: int = 4096, max_cleared_marks: int = 1024):
        self.stream_sid = ""
        self.media_frame_ms = media_frame_ms
        self.max_pending_marks, self.max_cleared_marks = max_pending_marks, max_cleared_marks
        self.sources: dict[str, Source] = {}
        self.out: list[str] = []  # Twilio frames to send
        self._marks: deque[_Mark] = deque()
        self._cleared: OrderedDict[str, None] = OrderedDict()
        self._seq = itertools.count(1)
        self.echoes_ignored = 0
        self.unknown_marks = 0
        self.clears = 0

    @property
    def playing(self) -> bool:
        """Some audio sent has not been echoed yet (the caller may be hearing it)."""
        return bool(self._marks)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._seq)}"

    def source(self, sid: str, kind: str, **kw) -> Source:
        src = self.sources.get(sid)
        if src is None:
            src = self.sources[sid] = Source(sid, kind, **kw)
        return src

    def send_audio(self, src: Source, ulaw: bytes, text_end: int | None = None) -> None:
        """One chunk: media frames of media_frame_ms, then its mark."""
        if not ulaw or src.cut or src.finished:
            return
        n = ULAW_BYTES_PER_MS * self.media_frame_ms
        for i in range(0, len(ulaw), n):
            self.out.append(media_message(self.stream_sid, ulaw[i:i + n]))
        src.sent_ms += len(ulaw) / ULAW_BYTES_PER_MS
        self._mark(src, self.next_id(src.kind[0]), src.sent_ms, text_end)

    def finish(self, src: Source, status: str) -> None:
        """No more audio for `src`: its end mark goes out (a cut source is simply forgotten)."""
        src.finished = True
        if src.cut:
            self.sources.pop(src.id, None)
        else:
            self._mark(src, f"{END_MARK_PREFIX}{status}:{next(self._seq)}", None, None)

    def _mark(self, src: Source, name: str, end_ms: float | None, text_end: int | None) -> None:
        self.out.append(mark_message(self.stream_sid, name))
        self._marks.append(_Mark(name, src.id, end_ms, text_end))
        src.pending += 1
        if len(self._marks) > self.max_pending_marks:  # a peer that never echoes: forget the oldest
            self._settle(self._marks.popleft(), heard=False)

    def on_mark(self, name: str) -> list[Source]:
        """An echo from Twilio. Returns the sources it completed (finished and fully heard)."""
        if name in self._cleared:  # flushed by our clear: echoed, not played
            del self._cleared[name]
            self.echoes_ignored += 1
            return []
        if not any(m.name == name for m in self._marks):
            self.unknown_marks += 1
            return []
        done = []
        while self._marks:  # Twilio plays in order: everything queued before this mark has played too
            m = self._marks.popleft()
            src = self._settle(m, heard=True)
            if src is not None:
                done.append(src)
            if m.name == name:
                break
        return done

    def _settle(self, m: _Mark, *, heard: bool) -> Source | None:
        src = self.sources.get(m.source)
        if src is None:
            return None
        if heard and m.end_ms is not None:
            src.heard_ms = m.end_ms
        if heard and m.text_end is not None:
            src.heard_text_end = m.text_end
        src.pending -= 1
        if src.pending > 0 or not src.finished:
            return None
        del self.sources[src.id]
        return src

    def clear(self) -> list[Source]:
        """Barge-in: `clear` goes out; every source with audio still queued is cut at what was heard so far
        (and forgotten once finished). Returns the sources cut."""
        if not self._marks:
            return []
        self.out.append(clear_message(self.stream_sid))
        self.clears += 1
        cut: list[Source] = []
        for m in self._marks:
            self._cleared[m.name] = None
            src = self.sources.get(m.source)
            if src is not None and src not in cut:
                cut.append(src)
        while len(self._cleared) > self.max_cleared_marks:
            self._cleared.popitem(last=False)
        self._marks.clear()
        for src in cut:
            src.pending, src.cut = 0, True
            if src.finished or src.kind == "prompt":
                self.sources.pop(src.id, None)
        return cut
