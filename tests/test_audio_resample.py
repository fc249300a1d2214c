import itertools

import numpy as np
import pytest

from audio.resample import StreamResampler, resample

RATES = [8000, 16000, 22050, 24000, 48000]
PAIRS = [(a, b) for a, b in itertools.product(RATES, RATES) if a != b]


def _chunked(x, a, b, rng):
    r = StreamResampler(a, b)
    outs, i, total_in = [], 0, 0
    while i < len(x):
        k = int(rng.integers(1, 1200))
        outs.append(r.process(x[i:i + k]))
        i += k
        total_in = min(i, len(x))
        # the output never runs ahead of the input and lags by at most the filter half-length (+1)
        emitted = r.samples_out
        assert emitted <= -(-total_in * b // a)
        assert emitted >= (total_in - r.half_taps) * b / a - 1
    outs.append(r.flush())
    return np.concatenate(outs)


@pytest.mark.parametrize("a,b", PAIRS)
def test_chunked_equals_whole_and_length_is_exact(a, b):
    rng = np.random.default_rng(a * 7 + b)
    x = (0.3 * rng.standard_normal(a // 3)).astype(np.float32)
    whole = resample(x, a, b)
    chunked = _chunked(x, a, b, rng)
    assert len(whole) == len(chunked) == -(-len(x) * b // a)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


@pytest.mark.parametrize("a,b", PAIRS)
def test_sine_is_preserved_without_time_shift(a, b):
    f = 440.0
    x = np.sin(2 * np.pi * f * np.arange(a // 2) / a).astype(np.float32)
    y = resample(x, a, b)
    ref = np.sin(2 * np.pi * f * np.arange(len(y)) / b)
    mid = slice(len(y) // 8, -len(y) // 8)  # away from the zero-padded edges
    assert np.abs(y[mid] - ref[mid]).max() < 1e-3


def test_downsampling_removes_aliases():
    # 7 kHz at 48 kHz cannot exist at 8 kHz (Nyquist 4 kHz): it must be filtered out, not folded to 1 kHz.
    x = np.sin(2 * np.pi * 7000 * np.arange(48000) / 48000).astype(np.float32)
    y = resample(x, 48000, 8000)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 1e-3


def test_no_drift_over_many_small_chunks():
    r = StreamResampler(22050, 24000)
    n_in = 0
    for _ in range(3000):  # ~30 s in 10 ms chunks of 220.5 samples, alternating 220/221
        k = 220 + (n_in // 220) % 2
        r.process(np.zeros(k, np.float32))
        n_in += k
    r.flush()
    assert r.samples_out == -(-n_in * 24000 // 22050)


def test_bad_use_raises():
    with pytest.raises(ValueError):
        StreamResampler(0, 16000)
    r = StreamResampler(16000, 8000)
    r.flush()
    with pytest.raises(RuntimeError):
        r.process(np.zeros(10, np.float32))


@pytest.mark.parametrize("a,b", [(24000, 16000), (16000, 24000), (8000, 16000), (16000, 8000), (8000, 24000)])
def test_strided_path_equals_the_gathered_path(a, b, monkeypatch):
    """The per-class strided views (small `up`) compute exactly what the general gather does, chunk by chunk."""
    import audio.resample as R

    x = np.random.default_rng(7).standard_normal(7919).astype(np.float32) * 0.3
    sizes = np.random.default_rng(8).integers(1, 700, 40)

    def run(max_up):
        monkeypatch.setattr(R, "STRIDED_MAX_UP", max_up)
        r, out, i = R.StreamResampler(a, b), [], 0
        for n in sizes:
            out.append(r.process(x[i:i + n]))
            i += n
        out.append(r.process(x[i:]))
        out.append(r.flush())
        return np.concatenate(out)

    strided, gathered = run(8), run(0)
    assert len(strided) == len(gathered) == -(-len(x) * b // a)
    np.testing.assert_allclose(strided, gathered, atol=1e-6)
