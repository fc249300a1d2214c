"""voicefast.turns and voicefast.turn_text: synthetic VAD event sequences and stub verdicts in, actions out
(no audio, no models, no sockets, no clocks)."""

from __future__ import annotations

import itertools

import pytest

from voicefast.turn_text import is_backchannel, unfinished
from voicefast.turns import (
    EAGERNESS,
    Announce,
    AskModel,
    Begin,
    CancelCheck,
    DropUtterance,
    EndTurn,
    IdleTimeout,
    RestartVad,
    StartCheck,
    TurnPolicy,
    TurnTaker,
)


def ms(x: int) -> int:
    return x * 16  # 16 kHz samples


def taker(mode: str = "semantic_vad", **kw) -> TurnTaker:
    """transcript_ms=0 unless given: the transcript and the model both at the check, one StartCheck per pause (the
    early transcript of the eagerness defaults has its own tests below)."""
    kw.setdefault("transcript_ms", 0)
    ids = itertools.count(1)
    return TurnTaker(TurnPolicy.for_mode(mode, **kw), new_id=lambda: f"item{next(ids)}")


def only(actions, kind):
    got = [a for a in actions if isinstance(a, kind)]
    assert len(got) == 1, actions
    return got[0]


def speak_and_pause(t: TurnTaker, start_ms: int, end_ms: int) -> StartCheck:
    """speech_started at start_ms; early_silence at end_ms (seen check_ms later): returns the check."""
    assert isinstance(only(t.on_vad("speech_started", ms(start_ms), ms(start_ms + 96)), Begin), Begin)
    t.on_audio(ms(end_ms))
    return only(t.on_vad("early_silence", ms(end_ms), ms(end_ms + t.policy.check_ms)), StartCheck)


def test_complete_verdict_ends_the_turn_at_the_check():
    t = taker()
    c = speak_and_pause(t, 200, 1800)
    assert c.purpose == "end_of_turn" and c.use_model and c.speculate
    assert (c.start_sample, c.speech_end_sample, c.end_sample) == (ms(200), ms(1800), ms(1800 + 160))
    assert t.on_verdict(c.check_id, 0.93) == []  # the words have not testified yet
    end = only(t.on_transcript(c.check_id, "What time do you open on Saturday?"), EndTurn)
    assert (end.reason, end.end_sample, end.check_id, end.silence_ms) == ("complete", ms(1800), c.check_id, 160)
    assert end.verdict.complete and end.verdict.probability == 0.93
    assert not t.in_turn
    # The VAD still thinks the silence goes on: its later stop belongs to a finished turn.
    assert t.on_vad("speech_stopped", ms(1800), ms(1800 + 1200)) == []


def test_an_early_transcript_then_the_model_at_the_check():
    """transcript_ms < check_ms: the ASR final and the held reply start at 64 ms of silence, the model is asked
    only when the audio clock reaches 160 ms of silence; the turn ends when both have testified, dated at the model's
    ask."""
    t = taker(transcript_ms=64)
    assert t.policy.early_ms == 64
    t.on_vad("speech_started", ms(200), ms(296))
    c = only(t.on_vad("early_silence", ms(1800), ms(1864)), StartCheck)
    assert c.speculate and not c.use_model and c.end_sample == ms(1864)
    assert t.on_transcript(c.check_id, "What time do you open on Saturday?") == []  # the model has not spoken
    assert t.on_audio(ms(1940)) == []  # 140 ms of silence: not yet
    ask = only(t.on_audio(ms(1960)), AskModel)
    assert (ask.check_id, ask.start_sample, ask.end_sample) == (c.check_id, ms(200), ms(1960))
    assert t.on_audio(ms(1980)) == []  # asked once
    end = only(t.on_verdict(c.check_id, 0.8), EndTurn)
    assert (end.reason, end.check_id, end.silence_ms) == ("complete", c.check_id, 160)


def test_an_early_transcript_is_dropped_when_speech_resumes_before_the_model():
    t = taker(transcript_ms=64)
    t.on_vad("speech_started", 0, ms(96))
    c = only(t.on_vad("early_silence", ms(1000), ms(1064)), StartCheck)
    assert only(t.on_vad("speech_resumed", ms(1100), ms(1120)), CancelCheck).check_id == c.check_id
    assert t.on_audio(ms(1200)) == []  # no model for a dropped check
    c2 = only(t.on_vad("early_silence", ms(2000), ms(2080)), StartCheck)  # the next pause: a new check
    assert not c2.use_model and t.on_audio(ms(2150)) == []
    assert only(t.on_audio(ms(2160)), AskModel).check_id == c2.check_id


def test_an_early_transcript_late_vad_asks_the_model_in_the_same_step():
    """The VAD can report the pause after check_ms already passed (a big chunk): the model is asked at once."""
    t = taker(transcript_ms=64)
    t.on_vad("speech_started", 0, ms(96))
    acts = t.on_vad("early_silence", ms(1000), ms(1200))
    c, ask = only(acts, StartCheck), only(acts, AskModel)
    assert ask.check_id == c.check_id and ask.end_sample == ms(1200)


def test_transcript_ms_must_not_follow_the_check():
    with pytest.raises(ValueError, match="transcript_ms"):
        TurnPolicy(check_ms=160, transcript_ms=200)
    assert TurnPolicy.for_mode("server_vad", transcript_ms=64).early_ms == 160  # server_vad: its own speculation


@pytest.mark.parametrize("p, text, why", [
    (0.97, "I'd like to book a table for", "trailing preposition 'for'"),  # the audio model is fooled, words are not
    (0.05, "What time do you open on Saturday?", "audio 0.05 < 0.2"),
    (0.90, "My order number is four five", "a number read digit by digit"),
])
def test_unfinished_waits_for_max_silence(p, text, why):
    t = taker()
    c = speak_and_pause(t, 0, 1500)
    assert t.on_transcript(c.check_id, text) == [] and t.on_verdict(c.check_id, p) == []
    assert t.in_turn and t.utt.check.complete is False and t.utt.check.why == why
    end = only(t.on_vad("speech_stopped", ms(1500), ms(1500 + 1200)), EndTurn)
    assert (end.reason, end.check_id, end.silence_ms) == ("max_silence", c.check_id, 1200)


def test_speech_resuming_drops_the_check_and_a_late_verdict_is_ignored():
    t = taker()
    c1 = speak_and_pause(t, 0, 1000)
    assert t.on_transcript(c1.check_id, "I would like to order a") == []
    assert only(t.on_vad("speech_resumed", ms(1700), ms(1732)), CancelCheck).check_id == c1.check_id
    assert t.on_verdict(c1.check_id, 0.99) == []  # stale
    c2 = only(t.on_vad("early_silence", ms(2600), ms(2728)), StartCheck)
    assert c2.check_id != c1.check_id and c2.start_sample == 0  # the same utterance, judged whole
    t.on_verdict(c2.check_id, 0.8)
    end = only(t.on_transcript(c2.check_id, "I would like to order a pizza."), EndTurn)
    assert end.check_id == c2.check_id and end.end_sample == ms(2600) and end.item_id == c1.item_id


@pytest.mark.parametrize("witness, p, text, complete", [
    ("audio", 0.9, "I'd like to book a table for", True),  # audio alone is fooled
    ("audio", 0.1, "Thanks.", False),
    ("text", 0.1, "Thanks.", True),  # the model is not even asked
    ("text", None, "I need to change the", False),
    ("both", None, "Thanks.", True),  # the model failed: the words decide
])
def test_each_witness_alone(witness, p, text, complete):
    t = taker(witness=witness)
    c = speak_and_pause(t, 0, 900)
    assert c.use_model == (witness != "text")
    out = t.on_transcript(c.check_id, text)
    if c.use_model:
        out += t.on_verdict(c.check_id, p)
    assert bool([a for a in out if isinstance(a, EndTurn)]) == complete


def test_asr_failure_leaves_the_audio_witness():
    t = taker()
    c = speak_and_pause(t, 0, 900)
    t.on_verdict(c.check_id, 0.95)
    assert only(t.on_transcript(c.check_id, None), EndTurn).reason == "complete"


def test_eagerness_sets_check_and_max_silence():
    for name in ("low", "medium", "high", "auto"):
        t = taker(eagerness=name)
        e = EAGERNESS[name]
        assert (t.policy.check_ms, t.policy.end_silence_ms, t.policy.threshold) == (e.check_ms, e.max_silence_ms,
                                                                                     e.threshold)
    assert EAGERNESS["high"].max_silence_ms < EAGERNESS["auto"].max_silence_ms < EAGERNESS["low"].max_silence_ms
    assert EAGERNESS["auto"] == EAGERNESS["medium"]


def test_server_vad_speculates_and_ends_at_the_silence_window():
    t = taker("server_vad", silence_duration_ms=500)
    t.on_vad("speech_started", 0, ms(96))
    c = only(t.on_vad("early_silence", ms(800), ms(960)), StartCheck)
    assert (c.purpose, c.use_model, c.speculate) == ("speculate", False, True)
    assert t.on_transcript(c.check_id, "I'd like to book a table for") == []  # no witnesses in server_vad
    end = only(t.on_vad("speech_stopped", ms(800), ms(1300)), EndTurn)
    assert (end.reason, end.check_id, end.silence_ms) == ("silence", c.check_id, 500)


def test_no_speculation_without_create_response():
    t = taker("server_vad", create_response=False)
    t.on_vad("speech_started", 0, ms(96))
    assert t.on_vad("early_silence", ms(800), ms(960)) == []
    assert only(t.on_vad("speech_stopped", ms(800), ms(1300)), EndTurn).create_response is False
    s = taker(create_response=False)  # semantic still needs its check, but holds no reply
    c = speak_and_pause(s, 0, 800)
    assert c.use_model and not c.speculate


def test_short_noise_during_a_response_is_dropped():
    t = taker()
    t.responding = True
    assert only(t.on_vad("speech_started", ms(100), ms(196)), Begin).announced is False
    t.on_audio(ms(300))
    assert only(t.on_vad("early_silence", ms(300), ms(428)), DropUtterance).reason == "noise"
    assert not t.in_turn


def test_backchannel_during_a_response_does_not_interrupt():
    t = taker()
    t.responding = True
    t.on_vad("speech_started", ms(100), ms(196))
    assert t.on_audio(ms(300)) == []
    c = only(t.on_audio(ms(400)), StartCheck)  # 300 ms of speech: what is it?
    assert c.purpose == "barge_in" and not c.use_model and not c.speculate and c.end_sample == ms(400)
    assert t.on_transcript(c.check_id, "Mm-hmm.") == []  # a backchannel so far: keep listening
    assert t.on_audio(ms(500)) == []
    assert only(t.on_vad("early_silence", ms(550), ms(678)), DropUtterance).reason == "backchannel"
    assert not [a for a in t.on_audio(ms(1000)) if isinstance(a, Announce)]


def test_real_interruption_cancels_when_its_words_arrive():
    t = taker()
    t.responding = True
    t.on_vad("speech_started", ms(100), ms(196))
    c = only(t.on_audio(ms(400)), StartCheck)
    a = only(t.on_transcript(c.check_id, "Wait, what about"), Announce)
    assert a.interrupt and a.start_sample == ms(100)
    t.responding = False  # the session cancelled the reply
    c2 = only(t.on_vad("early_silence", ms(2000), ms(2128)), StartCheck)  # now a normal turn
    t.on_verdict(c2.check_id, 0.9)
    assert only(t.on_transcript(c2.check_id, "Wait, what about Sunday?"), EndTurn).start_sample == ms(100)


def test_long_speech_interrupts_even_if_it_started_like_a_backchannel():
    t = taker()
    t.responding = True
    t.on_vad("speech_started", 0, ms(96))
    c = only(t.on_audio(ms(320)), StartCheck)
    t.on_transcript(c.check_id, "Okay")
    assert t.on_audio(ms(880)) == []
    assert only(t.on_audio(ms(900)), Announce).interrupt


def test_candidate_pausing_before_its_words_arrive_waits_for_them():
    t = taker()
    t.responding = True
    t.on_vad("speech_started", 0, ms(96))
    c = only(t.on_audio(ms(350)), StartCheck)
    assert t.on_vad("early_silence", ms(400), ms(528)) == []
    out = t.on_transcript(c.check_id, "Stop please")
    assert isinstance(out[0], Announce) and isinstance(out[1], StartCheck) and out[1].purpose == "end_of_turn"


def test_interrupt_response_false_announces_at_once_and_never_cancels():
    t = taker(interrupt_response=False)
    t.responding = True
    assert only(t.on_vad("speech_started", 0, ms(96)), Begin).announced
    assert t.on_audio(ms(2000)) == []


def test_idle_timeout_after_playback_then_once():
    t = taker(idle_timeout_ms=5000)
    t.response_audio_ends(ms(10_000))
    assert t.on_audio(ms(14_990)) == []
    fired = only(t.on_audio(ms(15_000)), IdleTimeout)
    assert (fired.start_sample, fired.end_sample) == (ms(10_000), ms(15_000))
    assert t.on_audio(ms(30_000)) == []  # not again until another response finished


def test_idle_timeout_is_disarmed_by_speech_and_while_responding():
    t = taker(idle_timeout_ms=2000)
    t.response_audio_ends(ms(1000))
    t.on_vad("speech_started", ms(2000), ms(2096))
    assert t.on_audio(ms(9000)) == []
    t.reset()
    t.response_audio_ends(ms(9000))
    t.responding = True
    assert t.on_audio(ms(20_000)) == []
    assert taker().on_audio(ms(600_000)) == []  # no idle_timeout_ms: never


def test_max_utterance_ends_the_turn_where_it_is_and_restarts_the_vad():
    t = taker("server_vad", max_utterance_ms=30_000)
    t.on_vad("speech_started", ms(1000), ms(1096))
    assert t.on_audio(ms(30_980)) == []
    end, restart = t.on_audio(ms(31_000))  # 30 s of speech without the pause that ends a turn
    assert isinstance(end, EndTurn) and isinstance(restart, RestartVad)
    assert (end.reason, end.start_sample, end.end_sample, end.check_id, end.create_response) == \
        ("max_utterance", ms(1000), ms(31_000), None, True)
    assert not t.in_turn and t.on_audio(ms(40_000)) == []
    assert isinstance(only(t.on_vad("speech_started", ms(31_100), ms(31_196)), Begin), Begin)  # speech goes on


def test_max_utterance_in_a_pause_ends_at_the_pause_with_its_check():
    t = taker(max_utterance_ms=5000)
    c = speak_and_pause(t, 0, 4900)
    t.on_verdict(c.check_id, 0.05)  # the model holds the turn
    end = only(t.on_audio(ms(5000)), EndTurn)
    assert (end.reason, end.end_sample, end.check_id, end.silence_ms) == ("max_utterance", ms(4900), c.check_id, 160)


def test_max_utterance_drops_a_candidate_barge_in():
    t = taker(max_utterance_ms=2000)
    t.responding = True
    t.on_vad("speech_started", 0, ms(96))
    c = only(t.on_audio(ms(350)), StartCheck)
    assert t.on_vad("early_silence", ms(400), ms(528)) == []  # waits for its words
    out = t.on_audio(ms(2000))
    assert out == [CancelCheck(c.check_id), DropUtterance(out[1].item_id, "max_utterance"), RestartVad()]


def test_reset_cancels_the_live_check():
    t = taker()
    c = speak_and_pause(t, 0, 700)
    assert t.reset() == [CancelCheck(c.check_id)] and not t.in_turn


def test_policy_validation():
    with pytest.raises(ValueError, match="witness"):
        TurnPolicy(witness="both witnesses")
    with pytest.raises(ValueError, match="check_ms"):
        TurnPolicy(check_ms=600, end_silence_ms=500)
    with pytest.raises(ValueError, match="max_utterance_ms"):
        TurnPolicy(max_utterance_ms=0)


@pytest.mark.parametrize("text, why", [
    ("I'd like to book a table for", "trailing preposition 'for'"),
    ("I would like to order a", "trailing article 'a'"),
    ("I need to change the", "trailing article 'the'"),
    ("We are open on Saturday and", "trailing conjunction 'and'"),
    ("Can you check my", "trailing possessive 'my'"),
    ("My order number is four five", "a number read digit by digit"),
    ("My number is 4 5", "a number read digit by digit"),
    ("I was wondering, um", "trailing hesitation 'um'"),
    ("So I was thinking...", "trails off"),
    ("I'm interested in", "trailing preposition 'in'"),
    ("The phone number is 555.", "an identifier cut short (3 digits)"),
    ("My name is", "a copula left open 'is'"),
    ("I need a pair of boots that are", "a copula left open 'are'"),
])
def test_unfinished_phrases(text, why):
    assert unfinished(text) == why


@pytest.mark.parametrize("text", [
    "What time do you open on Saturday?", "A table for four.", "Hold on.", "Can I log in?", "I think so.",
    "My order number is 45721.", "Thank you very much for your help today.", "", "Okay.", "Please come in",
    "Yes, it is.", "Here you are.", "The total is 45 dollars.",
])
def test_finished_or_unknown_phrases(text):
    assert unfinished(text) is None


@pytest.mark.parametrize("text, p, why", [
    ("I'd like to book a table for it.", 0.45, "trailing preposition 'for' (Whisper's doubtful 'it', p=0.45)"),
    ("Please cancel mine.", 0.63, "trailing possessive 'my' (Whisper's doubtful 'mine', p=0.63)"),
    ("How long does shipping take two", 0.37, "trailing preposition 'to' (Whisper's doubtful 'two', p=0.37)"),
    ("I'd like to book a table for it.", 0.9, None),  # sure of "it": the caller said it
    ("Can I get a table for Friday", 0.4, None),  # a doubtful content word is not Whisper's filler
    ("Keep it", 0.3, None),  # nothing unfinished without the filler either
])
def test_whispers_doubtful_completions(text, p, why):
    assert unfinished(text, p) == why


@pytest.mark.parametrize("text, yes", [
    ("Mm-hmm.", True), ("Okay.", True), ("Yeah, right.", True), ("I see.", True), ("", True), ("Uh-huh", True),
    ("Wait, stop.", False), ("What about Sunday?", False), ("okay but what about the price", False), ("No.", False),
])
def test_backchannels(text, yes):
    assert is_backchannel(text) == yes
