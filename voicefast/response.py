"""One assistant response: LLM deltas -> SpeechOutput (phrase chunker -> TTS -> frames) -> paced audio deltas, all
overlapped. Each audio delta goes out with the transcript delta its frame finishes speaking (AudioFrame.text_end);
the SpeechOutput's audio-ms -> text map says what a listener cut off at `played_ms` has heard.
A response may start *held* (speculative start at the VAD's early silence): it generates but sends nothing
until `release()`; `discard()` drops it silently. `cancel(reason)` ends it with response.done cancelled."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from voicefast.conversation import Item, new_id
from voicefast.errors import ProtocolError
from voicefast.formats import AudioFormat
from voicefast.metrics import TurnTimings
from voicefast.playout import PlayoutClock
from voicefast.session_config import max_output_tokens, resolve_voice
from voicefast.tools import ResponseCalls, ToolSettings, plain_request_kwargs

MAX_INSTRUCTIONS_CHARS = 100_000

log = logging.getLogger("voicefast.response")


@dataclass(slots=True)
class ResponseParams:
    modalities: list[str]
    voice: str
    output_format: AudioFormat
    temperature: float
    max_output_tokens: int | str
    frame_ms: int = 100  # audio per output_audio.delta
    lead_ms: int = 300  # how far ahead of real time audio may be sent
    speed: float = 1.0
    tools: ToolSettings | None = None  # the response's tools, tool_choice, parallel_tool_calls
    tool_call_max_tokens: int = 256

    @staticmethod
    def from_request(over: dict, c, opts, voices: list[str]) -> tuple[ResponseParams, str]:
        """`response.create`'s `response` overrides on top of the session config `c` -> (params, instructions).
        Raises ProtocolError naming the bad field."""
        mods = over.get("output_modalities") or over.get("modalities")
        if mods is not None:
            if not isinstance(mods, list) or not mods or any(m not in ("text", "audio") for m in mods):
                raise ProtocolError("response.output_modalities must be ['audio'] or ['text']",
                                    param="response.output_modalities")
            mods = ["audio"] if "audio" in mods else ["text"]
        instructions = over.get("instructions", c.instructions)
        if not isinstance(instructions, str) or len(instructions) > MAX_INSTRUCTIONS_CHARS:
            raise ProtocolError(f"response.instructions must be a string of at most {MAX_INSTRUCTIONS_CHARS} "
                                f"characters", param="response.instructions")
        if "max_output_tokens" in over:
            max_tok = max_output_tokens(over["max_output_tokens"], "response.max_output_tokens")
        elif "max_response_output_tokens" in over:
            max_tok = max_output_tokens(over["max_response_output_tokens"], "response.max_response_output_tokens")
        else:
            max_tok = c.max_output_tokens
        if over.get("conversation", "auto") not in ("auto", "none"):
            raise ProtocolError("response.conversation must be 'auto' or 'none'", param="response.conversation")
        if over.get("input") is not None:
            raise ProtocolError("response.input is not supported: add items with conversation.item.create",
                                param="response.input")
        audio = over.get("audio") or {}
        out = audio.get("output") or {} if isinstance(audio, dict) else None
        if not isinstance(out, dict):
            raise ProtocolError("response.audio and response.audio.output must be objects", param="response.audio")
        voice = c.voice
        if over.get("voice") is not None:
            voice = resolve_voice(over["voice"], "response.voice", voices)
        elif out.get("voice") is not None:
            voice = resolve_voice(out["voice"], "response.audio.output.voice", voices)
        temperature = over.get("temperature", c.temperature)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ProtocolError("response.temperature must be a number in [0, 2]", param="response.temperature")
        tools = c.tools.apply(over, "response") if any(
            k in over for k in ("tools", "tool_choice", "parallel_tool_calls")) else c.tools
        p = ResponseParams(modalities=mods or c.output_modalities, voice=voice, output_format=c.output_format,
                           temperature=float(temperature), max_output_tokens=max_tok,
                           frame_ms=opts.output_frame_ms, lead_ms=opts.output_lead_ms, speed=c.speed, tools=tools,
                           tool_call_max_tokens=getattr(opts, "tool_call_max_tokens", 256))
        return p, instructions


class Response:
    def __init__(self, *, stack, params: ResponseParams, emit: Callable[[dict], None],
                 messages: Callable[[], Awaitable[list[dict] | None]], timings: TurnTimings, held: bool,
                 on_start: Callable[[Response], None], on_end: Callable[[Response], None],
                 on_call: Callable[[Response, Item, bool], None] | None = None):
        self.id = new_id("resp")
        self.stack, self.p, self._emit, self._messages, self.t = stack, params, emit, messages, timings
        self.item = Item(new_id("item"), "assistant", kind="audio" if params.modalities == ["audio"] else "text",
                         status="in_progress")
        self.audio = params.modalities == ["audio"]
        self.text = ""  # everything the LLM produced
        self.status = "in_progress"
        self.status_details: dict | None = None
        self.result = None  # engine RequestResult
        self.started = False  # response.created sent
        self.clock = PlayoutClock(lead_ms=params.lead_ms)
        self.speech = None  # SpeechOutput of an audio response, made once its messages are known
        self._gate = asyncio.Event()
        if not held:
            self._gate.set()
        self._on_start, self._on_end = on_start, on_end
        self._out: asyncio.Queue = asyncio.Queue()
        self._engine_rid: str | None = None
        self._producer: asyncio.Task | None = None
        self._llm_error: Exception | None = None
        self._emitted_text_end = 0
        # Tool calls (voicefast.tools): the parser splits speech from calls; the message item then begins with the
        # first spoken words (a call-only response has none); events wait in _later until response.created.
        tools = params.tools if params.tools is not None and params.tools.active else None
        self.calls = ResponseCalls(self, tools, on_call) if tools is not None else None
        self.outputs: list[Item] = []  # output items in order: the message (once begun) and function calls
        self.msg_begun = False
        self._later: list[Callable[[], None]] = []
        self.after: Response | None = None  # the response this one waits for (set by the session)
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"response-{self.id}")

    # -- control ---------------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return not self._gate.is_set()

    def release(self) -> None:
        self._gate.set()

    def cancel(self, reason: str) -> None:
        """End now: abort the LLM request (frees its KV blocks), stop TTS and sending."""
        if self.done.is_set() or self.status != "in_progress":
            return
        self.status = "cancelled"
        self.status_details = {"type": "cancelled", "reason": reason}
        self._abort_engine()
        self.task.cancel()

    def discard(self) -> None:
        """Drop a held (speculative) response without a trace on the wire."""
        self.status = "discarded"
        self._abort_engine()
        self.task.cancel()

    def _abort_engine(self) -> None:
        if self._engine_rid is not None:
            self.stack.engine.abort(self._engine_rid)
        if self._producer is not None:
            self._producer.cancel()
        if self.speech is not None:
            self.speech.cancel()

    def played_ms(self) -> float:
        return self.clock.played_ms(time.monotonic())

    def heard_text(self, ms: float) -> str:
        if self.speech is None:
            return ""
        return self.text[: self.speech.text_offset_at_ms(ms, whole_words=True)].rstrip()

    # -- the pipeline ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            messages = await self._messages()
            if messages is None:
                self.status = "discarded"
                return
            if self.audio:  # synthesis starts now, overlapping decoding (and the hold of a speculative start)
                self.speech = self.stack.speech_output(self.p.voice, self.p.output_format.rate_hz, self.p.frame_ms,
                                                       self.p.speed)
                self.speech.start(name=f"speech-{self.id}")
            self._producer = asyncio.create_task(self._produce(messages), name=f"produce-{self.id}")
            await self._gate.wait()
            self._start()
            await (self._speak() if self.audio else self._write_text())
            self._set_status()
        except asyncio.CancelledError:
            pass
        except Exception:  # a stage failed: tell the client (a code, no internals), keep the session
            log.error("response %s failed", self.id, exc_info=True)
            self.status = "failed"
            self.status_details = {"type": "failed", "error": {"type": "server_error", "code": "stage_failed",
                                                               "message": "a pipeline stage failed"}}
        finally:
            if self._producer is not None and not self._producer.done():
                self._abort_engine()
            pending = [t for t in (self._producer,) if t is not None and not t.done()]
            if self.speech is not None:
                pending.append(asyncio.ensure_future(self.speech.aclose()))
            if pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
            self._copy_tts_timings()
            if self.started:
                self._finish()
            self.done.set()
            self._on_end(self)

    async def _produce(self, messages: list[dict]) -> None:
        """LLM -> text deltas (into self._out for text, into the SpeechOutput for audio), as fast as it goes."""
        speech = self.speech
        try:
            max_tokens = 4096 if self.p.max_output_tokens == "inf" else int(self.p.max_output_tokens)
            kw, extra = self.calls.request_kwargs() if self.calls is not None else ({}, plain_request_kwargs(messages))
            sp = self.stack.sampling_params(temperature=self.p.temperature, max_tokens=max_tokens, **kw)
            self._engine_rid = self.id
            self.t.llm_request_s = time.monotonic()
            async for o in self.stack.engine.generate(sp, messages=messages, request_id=self.id, **extra):
                if o.text:
                    if self.t.llm_first_token_s is None:
                        self.t.llm_first_token_s = time.monotonic()
                    if self.calls is None:
                        self._say(o.text)
                    else:
                        self.calls.push(o.text)
                if o.finished:
                    self.result = o.result
            if self.calls is not None:
                self.calls.finish()
            if speech is not None:
                speech.finish()
            else:
                self._out.put_nowait(("end", None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._llm_error = e
            if speech is not None:
                speech.cancel()  # nothing more to say: _speak() raises the error
            else:
                self._out.put_nowait(("error", e))

    def _say(self, text: str) -> None:
        """Speech text of the message item (its events go out in order behind response.created)."""
        if not self.msg_begun:
            self.msg_begun = True
            self.outputs.append(self.item)
            self._when_started(self._begin_message)
        self.text += text
        if self.speech is None:
            self._out.put_nowait(("text", text))
        else:
            self.speech.add_text(text)

    def _when_started(self, fn: Callable[[], None]) -> None:
        """Run fn now if response.created is out, else right after it (a held response sends nothing yet)."""
        if self.started:
            fn()
        else:
            self._later.append(fn)

    def _ids(self) -> dict:
        return {"response_id": self.id, "item_id": self.item.id, "output_index": self.outputs.index(self.item)
                if self.item in self.outputs else 0, "content_index": 0}

    def _start(self) -> None:
        self.started = True
        self._emit({"type": "response.created", "response": self.to_dict()})
        if self.calls is None and not self.msg_begun:  # without tools the message item begins at once, before the
            # first token (a held response's producer may already have begun it through _say: it runs in _later)
            self.msg_begun = True
            self.outputs.append(self.item)
            self._begin_message()
        later, self._later = self._later, []
        for fn in later:
            fn()

    def _begin_message(self) -> None:
        self._emit({"type": "response.output_item.added", "response_id": self.id, "output_index":
                    self.outputs.index(self.item), "item": self.item.to_dict()})
        self._on_start(self)  # the session adds self.item to the conversation and emits conversation.item.added
        part = {"type": "output_audio", "transcript": ""} if self.audio else {"type": "output_text", "text": ""}
        self._emit({"type": "response.content_part.added", **self._ids(), "part": part})

    async def _write_text(self) -> None:
        while True:
            kind, val = await self._out.get()
            if kind == "end":
                break
            if kind == "error":
                raise val
            self._mark_first_output()
            self._emit({"type": "response.output_text.delta", **self._ids(), "delta": val})
            self.item.text = self.text

    async def _speak(self) -> None:
        """Frames paced to real time plus the lead (so a barge-in interrupts what is still unsaid), each after
        the transcript delta it finishes speaking."""
        speech = self.speech
        async for frame in speech.frames():
            wait = self.clock.wait_s(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            self._copy_tts_timings()
            self._mark_first_output()
            self._transcript_to(frame.text_end)
            self._emit({"type": "response.output_audio.delta", **self._ids(),
                        "delta": base64.b64encode(self.p.output_format.encode(frame.pcm)).decode("ascii")})
            self.clock.sent(len(frame.pcm) * 1000.0 / speech.out_rate_hz, time.monotonic())
            self.item.audio_ms = int(self.clock.sent_ms)
        if self._llm_error is not None:
            raise self._llm_error
        self._transcript_to(len(self.text))  # text with no audio (markup, a cancelled tail) is still transcript

    def _transcript_to(self, end: int) -> None:
        if end > self._emitted_text_end:
            delta = self.text[self._emitted_text_end:end]
            self._emitted_text_end = end
            self._emit({"type": "response.output_audio_transcript.delta", **self._ids(), "delta": delta})

    def _set_status(self) -> None:
        r = self.result
        if r is not None and getattr(r, "finish_reason", None) == "length":
            self.status, self.status_details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        elif r is not None and getattr(r, "finish_reason", None) in ("error", "abort"):
            self.status, self.status_details = "failed", {"type": "failed", "error": {
                "type": "server_error", "code": "engine_" + r.finish_reason, "message": "LLM request ended early"}}
        else:
            self.status = "completed"
        self.item.text = self.text if self.calls is None else self.text.rstrip()  # words before a call

    def _copy_tts_timings(self) -> None:
        if self.speech is not None:
            self.t.tts_request_s = self.speech.first_phrase_s
            self.t.tts_first_audio_s = self.speech.first_audio_s

    def _mark_first_output(self) -> None:
        if self.t.first_output_s is None:
            self.t.first_output_s = time.monotonic()

    def _finish(self) -> None:
        """Terminal events (done ones) for a started response, whatever its status."""
        if self.status == "in_progress":
            self.status = "cancelled"
            self.status_details = {"type": "cancelled", "reason": "client_cancelled"}
        if self.calls is not None:
            self.calls.drop_unfinished()
        if self.msg_begun:
            self._finish_message()
        r = self.result
        if r is not None:
            self.t.llm_tokens = getattr(r, "completion_tokens", 0) or 0
            self.t.llm_tok_s = getattr(r, "decode_tok_s", None)
        self._emit({"type": "response.done", "response": self.to_dict()})

    def _finish_message(self) -> None:
        if self.status == "cancelled" and self.audio:
            # What the listener heard is what the conversation keeps (the client may refine via truncate).
            self.item.text = self.heard_text(self.played_ms())
        elif self.status == "cancelled":
            self.item.text = self.text
        self.item.status = "completed" if self.status == "completed" else "incomplete"
        ids = self._ids()
        if self.audio:
            self._emit({"type": "response.output_audio.done", **ids})
            self._emit({"type": "response.output_audio_transcript.done", **ids, "transcript": self.item.text})
            part = {"type": "output_audio", "transcript": self.item.text}
        else:
            self._emit({"type": "response.output_text.done", **ids, "text": self.item.text})
            part = {"type": "output_text", "text": self.item.text}
        self._emit({"type": "response.content_part.done", **ids, "part": part})
        self._emit({"type": "response.output_item.done", "response_id": self.id,
                    "output_index": self.outputs.index(self.item), "item": self.item.to_dict()})
        self._emit({"type": "conversation.item.done", "item": self.item.to_dict()})

    def to_dict(self) -> dict:
        r = self.result
        inp = getattr(r, "prompt_tokens", 0) or 0
        outp = getattr(r, "completion_tokens", 0) or 0
        cached = getattr(r, "cached_tokens", 0) or 0
        d = {"id": self.id, "object": "realtime.response", "status": self.status,
             "status_details": self.status_details, "conversation_id": None,
             "output_modalities": list(self.p.modalities), "max_output_tokens": self.p.max_output_tokens,
             "audio": {"output": {"format": self.p.output_format.to_ga(), "voice": self.p.voice}},
             "output": [it.to_dict() for it in self.outputs if it.status != "incomplete" or it is self.item]
             if self.status != "in_progress" else [],
             "usage": {"total_tokens": inp + outp, "input_tokens": inp, "output_tokens": outp,
                       "input_token_details": {"cached_tokens": cached, "text_tokens": inp, "audio_tokens": 0},
                       "output_token_details": {"text_tokens": outp, "audio_tokens": 0}}}
        if self.status != "in_progress":
            d["metadata"] = {"voicefast_timings": self.t.to_dict()}
        return d
