"""Turn-taking, sans-I/O: VAD events, end-of-turn verdicts and transcripts in; decisions out as actions.

No audio, models, clocks or tasks here: time is the session's input-audio sample clock (16 kHz samples since the
session began), so the same inputs always give the same actions and tests drive it with plain numbers.

  server_vad    the turn ends after `silence_duration_ms` of silence; at `EARLY_SILENCE_MS` the session may start
                the reply speculatively (held), released at the end of the turn or dropped if speech resumes.
  semantic_vad  at each pause the session is asked for a *check*: the ASR final of the turn so far (at
                `transcript_ms` of silence, by eagerness; the speculative reply starts on that transcript, held)
                and the end-of-turn model's probability on the audio at `check_ms` of silence (AskModel, or in
                the StartCheck itself when both are due at once). The turn ends at once when the witnesses agree it is
                complete (audio probability >= `threshold` and the transcript not unfinished, voicefast.turn_text);
                otherwise it ends anyway after `max_silence_ms`, or the check is dropped when speech resumes.
  barge-in      speech while a response plays is a candidate: after `barge_in_min_ms` the session transcribes
                it; a backchannel ("mm-hm", "okay") is dropped at its pause and the reply goes on; anything else,
                or speech longer than `backchannel_max_ms`, interrupts (speech_started, response cancelled).
  idle timeout  `idle_timeout_ms` after the last response's audio finished playing without the user speaking,
                the session commits the silence and answers (OpenAI's input_audio_buffer.timeout_triggered).
  max utterance an utterance (speech or noise) that lasts `max_utterance_ms` ends there as if the speaker had
                paused (a candidate barge-in is dropped), and the VAD starts afresh: speech that goes on is a new
                turn. The utterance's audio, its partials and its final decode so stay bounded.

Inputs: on_vad(kind, sample, now), on_audio(now) (it also asks the model when due), on_transcript(check_id, text),
on_verdict(check_id, p), response_audio_ends(sample), reset(). Each returns the list of actions the session must
carry out, in order."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from voicefast.turn_text import is_backchannel, unfinished

RATE_HZ = 16_000
EARLY_SILENCE_MS = 160  # server_vad: silence after which the reply starts speculatively


@dataclass(frozen=True, slots=True)
class Eagerness:
    check_ms: int  # silence before the end-of-turn model is asked
    max_silence_ms: int  # silence after which the turn ends whatever the witnesses said
    threshold: float  # end-of-turn probability at or above which the audio witness says "complete"
    transcript_ms: int | None = None  # silence at which the check's transcript starts (None: at check_ms)


# OpenAI documents only the maximum waits (low 8 s, medium 4 s, high 2 s); these are ours, measured with
# `voicefast bench turns` (docs/benchmarks.md); auto = medium. The check time matters more than the threshold: at
# 96 ms of silence Whisper and the model misjudge cut-off phrases far more often (8/24 cuts vs 2/24 at 128-160
# ms), and at 160 ms 94 % of complete questions end at the first check (89 % at 128 ms; the rest wait
# max_silence_ms). The transcript vetoes unfinished phrases; the audio model holds a turn only when it is fairly
# sure it is unfinished (below `threshold`): on TTS speech it scores many complete questions 0.15-0.45 at ~130 ms
# of silence, and the cut-off phrases it catches score < 0.1.
# The transcript (and the speculative reply on it) starts at `transcript_ms`, before the model: Whisper's words at
# 64 ms of silence vetoed the same cut-off phrases as at 160 ms (auto: 2/24 cuts either way, 94 % of complete
# questions ended at their first check after the end of speech), so the ASR final and the LLM's prefill run ~96 ms
# sooner; the cost is more checks at short pauses inside a sentence (2.0 per turn instead of 1.37 at 64 ms), each
# dropped when speech resumes.
EAGERNESS = {
    "high": Eagerness(check_ms=96, max_silence_ms=500, threshold=0.1, transcript_ms=64),
    "medium": Eagerness(check_ms=160, max_silence_ms=1200, threshold=0.2, transcript_ms=64),
    "low": Eagerness(check_ms=192, max_silence_ms=2500, threshold=0.5, transcript_ms=96),
}
EAGERNESS["auto"] = EAGERNESS["medium"]
WITNESSES = ("both", "audio", "text")


@dataclass(frozen=True, slots=True)
class TurnPolicy:
    semantic: bool = True
    check_ms: int = EAGERNESS["auto"].check_ms  # semantic: first check; server_vad: speculative start
    # semantic: silence after which the check's transcript (and the speculative reply on it) starts, ahead of the
    # end-of-turn model at check_ms, so the ASR final runs while the pause is still being listened to. None: at
    # check_ms.
    transcript_ms: int | None = None
    end_silence_ms: int = EAGERNESS["auto"].max_silence_ms  # server_vad: silence_duration_ms; semantic: max silence
    threshold: float = EAGERNESS["auto"].threshold
    witness: str = "both"  # which witnesses must say "complete": "both", "audio" (model only), "text" (words only)
    create_response: bool = True
    interrupt_response: bool = True
    speculative: bool = True  # start the reply at the check (held until the end of the turn)
    idle_timeout_ms: int | None = None
    barge_in_min_ms: int = 300  # speech during a response shorter than this is noise
    backchannel_max_ms: int = 900  # speech during a response longer than this interrupts, whatever it says
    max_utterance_ms: int | None = None  # an utterance this long ends the turn (None: no limit)

    @property
    def early_ms(self) -> int:
        """Silence at which the VAD's early_silence fires: the transcript (semantic) or the speculative start."""
        return self.transcript_ms if self.semantic and self.transcript_ms is not None else self.check_ms

    def __post_init__(self) -> None:
        if self.witness not in WITNESSES:
            raise ValueError(f"witness must be one of {WITNESSES}, got {self.witness!r}")
        if not 0 < self.check_ms <= self.end_silence_ms:
            raise ValueError(f"need 0 < check_ms <= end_silence_ms, got {self.check_ms}, {self.end_silence_ms}")
        if self.transcript_ms is not None and not 0 < self.transcript_ms <= self.check_ms:
            raise ValueError(f"need 0 < transcript_ms <= check_ms, got {self.transcript_ms}, {self.check_ms}")
        if self.barge_in_min_ms < 0 or self.backchannel_max_ms < self.barge_in_min_ms:
            raise ValueError("need 0 <= barge_in_min_ms <= backchannel_max_ms")
        if self.max_utterance_ms is not None and self.max_utterance_ms < 1000:
            raise ValueError(f"max_utterance_ms must be >= 1000 (or None), got {self.max_utterance_ms}")

    @classmethod
    def for_mode(cls, mode: str, *, eagerness: str = "auto", silence_duration_ms: int = 500, **kw) -> TurnPolicy:
        if mode == "semantic_vad":
            e = EAGERNESS[eagerness]
            tx = kw.pop("transcript_ms", e.transcript_ms)  # 0: with the model at check_ms; capped at check_ms
            kw["transcript_ms"] = min(tx, e.check_ms) if tx else None
            return cls(semantic=True, check_ms=e.check_ms, end_silence_ms=e.max_silence_ms, threshold=e.threshold,
                       **kw)
        kw.pop("transcript_ms", None)
        return cls(semantic=False, check_ms=min(EARLY_SILENCE_MS, silence_duration_ms),
                   end_silence_ms=silence_duration_ms, **kw)


# -- actions (what the session must do) ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Begin:
    """Speech began: keep its audio from `start_sample` (less prefix padding); announced = speech_started now
    (False: a candidate barge-in during a response, announced later or dropped)."""
    item_id: str
    start_sample: int
    announced: bool


@dataclass(frozen=True, slots=True)
class Announce:
    """A candidate became a turn: send speech_started; `interrupt`: cancel the response that is playing."""
    item_id: str
    start_sample: int
    interrupt: bool


@dataclass(frozen=True, slots=True)
class StartCheck:
    """Transcribe the utterance's audio [start_sample - padding, end_sample) and report on_transcript(check_id);
    with `use_model` also report on_verdict(check_id) from the end-of-turn model on the same audio; with
    `speculate` start the reply on that transcript, held. purpose: "end_of_turn" | "speculate" | "barge_in"."""
    check_id: int
    item_id: str
    start_sample: int
    end_sample: int
    speech_end_sample: int | None  # where the pause began (None for a barge-in check made while speaking)
    purpose: str
    use_model: bool
    speculate: bool


@dataclass(frozen=True, slots=True)
class AskModel:
    """The pause reached check_ms after its transcript started early (TurnPolicy.transcript_ms): ask the end-of-turn
    model on the utterance's audio [start_sample - padding, end_sample) and report on_verdict(check_id)."""
    check_id: int
    start_sample: int
    end_sample: int


@dataclass(frozen=True, slots=True)
class CancelCheck:
    """Speech resumed (or the utterance was dropped): drop that check's work and its held reply."""
    check_id: int


@dataclass(frozen=True, slots=True)
class EndTurn:
    """The turn is over: speech_stopped at end_sample, commit the user item, respond (create_response). The
    check's transcript and held reply, if `check_id` is set, are this turn's. reason: "silence" (server_vad
    window), "complete" (semantic witnesses agreed), "max_silence" (semantic fallback), "max_utterance" (it lasted
    max_utterance_ms). silence_ms: the silence heard after the end of speech when the deciding observation was
    made (audio clock)."""
    item_id: str
    start_sample: int
    end_sample: int
    check_id: int | None
    reason: str
    silence_ms: int
    create_response: bool
    checks: int = 0  # end-of-turn checks this turn had (semantic_vad: one per pause)
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class DropUtterance:
    """Not a turn (noise shorter than barge_in_min_ms, a backchannel, or a candidate barge-in that reached
    max_utterance_ms): forget it, send nothing."""
    item_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RestartVad:
    """An utterance was cut at max_utterance_ms while the VAD may still hear speech: start the VAD stream afresh,
    so speech that goes on begins a new turn at its next onset."""


@dataclass(frozen=True, slots=True)
class IdleTimeout:
    """idle_timeout_ms of silence after the last response finished playing: send timeout_triggered, commit the
    silent audio [start_sample, end_sample) as a user item and respond."""
    item_id: str
    start_sample: int
    end_sample: int


Action = Begin | Announce | StartCheck | AskModel | CancelCheck | EndTurn | DropUtterance | IdleTimeout | RestartVad


@dataclass(slots=True)
class Verdict:
    """What the witnesses said at one check."""
    probability: float | None = None  # end-of-turn model, None until it answered (or not asked)
    text: str | None = None  # transcript, None until it arrived
    text_failed: bool = False
    last_word_probability: float | None = None
    complete: bool | None = None  # the combined decision, once made
    why: str = ""  # why not complete: "audio 0.31 < 0.5", "trailing preposition 'for'"


@dataclass(slots=True)
class _Utterance:
    item_id: str
    start_sample: int
    announced: bool
    silence_start: int | None = None  # in a pause since this sample (early_silence seen, no resumption yet)
    check_id: int | None = None  # the live end-of-turn / speculation check
    check: Verdict | None = None
    check_at: int = 0  # input sample when the live check's last witness was asked
    model_due: int | None = None  # input sample at which the live check's end-of-turn model is to be asked
    checks: int = 0
    barge_check_id: int | None = None
    backchannel: bool | None = None  # the candidate's transcript: True backchannel, False real speech
    verdicts: list[Verdict] = field(default_factory=list)


class TurnTaker:
    def __init__(self, policy: TurnPolicy, *, new_id: Callable[[], str] | None = None):
        self.policy = policy
        self._new_id = new_id or (lambda: f"item_{uuid.uuid4().hex[:20]}")
        self._ids = itertools.count(1)
        self.utt: _Utterance | None = None
        self.responding = False  # the session keeps this current: a response is in progress
        self.now = 0  # the latest input sample seen
        self._idle_from: int | None = None  # input sample where the last response's audio ends (idle armed)

    @property
    def in_turn(self) -> bool:
        return self.utt is not None

    @property
    def speaking(self) -> bool:
        """The user is speaking in an announced turn (not paused): when streaming partials are worth making."""
        u = self.utt
        return u is not None and u.announced and u.silence_start is None

    def _ms(self, samples: int) -> int:
        return samples * 1000 // RATE_HZ

    def _samples(self, ms: int) -> int:
        return ms * RATE_HZ // 1000

    # -- inputs ----------------------------------------------------------------------------------------------
    def on_vad(self, kind: str, sample: int, now: int) -> list[Action]:
        self.now = max(self.now, now)
        u = self.utt
        if kind in ("speech_started", "speech_resumed"):
            if u is None:
                return self._begin(sample)
            if u.silence_start is None:
                return []
            u.silence_start = None
            return self._cancel_check(u)
        if u is None:
            return []  # a pause or stop of speech whose turn already ended (semantic) or was dropped
        if kind == "early_silence":
            u.silence_start = sample
            return self._candidate_paused(u) if not u.announced else self._pause(u, sample)
        if kind == "speech_stopped":
            if not u.announced:
                return self._drop(u, "backchannel" if u.backchannel else "noise")
            reason = "max_silence" if self.policy.semantic else "silence"
            return self._end(u, sample, reason, self.policy.end_silence_ms)
        raise ValueError(f"unknown VAD event {kind!r}")

    def on_audio(self, now: int) -> list[Action]:
        """The input clock advanced to `now` (after every chunk): max utterance, barge-in guard, idle timeout."""
        self.now = max(self.now, now)
        u = self.utt
        cap = self.policy.max_utterance_ms
        if u is not None and cap is not None and self.now - u.start_sample >= self._samples(cap):
            return self._cut(u) + [RestartVad()]
        out: list[Action] = self._ask_model_if_due(u) if u is not None else []
        if u is not None and not u.announced and u.silence_start is None:
            spoken = self.now - u.start_sample
            if spoken >= self._samples(self.policy.backchannel_max_ms):
                out += self._announce(u)
            elif spoken >= self._samples(self.policy.barge_in_min_ms) and u.barge_check_id is None:
                out.append(self._check(u, "barge_in", None, use_model=False, speculate=False))
        idle = self.policy.idle_timeout_ms
        if u is None and not self.responding and self._idle_from is not None and idle is not None and \
                self.now - self._idle_from >= self._samples(idle):
            start, self._idle_from = self._idle_from, None
            out.append(IdleTimeout(self._new_id(), start, self.now))
        return out

    def on_transcript(self, check_id: int, text: str | None, last_word_probability: float | None = None
                      ) -> list[Action]:
        """The check's transcript (None: the ASR failed; the audio witness then decides alone), and how sure the
        ASR was of its last word (voicefast.turn_text.unfinished)."""
        u = self.utt
        if u is None:
            return []
        if check_id == u.barge_check_id and not u.announced:
            u.backchannel = text is not None and is_backchannel(text)
            if not u.backchannel:
                return self._announce(u)
            return self._drop(u, "backchannel") if u.silence_start is not None else []
        if check_id != u.check_id or u.check is None:
            return []
        u.check.text, u.check.text_failed = (text or ""), text is None
        u.check.last_word_probability = last_word_probability
        return self._decide(u)

    def on_verdict(self, check_id: int, probability: float | None) -> list[Action]:
        """The end-of-turn model's probability for the check (None: the model failed; the words decide)."""
        u = self.utt
        if u is None or check_id != u.check_id or u.check is None:
            return []
        u.check.probability = probability if probability is not None else float("nan")
        return self._decide(u)

    def response_audio_ends(self, sample: int) -> None:
        """A response finished; its audio finishes playing at input sample `sample` (arms the idle timeout)."""
        self._idle_from = max(sample, self.now)

    def reset(self) -> list[Action]:
        """Forget the current utterance (buffer cleared or committed by the client, turn detection changed)."""
        u, self.utt = self.utt, None
        self._idle_from = None
        return [CancelCheck(u.check_id)] if u is not None and u.check_id is not None else []

    # -- transitions -----------------------------------------------------------------------------------------
    def _begin(self, sample: int) -> list[Action]:
        announced = not (self.responding and self.policy.interrupt_response)
        self.utt = u = _Utterance(self._new_id(), sample, announced)
        self._idle_from = None
        return [Begin(u.item_id, sample, announced)]

    def _announce(self, u: _Utterance) -> list[Action]:
        u.announced, u.backchannel = True, False
        out: list[Action] = [Announce(u.item_id, u.start_sample, interrupt=self.responding)]
        if u.silence_start is not None:  # it paused before we knew it was a turn: this pause is its check
            out += self._pause(u, u.silence_start)
        return out

    def _candidate_paused(self, u: _Utterance) -> list[Action]:
        if u.silence_start - u.start_sample < self._samples(self.policy.barge_in_min_ms):
            return self._drop(u, "noise")
        if u.backchannel:
            return self._drop(u, "backchannel")
        if u.barge_check_id is None:  # reached the guard only now: ask what it said
            return [self._check(u, "barge_in", u.silence_start, use_model=False, speculate=False)]
        return []  # its transcript is on the way: on_transcript decides

    def _pause(self, u: _Utterance, speech_end: int) -> list[Action]:
        p = self.policy
        speculate = p.speculative and p.create_response
        if p.semantic:
            use_model = p.witness != "text"
            # the transcript early, the model at check_ms (on_audio asks it): it needs the longer silence to judge
            later = use_model and p.transcript_ms is not None and p.transcript_ms < p.check_ms
            out = [self._check(u, "end_of_turn", speech_end, use_model=use_model and not later, speculate=speculate)]
            u.check = Verdict()
            if later:
                u.model_due = speech_end + self._samples(p.check_ms)
                out += self._ask_model_if_due(u)
            u.verdicts.append(u.check)
            return out
        return [self._check(u, "speculate", speech_end, use_model=False, speculate=True)] if speculate else []

    def _check(self, u: _Utterance, purpose: str, speech_end: int | None, *, use_model: bool,
               speculate: bool) -> StartCheck:
        cid = next(self._ids)
        if purpose == "barge_in":
            u.barge_check_id = cid
        else:
            u.check_id, u.checks, u.check_at = cid, u.checks + 1, self.now
        return StartCheck(cid, u.item_id, u.start_sample, self.now, speech_end, purpose, use_model, speculate)

    def _ask_model_if_due(self, u: _Utterance) -> list[Action]:
        if u.model_due is None or self.now < u.model_due or u.silence_start is None or u.check_id is None:
            return []
        u.model_due, u.check_at = None, self.now
        return [AskModel(u.check_id, u.start_sample, self.now)]

    def _cancel_check(self, u: _Utterance) -> list[Action]:
        cid, u.check_id, u.check, u.model_due = u.check_id, None, None, None
        return [CancelCheck(cid)] if cid is not None else []

    def _decide(self, u: _Utterance) -> list[Action]:
        v, p = u.check, self.policy
        if v.complete is not None or u.silence_start is None:
            return []
        need_audio, need_text = p.witness in ("both", "audio"), p.witness in ("both", "text")
        if (need_audio and v.probability is None) or (need_text and v.text is None):
            return []  # wait for the other witness
        why = []
        if need_audio and not v.probability >= p.threshold:  # NaN (model failed) never says complete
            why.append(f"audio {v.probability:.2f} < {p.threshold}")
        if need_text:
            text_why = unfinished(v.text, v.last_word_probability)
            if text_why:
                why.append(text_why)
            elif p.witness == "text" and (v.text_failed or not v.text.strip()):
                why.append("no words")
        if need_audio and need_text and v.probability != v.probability and not v.text_failed:
            why = [w for w in why if not w.startswith("audio")]  # the model failed: the words decide alone
        v.complete, v.why = not why, "; ".join(why)
        if why:
            return []  # not done: keep listening until speech resumes or max_silence_ms
        return self._end(u, u.silence_start, "complete", self._ms(u.check_at - u.silence_start))

    def _end(self, u: _Utterance, end_sample: int, reason: str, silence_ms: int) -> list[Action]:
        self.utt = None
        end = max(u.start_sample, end_sample)
        return [EndTurn(u.item_id, u.start_sample, end, u.check_id, reason, silence_ms, self.policy.create_response,
                        u.checks if self.policy.semantic else 0, u.check)]

    def _cut(self, u: _Utterance) -> list[Action]:
        """max_utterance_ms reached: a turn ends where it is (at its pause, if it is in one), a candidate goes."""
        if not u.announced:
            return self._drop(u, "max_utterance")
        if u.silence_start is not None:
            return self._end(u, u.silence_start, "max_utterance", self._ms(self.now - u.silence_start))
        return self._end(u, self.now, "max_utterance", 0)

    def _drop(self, u: _Utterance, reason: str) -> list[Action]:
        self.utt = None
        out: list[Action] = [CancelCheck(cid) for cid in (u.check_id, u.barge_check_id) if cid is not None]
        return out + [DropUtterance(u.item_id, reason)]
