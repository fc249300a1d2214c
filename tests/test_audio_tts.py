import asyncio

import numpy as np
import pytest

from audio.asr import WhisperASR
from audio.codecs import ulaw_decode, ulaw_encode
from audio.resample import resample
from audio.speech_out import SpeechOutput
from audio.text_chunker import TextChunker
from audio.tts import PiperTTS
from audio.wer import normalize_words, word_error_rate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tts():
    return PiperTTS()


@pytest.fixture(scope="module")
def asr():
    m = WhisperASR(cpu_threads=2)
    yield m
    m.close()


def test_piper_voice_basics(tts):
    assert tts.sample_rate_hz == 22050 and tts.name == "en_US-joe-medium"
    chunks = list(tts.synthesize("Hello there. How are you today?"))
    assert len(chunks) == 2  # one chunk per sentence, as each is ready
    assert all(c.dtype == np.float32 and c.ndim == 1 and len(c) > 2000 for c in chunks)
    assert max(float(np.abs(c).max()) for c in chunks) <= 1.0
    assert list(tts.synthesize("  ** ## ")) == []  # markup only: nothing to say


def test_speaking_rate_changes_duration(tts):
    text = "Your order will arrive on Tuesday."
    normal = sum(len(c) for c in tts.synthesize(text))
    fast = sum(len(c) for c in tts.synthesize(text, speaking_rate=1.5))
    slow = sum(len(c) for c in tts.synthesize(text, speaking_rate=0.75))
    assert fast < 0.8 * normal < normal < 0.9 * slow
    with pytest.raises(ValueError):
        list(tts.synthesize(text, speaking_rate=0))


def test_tts_phrase_round_trips_through_asr(tts, asr):
    text = "Thank you for calling, how can I help you today?"
    audio = np.concatenate(list(tts.synthesize(text)))
    heard = asr.transcribe(resample(audio, tts.sample_rate_hz, 16000))
    assert normalize_words(heard) == normalize_words(text), heard


async def _collect(so, text, step=5, cancel_after=None):
    async def feed():
        for i in range(0, len(text), step):
            so.add_text(text[i:i + step])
            await asyncio.sleep(0)
        so.finish()

    feeder = asyncio.create_task(feed())
    frames = []
    async for f in so.frames():
        frames.append(f)
        if cancel_after is not None and len(frames) == cancel_after:
            so.cancel()
    await feeder
    return frames


TEXT = "Sure, I can help with that. The premium plan costs $29.99 per month, and you can cancel at any time."


@pytest.mark.parametrize("rate", [24000, 8000])
def test_speech_output_frames_and_text_map(tts, rate):
    so = SpeechOutput(tts, rate, frame_ms=20)
    frames = asyncio.run(_collect(so, TEXT))
    assert len(frames) > 50
    assert all(f.pcm.dtype == np.float32 and len(f.pcm) == rate // 50 for f in frames)
    ends = [f.text_end for f in frames]
    assert ends == sorted(ends) and ends[-1] == len(TEXT)  # monotonic, reaches the full text
    assert 0 < ends[len(ends) // 2] < len(TEXT)
    total_ms = len(frames) * 20
    offsets = [so.text_offset_at_ms(ms) for ms in range(0, total_ms + 100, 10)]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] == len(TEXT)
    # phrase by phrase: the first phrase ("Sure, I can help with that.") is all heard exactly when its audio ends
    spans = so.phrase_spans_ms
    assert spans[0][2:] == (0, TEXT.index(".") + 1)
    assert so.text_offset_at_ms(spans[0][1]) == spans[0][3]
    mid_ms, mid_char = (spans[1][0] + spans[1][1]) / 2, (spans[1][2] + spans[1][3]) / 2
    assert so.text_offset_at_ms(mid_ms) == pytest.approx(mid_char, abs=1)  # proportional within a phrase
    # the audio is continuous speech at the output rate: about Piper's duration, no gaps or duplication
    audio = np.concatenate([f.pcm for f in frames])
    assert abs(len(audio) / rate - so.ms_synthesized / 1000) < 0.05


def test_speech_output_at_8k_through_ulaw_is_still_intelligible(tts, asr):
    text = "Your package will arrive on Tuesday morning."
    so = SpeechOutput(tts, 8000, frame_ms=20)
    frames = asyncio.run(_collect(so, text))
    phone = ulaw_decode(b"".join(ulaw_encode(f.pcm) for f in frames))  # the G.711 phone path
    heard = asr.transcribe(resample(phone, 8000, 16000))
    assert word_error_rate(text, heard) <= 0.15, heard


def test_cancel_stops_output(tts):
    so = SpeechOutput(tts, 24000, frame_ms=20, chunker=TextChunker())
    long_text = " ".join([TEXT] * 4)
    frames = asyncio.run(_collect(so, long_text, cancel_after=10))
    assert len(frames) == 10  # nothing after cancel
    assert so.cancelled
    assert so.text_offset_at_ms(200) < len(long_text) // 4


def test_cancel_before_any_audio(tts):
    async def run():
        so = SpeechOutput(tts, 24000)
        so.add_text("This sentence will never be heard by anyone. ")
        so.cancel()
        return [f async for f in so.frames()]

    assert asyncio.run(run()) == []


def test_add_text_after_finish_raises(tts):
    async def run():
        so = SpeechOutput(tts, 16000)
        so.say("Hi.")
        with pytest.raises(RuntimeError):
            so.add_text("more")
        return [f async for f in so.frames()]

    frames = asyncio.run(run())
    assert frames and frames[-1].text_end == 3


class BrokenTTS:
    sample_rate_hz = 16000

    def synthesize(self, text, speaking_rate=None):
        yield np.zeros(1600, np.float32)
        raise OSError("voice file vanished")


def test_synthesis_error_reaches_the_consumer():
    async def run():
        so = SpeechOutput(BrokenTTS(), 16000)
        so.say("Hello there.")
        return [f async for f in so.frames()]

    with pytest.raises(RuntimeError, match="synthesis failed") as e:
        asyncio.run(run())
    assert isinstance(e.value.__cause__, OSError)


class CharTTS:
    """A fake synthesizer for the map's arithmetic: 10 ms of tone per character, one chunk per call."""

    sample_rate_hz = 16000

    def __init__(self):
        self.threads: list[str] = []

    def synthesize(self, text, speaking_rate=None):
        import threading

        self.threads.append(threading.current_thread().name)
        n = 160 * len(text)
        yield (0.3 * np.sin(2 * np.pi * 200 * np.arange(n) / self.sample_rate_hz)).astype(np.float32)


def test_whole_words_cut_never_ends_inside_a_word():
    text = "Hello there, friend. We open at nine tomorrow morning."

    async def run():
        so = SpeechOutput(CharTTS(), 16000, frame_ms=20)
        return so, await _collect(so, text, step=3)

    so, frames = asyncio.run(run())
    total_ms = len(frames) * 20
    cuts = [so.text_offset_at_ms(ms, whole_words=True) for ms in range(0, total_ms + 40, 5)]
    raw = [so.text_offset_at_ms(ms) for ms in range(0, total_ms + 40, 5)]
    assert cuts == sorted(cuts) and cuts[0] == 0 and cuts[-1] == len(text)  # monotonic, reaches the end
    assert all(c <= r for c, r in zip(cuts, raw, strict=True)) and cuts != raw  # only ever moved back
    for c in cuts:  # a cut is at a word boundary: the whole text, or a space before or after it
        assert c == len(text) or text[c].isspace() or c == 0 or text[c - 1].isspace(), text[:c]
    assert "Hello there, friend." in {text[:c].rstrip() for c in cuts}  # a phrase is heard whole at its end


def test_short_last_frame_start_and_executor():
    from concurrent.futures import ThreadPoolExecutor

    text = "Hi there. Bye now."
    pool = ThreadPoolExecutor(1, thread_name_prefix="tts-test")
    tts = CharTTS()

    async def run():
        so = SpeechOutput(tts, 24000, frame_ms=20, executor=pool, pad_last_frame=False)
        so.say(text)
        so.start()  # synthesis runs before anyone reads the frames
        while so._out.qsize() < 3:
            await asyncio.sleep(0.005)
        assert so.first_phrase_s is not None and so.first_audio_s >= so.first_phrase_s
        frames = [f async for f in so.frames()]
        await so.aclose()
        return so, frames

    so, frames = asyncio.run(run())
    pool.shutdown()
    assert tts.threads and all(n.startswith("tts-test") for n in tts.threads)
    # no padding: exactly the resampled audio, the last frame shorter than 20 ms and ending the text
    n = sum(len(f.pcm) for f in frames)
    assert n == int(np.ceil(so.ms_synthesized * 24))
    assert 0 < len(frames[-1].pcm) < 480 and all(len(f.pcm) == 480 for f in frames[:-1])
    assert frames[-1].text_end == len(text) and so._producer.done()
