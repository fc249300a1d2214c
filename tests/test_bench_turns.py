"""bench/turns.py's bookkeeping with a stub judge (the real models run in `voicefast bench turns` and in
tests/test_turn_model.py): a premature end is a cut, a bridged pause is not, and the silence is counted from the
true end of speech."""

from __future__ import annotations

import numpy as np

from bench.turns import policies, replay
from voicefast.turns import TurnPolicy


class StubJudge:
    """answers: (probability, transcript) per check, in order; records the audio length each witness was given."""

    def __init__(self, answers: list[tuple[float, str]]):
        self.probabilities = [p for p, _ in answers]
        self.texts = [t for _, t in answers]
        self.asked: list[int] = []  # audio lengths given to the transcript
        self.model_asked: list[int] = []

    def probability(self, key: int, audio: np.ndarray) -> float:
        self.model_asked.append(len(audio))
        return self.probabilities.pop(0)

    def transcript(self, key: int, audio: np.ndarray) -> tuple[str, float | None]:
        self.asked.append(len(audio))
        return self.texts.pop(0), 0.99


def ms(x: int) -> int:
    return 16 * x


# A paused utterance: speech 0-1000 ms, a pause, speech 1800-2600 ms (the true end), then silence.
PAUSED_EVENTS = [("speech_started", 0, ms(96)), ("early_silence", ms(1000), ms(1140)),
                 ("speech_resumed", ms(1800), ms(1820)), ("early_silence", ms(2600), ms(2740)),
                 ("speech_stopped", ms(2600), ms(3800))]
AUDIO = np.zeros(ms(4000), np.float32)
AUTO = TurnPolicy.for_mode("semantic_vad", transcript_ms=0)  # the transcript and the model at the check


def test_a_complete_verdict_in_the_pause_is_a_cut():
    judge = StubJudge([(0.9, "I'd like to book a table")])
    o = replay(AUTO, PAUSED_EVENTS, AUDIO, ms(2600), judge, key=0)
    assert o.cut and o.checks == 1 and o.decided_after_ms == 1140 - 2600
    assert judge.asked == [ms(1140)]  # the audio so far (the padding before the start is clipped at 0)


def test_a_bridged_pause_ends_at_the_second_check():
    judge = StubJudge([(0.9, "I'd like to book a table for"), (0.8, "I'd like to book a table for four.")])
    o = replay(AUTO, PAUSED_EVENTS, AUDIO, ms(2600), judge, key=0)
    assert not o.cut and o.checks == 2 and o.decided_after_ms == 140
    assert o.first_check and o.checks_after_end == 1  # the pause inside the phrase is not counted against it
    assert o.why == ["trailing preposition 'for'"]


def test_max_silence_when_the_words_stay_unfinished():
    events = [("speech_started", 0, ms(96)), ("early_silence", ms(1000), ms(1140)),
              ("speech_stopped", ms(1000), ms(2200))]
    o = replay(AUTO, events, AUDIO, ms(1000), StubJudge([(0.9, "Please cancel my")]), key=0)
    assert not o.cut and o.decided_after_ms == 1200


def test_server_vad_baseline_needs_no_judge():
    events = [("speech_started", 0, ms(96)), ("early_silence", ms(1000), ms(1160)),
              ("speech_stopped", ms(1000), ms(1500))]
    o = replay(TurnPolicy.for_mode("server_vad"), events, AUDIO, ms(1000), None, key=0)
    assert o.decided_after_ms == 500 and o.checks == 0


def test_policy_rows():
    rows = dict(policies(["both", "audio"], ["auto"], ["96:1200:0.3:text"]))
    assert list(rows) == ["server_vad 500", "semantic auto / both", "semantic auto / audio",
                          "semantic 96:1200:0.3:text"]
    custom = rows["semantic 96:1200:0.3:text"]
    assert (custom.check_ms, custom.end_silence_ms, custom.threshold, custom.witness) == (96, 1200, 0.3, "text")


def test_an_early_transcript_and_the_model_at_the_check():
    """transcript_ms: the words are taken at 64 ms of silence, the model only at check_ms (160), on the audio clock
    the "audio" ticks advance; the decision is dated when its last witness was asked."""
    policy = TurnPolicy.for_mode("semantic_vad", transcript_ms=64)
    events = [("speech_started", 0, ms(96)), ("audio", ms(500), ms(500)), ("early_silence", ms(1000), ms(1080)),
              ("audio", ms(1080), ms(1080)), ("audio", ms(1140), ms(1140)), ("audio", ms(1180), ms(1180)),
              ("speech_stopped", ms(1000), ms(2200))]
    judge = StubJudge([(0.9, "Could you cancel my order?")])
    o = replay(policy, events, AUDIO, ms(1000), judge, key=0)
    assert judge.asked == [ms(1080)] and judge.model_asked == [ms(1180)]
    assert not o.cut and o.first_check and o.decided_after_ms == 180


def test_custom_policy_with_a_transcript_time():
    rows = dict(policies([], [], ["160:1200:0.2:both:64"]))
    p = rows["semantic 160:1200:0.2:both:64"]
    assert (p.check_ms, p.transcript_ms, p.early_ms) == (160, 64, 64)
