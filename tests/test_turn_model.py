"""The end-of-turn model for real: our Whisper log-mel against transformers' WhisperFeatureExtractor, Smart Turn v3.2
on Piper-made speech alone, and the combined decision (model + Whisper transcript through voicefast.turns)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from speech import resample_whole, synthesize_piper

from audio.mel import log_mel_spectrogram, mel_filterbank, normalize_waveform
from audio.turn_model import WINDOW_SAMPLES, SmartTurnModel, model_window, turn_features
from voicefast import assets
from voicefast.assets import MissingAssetError
from voicefast.turns import StartCheck, TurnPolicy, TurnTaker

FEATURE_ATOL = 1e-4  # our float64 pipeline vs transformers' (features span about [-1, 1.5])
COMPLETE = ["What time do you open on Saturday?", "Can I speak with a manager please?",
            "Thank you very much for your help today.", "I would like to cancel my subscription."]
UNFINISHED = ["I would like to order a", "I'd like to book a table for", "I need to change the",
              "My order number is four five"]


def speech16(text: str, trail_ms: int = 0) -> np.ndarray:
    x, rate = synthesize_piper(text)
    return np.concatenate([resample_whole(x, rate, 16_000), np.zeros(16 * trail_ms, np.float32)])


@pytest.fixture(scope="module")
def model():
    m = SmartTurnModel(assets.resolve_turn().path)
    yield m
    m.close()


def reference_features(x: np.ndarray) -> np.ndarray:
    """Smart Turn's published preprocessing: the 8 s window through transformers' WhisperFeatureExtractor."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(chunk_length=8)
    return fe(model_window(x), sampling_rate=16_000, padding="max_length", max_length=WINDOW_SAMPLES,
              truncation=True, do_normalize=True, return_tensors="np").input_features[0]


def test_mel_filterbank_is_whispers():
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filterbank()
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16_000, norm="slaney", mel_scale="slaney")
    assert fb.shape == (201, 80) and np.all(fb >= 0)
    assert np.allclose(fb, ref, rtol=1e-9, atol=1e-12)


def test_features_match_transformers_on_noise_tone_and_a_long_input():
    rng = np.random.default_rng(1)
    cases = [(0.1 * rng.standard_normal(40_000)).astype(np.float32),  # shorter than 8 s: left-padded
             (0.3 * np.sin(np.arange(128_000) * 0.07)).astype(np.float32),
             (0.05 * rng.standard_normal(200_000)).astype(np.float32)]  # longer: the last 8 s
    for x in cases:
        ours = turn_features(x)
        assert ours.shape == (80, 800) and ours.dtype == np.float32
        assert np.abs(ours - reference_features(x)).max() < FEATURE_ATOL


def test_log_mel_rejects_too_little_audio():
    with pytest.raises(ValueError, match="at least"):
        log_mel_spectrogram(np.zeros(10, np.float32))
    assert normalize_waveform(np.zeros(4, np.float32)).tolist() == [0.0] * 4


def test_missing_turn_model_names_the_install_command(monkeypatch):
    def gone(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", gone)
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps pipecat-ai==1\.14\.0"):
        assets.resolve_turn()


def test_not_a_smart_turn_model_is_refused():
    with pytest.raises(ValueError, match="not a Smart Turn"):
        SmartTurnModel(assets.resolve_vad().path)
    with pytest.raises(FileNotFoundError):
        SmartTurnModel("/nonexistent/model.onnx")


@pytest.mark.slow
def test_piper_speech_features_match_transformers():
    for text in ("I'd like to book a table for", "What time do you open on Saturday?"):
        x = speech16(text, trail_ms=150)
        assert np.abs(turn_features(x) - reference_features(x)).max() < FEATURE_ATOL


@pytest.mark.slow
def test_complete_sentences_score_high_alone(model):
    probs = {t: model.predict(speech16(t, trail_ms=130)) for t in COMPLETE}
    assert all(p >= 0.5 for p in probs.values()), probs
    with pytest.raises(ValueError):
        model.predict(np.zeros(0, np.float32))


@pytest.mark.slow
def test_combined_decision_on_real_audio_and_transcripts(model):
    """The audio model alone is fooled by Piper's falling pitch on cut-off phrases; with the transcript the
    decision holds: unfinished phrases are "not done", complete ones end the turn at the first check."""
    from audio.asr import WhisperASR

    asr = WhisperASR(cpu_threads=1)
    try:
        decided = {}
        for text in COMPLETE[:2] + UNFINISHED:
            x = speech16(text, trail_ms=130)  # what the session hands over at the auto check
            t = TurnTaker(TurnPolicy.for_mode("semantic_vad"))
            t.on_vad("speech_started", 0, 1600)
            (c,) = [a for a in t.on_vad("early_silence", len(x) - 16 * 130, len(x)) if isinstance(a, StartCheck)]
            heard = asr.transcribe(x)  # a Transcript: also how sure Whisper was of its last word
            out = t.on_verdict(c.check_id, model.predict(x)) + \
                t.on_transcript(c.check_id, heard, heard.last_word_probability)
            decided[text] = (bool(out), t.utt.check.why if t.utt else "", t.utt.check.text if t.utt else "")
        assert all(decided[s][0] for s in COMPLETE[:2]), decided
        assert not any(decided[s][0] for s in UNFINISHED), decided
    finally:
        asr.close()


def test_workers_run_checks_side_by_side():
    """workers=2: two sessions' checks run at once on two threads (one thread queued them at 32 callers); the
    answers are the same as predict()'s; workers < 1 is refused."""
    import threading

    m = SmartTurnModel(assets.resolve_turn().path, workers=2)
    try:
        x = speech16("What time do you open on Saturday?", trail_ms=200)
        seen, gate = set(), threading.Barrier(2, timeout=30)
        real = m.predict

        def predict(a):
            seen.add(threading.current_thread().name)
            gate.wait()  # both inferences are running at the same moment, or this times out
            return real(a)

        m.predict = predict
        futs = [m.submit(x) for _ in range(2)]
        ps = [f.result(timeout=60) for f in futs]
        assert len(seen) == 2 and ps[0] == ps[1] == real(x)
    finally:
        m.close()
    with pytest.raises(ValueError, match="workers"):
        SmartTurnModel(assets.resolve_turn().path, workers=0)
