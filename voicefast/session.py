"""One realtime session: client events in -> server events out (through `emit`), driving the shared models.
Input audio -> 16 kHz -> VAD -> voicefast.turns (when a turn ends; checks, speculation, barge-in, idle timeout)
-> ASR final -> Response (LLM -> TTS -> paced audio). This file wires the turn module's decisions to the models;
voicefast.session_turns carries out the turn decisions and voicefast.turn_work keeps their work in flight."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from audio.asr import Transcript
from voicefast.config import ServerConfig
from voicefast.conversation import Conversation, Item, new_id
from voicefast.errors import ProtocolError
from voicefast.input_buffer import InputBuffer
from voicefast.metrics import TurnTimings
from voicefast.prefix_warm import PrefixWarmer
from voicefast.protocol import ClientEvent
from voicefast.response import Response, ResponseParams
from voicefast.session_config import SessionConfig
from voicefast.session_turns import SessionTurns
from voicefast.tools import client_tool_item, plain_request_kwargs, tools_prompt_tokens
from voicefast.turn_work import TurnWork

log = logging.getLogger("voicefast.session")
RATE_HZ = 16_000  # internal rate of VAD and ASR
# Room the server keeps for text that arrives after its item is added: a transcript of max_utterance_s of
# speech, an answer of up to 4096 tokens.
USER_TURN_RESERVE_BYTES = 4096
RESPONSE_RESERVE_BYTES = 4 * 4096


class Session(SessionTurns):
    def __init__(self, stack, opts: ServerConfig, *, emit: Callable[[dict], None], beta: bool = False,
                 defaults: SessionConfig | None = None, metrics=None):
        from audio.resample import StreamResampler

        self._Resampler = StreamResampler
        self.stack, self.opts, self._send, self.beta, self.metrics = stack, opts, emit, beta, metrics
        self.cfg = (defaults or SessionConfig()).copy()
        self.cfg.id = new_id("sess")
        self.conv = Conversation(max_items=opts.max_conversation_items, max_bytes=opts.max_conversation_bytes)
        self.inbuf = InputBuffer()  # 16 kHz input; its sample offsets are the session's input-audio clock
        self._resampler = StreamResampler(self.cfg.input_format.rate_hz, RATE_HZ)
        self.active: Response | None = None  # the response on the wire (or about to be)
        self._past: OrderedDict[str, Response] = OrderedDict()  # item id -> response, for truncate
        self._tasks: set[asyncio.Task] = set()
        self._pending_user: set[asyncio.Task] = set()  # user-item transcriptions not finished yet
        self._full_said = False  # input_audio_buffer_full already sent for the append being fed
        self.closed = False
        self.work = TurnWork(transcriber_factory=self._new_transcriber if stack.transcriber_factory else None,
                             partial_interval_ms=opts.asr_partial_interval_ms, spawn=self._spawn,
                             on_partial=self._partial_transcript)
        self._warmer = (PrefixWarmer(stack.engine, stack.sampling_params, self._spawn)
                        if opts.llm_prefix_warm and getattr(stack, "engine", None) is not None else None)
        self._vad = self.turns = None
        self._vad_base = 0
        self._new_turn_detection()

    # -- plumbing --------------------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        if not self.closed:
            self._send(event)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("session task %s failed", t.get_name(), exc_info=t.exception())

    @property
    def in_samples(self) -> int:
        return self.inbuf.end

    def ms(self, sample: int) -> int:
        return int(sample * 1000 // RATE_HZ)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.emit({"type": "session.created", "session": self.cfg.to_dict(beta=self.beta)})

    async def close(self) -> None:
        """Free everything: engine requests aborted, tasks finished, buffers dropped."""
        self.closed = True
        specs = [c.spec for c in self.work.checks.values() if c.spec is not None]
        work = self.work.tasks()
        self.work.drop_utterance(None)  # discards the held replies
        queued = []  # the active response and those it waits for (Response.after)
        r = self.active
        while r is not None and r not in queued:
            queued.append(r)
            r = r.after
        for r in queued:
            r.cancel("client_cancelled") if not r.held else r.discard()
        tasks = [t for t in self._tasks] + work + [r.task for r in [*queued, *specs]]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.inbuf.clear()
        self._past.clear()
        self.active = None

    # -- client events ---------------------------------------------------------------------------------
    def handle(self, ev: ClientEvent) -> None:
        """Apply one validated client event. Raises ProtocolError (the caller sends it as `error`)."""
        try:
            getattr(self, "_on_" + ev.type.replace(".", "_"))(ev.data)
        except ProtocolError as e:
            e.event_id = ev.event_id
            raise

    def _on_session_update(self, d: dict) -> None:
        new = self.cfg.apply(d["session"], beta=self.beta, voices=self.stack.voice_names,
                             languages=self.stack.asr_languages)
        old = self.cfg
        self.cfg = new
        if new.input_format != old.input_format:
            self._resampler = self._Resampler(new.input_format.rate_hz, RATE_HZ)
        if new.turn_detection != old.turn_detection:
            self._drop_utterance()
            try:
                self._new_turn_detection()
            except ProtocolError:
                self.cfg = old
                self._new_turn_detection()
                raise
        self.emit({"type": "session.updated", "session": new.to_dict(beta=self.beta)})

    def _on_input_audio_buffer_append(self, d: dict) -> None:
        x = self.cfg.input_format.decode(d["audio_bytes"])
        self.feed_audio(x)

    def _on_input_audio_buffer_commit(self, d: dict) -> None:
        u = self.turns.utt if self.turns is not None else None
        start = u.start_sample - self._pad_samples() if u else self.inbuf.start
        audio = self.inbuf.slice(start)
        if len(audio) < RATE_HZ // 10:
            raise ProtocolError(f"buffer too small: expected at least 100ms of audio, have "
                                f"{self.ms(len(audio))}ms", code="input_audio_buffer_commit_empty")
        self._check_transcription_room()
        item_id = u.item_id if u else new_id("item")
        self._drop_utterance()
        end = self.in_samples
        t = TurnTimings(speech_end_s=self.inbuf.arrival_time(end), speech_end_audio_ms=self.ms(end),
                        endpoint_s=time.monotonic(), turn_reason="commit")
        self._commit(item_id, audio, t, self._spawn(self._transcribe(audio, t), "asr-final"))
        self.inbuf.trim(self.in_samples)

    def _on_input_audio_buffer_clear(self, d: dict) -> None:
        self._drop_utterance()
        self.inbuf.trim(self.in_samples)
        self.emit({"type": "input_audio_buffer.cleared"})

    def _on_conversation_item_create(self, d: dict) -> None:
        """All or nothing: every check (id, content, sizes, audio, position, caps, transcription room) runs
        before the item is added; a refused item leaves no trace and its id stays free."""
        it = d["item"]
        if it.get("type", "message") != "message":  # function_call / function_call_output (voicefast.tools)
            item = client_tool_item(it, self.conv)
            prev = d.get("previous_item_id")
            self._check_client_item(item, prev)
            self.conv.add(item, prev)
            for t in ("conversation.item.added", "conversation.item.done"):
                self.emit({"type": t, "previous_item_id": self.conv.previous_id(item), "item": item.to_dict()})
            return
        item_id = it.get("id") or new_id("item")
        if not isinstance(item_id, str) or len(item_id) > 64:
            raise ProtocolError("item.id must be a string of at most 64 characters", param="item.id")
        texts, audio = [], []
        for part in it["content"]:
            if part["type"] in ("input_audio", "audio"):
                audio.append(part)
            else:
                v = part.get("text", part.get("transcript", ""))
                if not isinstance(v, str):
                    raise ProtocolError("content text must be a string", param="item.content.text")
                texts.append(v)
        kind = "audio" if audio and it["role"] != "system" else "text"
        item = Item(item_id, it["role"], " ".join(texts), kind=kind)
        prev = d.get("previous_item_id")
        x = self._decode_item_audio(audio)  # validates the audio of every role
        transcribe = bool(audio) and item.role == "user"
        if transcribe:
            self._check_transcription_room()
            item.show_transcript = self.cfg.transcription is not None
        self._check_client_item(item, prev)
        # -- every check passed: from here on nothing raises --
        self.conv.add(item, prev)
        if transcribe:
            task = self._spawn(self._transcribe(x, None), "asr-item")
            done = self._finish_user_item(item, task, added=True, seconds=len(x) / RATE_HZ)
            self._track_pending(self._spawn(done, "user-item"))
        self.emit({"type": "conversation.item.added", "previous_item_id": self.conv.previous_id(item),
                   "item": item.to_dict()})
        if not transcribe:  # a transcribed item is done when its transcript is
            self.emit({"type": "conversation.item.done", "previous_item_id": self.conv.previous_id(item),
                       "item": item.to_dict()})

    def _check_client_item(self, item: Item, prev: object) -> None:
        """A client's item fits: its size, its position and id, the conversation's caps (raises, changes nothing)."""
        if item.text_bytes > self.opts.max_item_bytes:
            raise ProtocolError(f"item text is {item.text_bytes} bytes; the maximum is {self.opts.max_item_bytes}",
                                code="conversation_item_too_large", param="item.content")
        if prev is not None and not isinstance(prev, str):
            raise ProtocolError("previous_item_id must be a string", code="invalid_type", param="previous_item_id")
        self.conv.check_add(item, prev)
        self.conv.check_room(item)

    def _check_transcription_room(self) -> None:
        if len(self._pending_user) >= self.opts.max_pending_transcriptions:
            raise ProtocolError(f"{len(self._pending_user)} transcriptions of this session are still pending; "
                                f"wait for their completed events", code="too_many_pending_transcriptions")

    def _decode_item_audio(self, parts: list[dict]) -> np.ndarray:
        import base64
        import binascii

        from audio.resample import resample

        chunks = []
        for p in parts:
            a = p.get("audio")
            if a is None:
                continue
            if not isinstance(a, str):
                raise ProtocolError("content audio must be a base64 string", code="invalid_type",
                                    param="item.content.audio")
            try:
                raw = base64.b64decode(a, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ProtocolError("content audio is not valid base64", code="invalid_base64",
                                    param="item.content.audio") from None
            chunks.append(self.cfg.input_format.decode(raw))
        x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if len(x) > self.max_utterance_samples * self.cfg.input_format.rate_hz // RATE_HZ:
            raise ProtocolError(f"item audio is {len(x) / self.cfg.input_format.rate_hz:.1f} s; the maximum is "
                                f"{self.opts.max_utterance_s:g} s", code="input_audio_too_long",
                                param="item.content.audio")
        return resample(x, self.cfg.input_format.rate_hz, RATE_HZ)

    @property
    def max_utterance_samples(self) -> int:
        """16 kHz samples after which an utterance ends (turn detection) and beyond which item audio is refused."""
        return int(min(self.opts.max_utterance_s, self.opts.max_input_buffer_s) * RATE_HZ)

    def _on_conversation_item_truncate(self, d: dict) -> None:
        item = self.conv.find(d["item_id"])
        if item is None:
            raise ProtocolError(f"item {d['item_id']!r} not found", code="item_not_found", param="item_id")
        if item.role != "assistant" or item.kind != "audio":
            raise ProtocolError("only assistant audio items can be truncated", code="invalid_value",
                                param="item_id")
        ms = d["audio_end_ms"]
        if ms > item.audio_ms:
            raise ProtocolError(f"audio_end_ms {ms} is past the item's audio ({item.audio_ms} ms)",
                                code="invalid_value", param="audio_end_ms")
        r = self._past.get(item.id) or (self.active if self.active and self.active.item is item else None)
        if r is not None and r is self.active and r.status == "in_progress":
            r.cancel("client_cancelled")
        item.text = r.heard_text(ms) if r is not None else item.text
        item.audio_ms = ms
        self.emit({"type": "conversation.item.truncated", "item_id": item.id, "content_index": 0,
                   "audio_end_ms": ms})

    def _on_conversation_item_delete(self, d: dict) -> None:
        self.conv.delete(d["item_id"])
        self._past.pop(d["item_id"], None)
        self.emit({"type": "conversation.item.deleted", "item_id": d["item_id"]})

    def _on_conversation_item_retrieve(self, d: dict) -> None:
        item = self.conv.find(d["item_id"])
        if item is None:
            raise ProtocolError(f"item {d['item_id']!r} not found", code="item_not_found", param="item_id")
        self.emit({"type": "conversation.item.retrieved", "item": item.to_dict()})

    def _on_response_create(self, d: dict) -> None:
        if self.active is not None and not self.active.done.is_set():
            raise ProtocolError(f"conversation already has an active response {self.active.id}",
                                code="conversation_already_has_active_response")
        over = d.get("response") or {}
        _, instructions = ResponseParams.from_request(over, self.cfg, self.opts, self.stack.voice_names)
        heard = over.get("conversation") != "none" and (
            self._pending_user or any(it.llm_text().strip() for it in self.conv.items))
        if not instructions.strip() and not heard:  # the model would get an empty prompt
            raise ProtocolError("nothing to respond to: no instructions and no conversation items with content",
                                code="invalid_value", param="response")
        self._start_response(over, TurnTimings(), None, held=False)

    def _on_response_cancel(self, d: dict) -> None:
        r = self.active
        if r is None or r.done.is_set() or r.status != "in_progress":
            raise ProtocolError("no active response to cancel", code="response_cancel_not_active")
        if d.get("response_id") not in (None, r.id):
            raise ProtocolError(f"response {d['response_id']!r} is not active", code="response_cancel_not_active",
                                param="response_id")
        r.cancel("client_cancelled")

    def _on_output_audio_buffer_clear(self, d: dict) -> None:
        if self.active is not None and self.active.status == "in_progress":
            self.active.cancel("client_cancelled")
        self.emit({"type": "output_audio_buffer.cleared", "response_id": self.active.id if self.active else None})

    def _make_room(self, reserve_bytes: int) -> None:
        """The server's own items always fit: the oldest items are evicted (and said so) instead."""
        for old in self.conv.make_room(reserve_bytes):
            self._past.pop(old.id, None)
            self.emit({"type": "conversation.item.deleted", "item_id": old.id})

    def _commit(self, item_id: str, audio: np.ndarray, t: TurnTimings, asr: asyncio.Task) -> asyncio.Task | None:
        self._make_room(USER_TURN_RESERVE_BYTES)
        prev = self.conv.previous_id()
        item = Item(item_id, "user", kind="audio", status="completed",
                    show_transcript=self.cfg.transcription is not None)
        self.conv.add(item)
        self.emit({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": prev})
        self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": item.to_dict()})
        seconds = len(audio) / RATE_HZ
        if asr.done() and not asr.cancelled() and asr.exception() is None:
            self._user_item_transcribed(item, asr.result(), seconds)  # speculation already has it: say so first
            return None
        task = self._spawn(self._finish_user_item(item, asr, added=True, seconds=seconds), "user-item")
        self._track_pending(task)
        return task

    def _track_pending(self, task: asyncio.Task) -> None:
        self._pending_user.add(task)
        task.add_done_callback(self._pending_user.discard)

    def _asr_kw(self, **kw) -> dict:
        """What every ASR job of this session carries: its owner (a fair share of the pool, a bounded queue) and
        its transcription settings: the language, and the prompt (the conversation's context plus the client's
        own input_audio_transcription.prompt, voicefast.asr_context)."""
        from audio.asr import DecodeRequest

        tr = self.cfg.transcription
        request = DecodeRequest(language=tr.language if tr else None, prompt=self._asr_prompt())
        return {"owner": self.cfg.id, "request": request, **kw}

    def _new_transcriber(self):
        """The streaming transcriber of a new utterance (partials); none while transcription is off (partials
        are transcription events)."""
        if self.cfg.transcription is None:
            return None
        return self.stack.transcriber_factory(submit_kw=self._asr_kw())

    async def _transcribe(self, x16: np.ndarray, t: TurnTimings | None, *, replace: object = False) -> str:
        """The final transcript of `x16` (a Transcript when the ASR says how sure it was of the last word).
        `replace`: a key (the utterance's item id) under which a newer check's final replaces this one while it
        is still queued in the session's ASR lane."""
        if t is not None:
            t.asr_start_s = time.monotonic()
        raw = await self.stack.asr.transcribe_async(x16, **self._asr_kw(replace=replace))
        text = raw.strip()
        if t is not None:
            t.asr_end_s = time.monotonic()
        p = getattr(raw, "last_word_probability", None)  # audio.asr.Transcript: kept for the turn's text witness
        return Transcript(text, p) if p is not None else text

    async def _finish_user_item(self, item: Item, asr: asyncio.Task, *, added: bool, seconds: float) -> None:
        try:
            item.text = await asr
        except asyncio.CancelledError:
            raise
        except Exception:  # details in the log; the client gets a code
            log.warning("transcription failed", exc_info=True)
            if not item.show_transcript:
                return
            self.emit({"type": "conversation.item.input_audio_transcription.failed", "item_id": item.id,
                       "content_index": 0, "error": {"type": "server_error", "code": "transcription_failed",
                                                     "message": "transcription failed"}})
            return
        self._user_item_transcribed(item, item.text, seconds)

    def _user_item_transcribed(self, item: Item, text: str, seconds: float) -> None:
        item.text = text
        if item.show_transcript:  # transcription off: the LLM still hears it, the client is not told
            self.emit({"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                       "content_index": 0, "transcript": item.text,
                       "usage": {"type": "duration", "seconds": round(seconds, 3)}})
        if self.conv.find(item.id) is not None:
            self.emit({"type": "conversation.item.done", "previous_item_id": self.conv.previous_id(item),
                       "item": item.to_dict()})

    # -- responses -------------------------------------------------------------------------------------
    def _start_response(self, over: dict, t: TurnTimings, asr: asyncio.Task | None, *, held: bool,
                        answer_silence: bool = False, user_item_id: str | None = None) -> Response:
        p, instructions = ResponseParams.from_request(over, self.cfg, self.opts, self.stack.voice_names)
        isolated = over.get("conversation") == "none"
        previous = self.active

        async def messages() -> list[dict] | None:
            while r.after is not None and not r.after.done.is_set():  # re-checked: _supersede may re-point it
                await r.after.done.wait()
            extra: list[Item] = []
            if asr is not None and held:  # speculative: the user item may not exist yet
                text = await asr
                if not text:
                    return None
                user = self.conv.find(user_item_id) if user_item_id else None
                if user is None:
                    extra = [Item("pending", "user", text)]
                elif not user.text:  # committed while this waited; its transcript is this one
                    user.text = text
            else:
                if self._pending_user:
                    await asyncio.gather(*list(self._pending_user), return_exceptions=True)
                last_user = next((it for it in reversed(self.conv.items) if it.role == "user"), None)
                if over == {} and last_user is not None and last_user.kind == "audio" and not last_user.text \
                        and not answer_silence:
                    return None  # the turn transcribed to nothing (noise): no response
            msgs = self._prompt_messages(p, instructions, isolated=isolated, extra=extra)
            return msgs or None  # nothing to say (the conversation emptied meanwhile): no response

        r = Response(stack=self.stack, params=p, emit=self.emit, messages=messages, timings=t, held=held,
                     on_start=self._response_started, on_end=self._response_ended, on_call=self._response_call)
        r.after = previous if previous is not None and not previous.done.is_set() else None
        if not held:
            self._supersede(r)
            self.active = r
        return r

    def _prompt_messages(self, p: ResponseParams, instructions: str, *, isolated: bool = False,
                         extra: list[Item] = ()) -> list[dict]:
        """The chat messages of a response with params `p`. The prompt keeps at least half the context, whatever
        max_output_tokens (and a tool call's own budget) asks (the reply is then cut at the context's end: status
        incomplete)."""
        max_tok = p.max_output_tokens
        tools = p.tools is not None and p.tools.active
        reserve = (256 if max_tok == "inf" else int(max_tok)) + (p.tool_call_max_tokens if tools else 0)
        budget = self.stack.max_model_len - min(reserve, self.stack.max_model_len // 2)
        if tools:  # the tool descriptions are part of the prompt
            budget -= tools_prompt_tokens(p.tools.tools, self.stack.count_tokens)
        conv = self.conv if not isolated else type(self.conv)()
        return conv.messages(instructions, count_tokens=self.stack.count_tokens, max_prompt_tokens=budget,
                             extra=extra)

    def _warm_reply_prefix(self) -> None:
        """While the caller speaks (at the start of speech, then after each partial): prefill the prompt of the reply
        a turn ending now would get (the published partial words as the user's message), so the reply's prefill at
        the end of the turn is only what the final transcript changed (voicefast.prefix_warm). Not while a response
        of this session is queued or running, nor once a pause began."""
        u, w = self.work.utt, self._warmer
        if w is None or u is None or u.transcriber is None or self.closed:
            return
        if self.active is not None and not self.active.done.is_set():
            return
        # Only while the caller is still speaking: once a pause began, its check's ASR final (and then the held
        # reply) is the critical path, and a warm there only takes CPU from it (measured on 2 cores: ASR final
        # p50 +35 ms when warms ran into the pause)
        if self.turns is None or not self.turns.speaking or self.work.checks:
            return
        try:
            text = u.transcriber.text
            p, instructions = ResponseParams.from_request({}, self.cfg, self.opts, self.stack.voice_names)
            if text:
                msgs = self._prompt_messages(p, instructions, extra=[Item("pending", "user", text)])
            else:  # at the start of speech, no words yet: the conversation up to the user's turn marker
                msgs = self._prompt_messages(p, instructions) + [{"role": "user", "content": ""}]
            kw = {"tools": p.tools.tools} if p.tools is not None and p.tools.active else plain_request_kwargs(msgs)
            w.warm(msgs, kw)
        except Exception:  # an optimization: its failure must never reach the turn handling that called it
            log.error("prefix warm failed", exc_info=True)

    @staticmethod
    def _supersede(r: Response) -> None:
        """If `r` would wait for a response that is itself only queued behind a running one, the newer turn
        replaces the queued one (its user item is in the conversation, so `r` answers it too). A session so holds
        at most one running, one queued and one speculative response: at most three engine requests and TTS
        streams, however many turns a client ends while an answer plays (interrupt_response=false)."""
        q = r.after
        if q is not None and q.after is not None and not q.started and not q.done.is_set():
            r.after = q.after
            q.discard()

    def _response_started(self, r: Response) -> None:
        self.active = r
        self._make_room(RESPONSE_RESERVE_BYTES)
        prev = self.conv.previous_id()
        self.conv.add(r.item)
        self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": r.item.to_dict()})

    def _response_call(self, r: Response, item: Item, added: bool) -> None:
        """A function_call item of a response begins (added to the conversation) or was cut off (deleted)."""
        if added:
            self._make_room(RESPONSE_RESERVE_BYTES)
            prev = self.conv.previous_id()
            self.conv.add(item)
            self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": item.to_dict()})
        elif self.conv.find(item.id) is not None:
            self.conv.delete(item.id)
            self.emit({"type": "conversation.item.deleted", "item_id": item.id})

    def _response_ended(self, r: Response) -> None:
        if self.active is r:
            self.active = None
        if r.started and self.turns is not None:  # the idle timeout counts from the end of its playback
            left_ms = max(0.0, r.clock.sent_ms - r.played_ms())
            self.turns.response_audio_ends(self.in_samples + int(left_ms * RATE_HZ / 1000))
        if r.started:
            self._past[r.item.id] = r
            while len(self._past) > 8:
                self._past.popitem(last=False)
            if self.metrics is not None:
                self.metrics.responses_total.labels(r.status).inc()
                if r.status in ("completed", "incomplete"):  # incomplete = cut at max_output_tokens: still a turn
                    self.metrics.observe_turn(r.t)
