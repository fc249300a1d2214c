import numpy as np
import pytest

from audio.codecs import (
    alaw_decode,
    alaw_decode_int16,
    alaw_encode,
    alaw_encode_int16,
    ulaw_decode,
    ulaw_decode_int16,
    ulaw_encode,
    ulaw_encode_int16,
)
from audio.pcm import FrameBuffer, float32_to_pcm16, ms_to_samples, pcm16_to_float32

# --- the classic scalar G.711 algorithm (Sun Microsystems g711.c), written independently as the reference ---
SEG_UEND = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]
SEG_AEND = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]


def _search(val, table):
    for i, end in enumerate(table):
        if val <= end:
            return i
    return len(table)


def ref_linear2ulaw(pcm_val):
    pcm_val >>= 2
    if pcm_val < 0:
        pcm_val, mask = -pcm_val, 0x7F
    else:
        mask = 0xFF
    pcm_val = min(pcm_val, 8159) + (0x84 >> 2)
    seg = _search(pcm_val, SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm_val >> (seg + 1)) & 0xF)) ^ mask


def ref_ulaw2linear(u):
    u = ~u & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return (0x84 - t) if (u & 0x80) else (t - 0x84)


def ref_linear2alaw(pcm_val):
    pcm_val >>= 3
    if pcm_val >= 0:
        mask = 0xD5
    else:
        mask, pcm_val = 0x55, -pcm_val - 1
    seg = _search(pcm_val, SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    aval |= ((pcm_val >> 1) if seg < 2 else (pcm_val >> seg)) & 0x0F
    return aval ^ mask


def ref_alaw2linear(a):
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if (a & 0x80) else -t


ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def test_ulaw_encode_bit_exact_on_all_int16():
    ref = np.array([ref_linear2ulaw(int(v)) for v in ALL_INT16], np.uint8)
    np.testing.assert_array_equal(ulaw_encode_int16(ALL_INT16), ref)


def test_alaw_encode_bit_exact_on_all_int16():
    ref = np.array([ref_linear2alaw(int(v)) for v in ALL_INT16], np.uint8)
    np.testing.assert_array_equal(alaw_encode_int16(ALL_INT16), ref)


def test_decode_tables_match_reference():
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(ulaw_decode_int16(codes), [ref_ulaw2linear(int(c)) for c in codes])
    np.testing.assert_array_equal(alaw_decode_int16(codes), [ref_alaw2linear(int(c)) for c in codes])


def test_known_codes():
    assert ulaw_encode_int16(np.array([0], np.int16))[0] == 0xFF
    assert alaw_encode_int16(np.array([0], np.int16))[0] == 0xD5
    assert ulaw_encode_int16(np.array([32767, -32768], np.int16)).tolist() == [0x80, 0x00]


@pytest.mark.parametrize("enc,dec", [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)])
def test_float_round_trip_within_codec_error(enc, dec):
    t = np.arange(8000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    b = enc(x)
    assert isinstance(b, bytes) and len(b) == len(x)
    y = dec(b)
    assert y.dtype == np.float32
    # G.711 is ~8-bit log: the error is within half a quantization step, i.e. < ~3.2% of the magnitude + floor.
    assert np.all(np.abs(y - x) <= 0.032 * np.abs(x) + 2e-3)
    snr = 10 * np.log10(np.sum(x ** 2) / np.sum((y - x) ** 2))
    assert snr > 30
    # decoding is a fixed point: encode(decode(c)) == c
    assert enc(y) == b


def test_codes_round_trip_through_decode():
    codes = bytes(range(256))
    # mu-law has a negative zero (0x7F) that decodes to 0 and re-encodes as positive zero (0xFF).
    assert ulaw_encode(ulaw_decode(codes)) == codes[:0x7F] + b"\xff" + codes[0x80:]
    # A-law has no zero code (+-8 is the smallest magnitude), so all 256 codes survive.
    assert alaw_encode(alaw_decode(codes)) == codes


def test_pcm16_round_trip_exact():
    b = ALL_INT16.astype("<i2").tobytes()
    x = pcm16_to_float32(b)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() < 1.0
    assert float32_to_pcm16(x) == b


def test_pcm16_clips_and_rejects_odd_bytes():
    assert float32_to_pcm16(np.array([2.0, -2.0], np.float32)) == np.array([32767, -32768], "<i2").tobytes()
    with pytest.raises(ValueError, match="even number"):
        pcm16_to_float32(b"\x00\x01\x02")


def test_frame_buffer_rebuffers_any_sizes():
    fb = FrameBuffer(512)
    x = np.arange(5000, dtype=np.float32)
    frames, i = [], 0
    for k in [1, 700, 3, 511, 1024, 2000, 761]:
        frames += fb.push(x[i:i + k])
        i += k
    assert all(len(f) == 512 for f in frames) and len(frames) == 5000 // 512
    np.testing.assert_array_equal(np.concatenate(frames + [fb.flush()]), x)
    assert ms_to_samples(32, 16000) == 512
