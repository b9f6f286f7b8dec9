"""The fast percentiles are np.percentile's numbers bit for bit, and normalize() and
metrics.robust_normalize() (which use them) give the np.percentile rescale bit for bit;
inputs are never modified."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration.core.metrics import robust_normalize
from napari_registration.core.preprocess import normalize, percentiles


def _arrays():
    rng = np.random.default_rng(42)
    for trial in range(120):
        n = int(rng.integers(65_536, 300_000))
        kind = trial % 6
        if kind == 0:
            v = rng.random(n).astype(np.float32)
        elif kind == 1:  # 8-bit levels: many ties
            v = (rng.integers(0, 256, n) / 255).astype(np.float32)
        elif kind == 2:
            v = rng.normal(size=n)
        elif kind == 3:  # skewed, rounded
            v = np.round(rng.exponential(size=n).astype(np.float32), 2)
        elif kind == 4:  # mostly one value (a dark background) + a few bright ones
            v = np.zeros(n, np.float32)
            v[rng.integers(0, n, n // 300)] = rng.random(n // 300).astype(np.float32)
        else:  # constant
            v = np.full(n, 0.25, np.float32)
        q = [0.5, 99.5] if trial % 3 else [float(x) for x in rng.uniform(0, 100, 3)] + [0.0, 100.0]
        yield v, q


def test_percentiles_equal_numpy_bit_for_bit():
    for v, q in _arrays():
        before = v.copy()
        got, want = percentiles(v, q), np.percentile(v, q)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(v, before)


@pytest.mark.parametrize("values", [
    np.arange(1000, dtype=np.float32),                      # small: numpy itself
    np.arange(100_000, dtype=np.int32),                     # integers: numpy itself
    np.r_[np.random.default_rng(1).random(100_000), np.nan],  # NaN: numpy's NaN
    np.r_[np.random.default_rng(2).random(100_000), np.inf, -np.inf],
])
def test_percentiles_fall_back_or_agree_on_special_inputs(values):
    q = [0.5, 50, 99.5]
    np.testing.assert_array_equal(percentiles(values, q), np.percentile(values, q))


def _reference_normalize(image, mask=None, low=0.5, high=99.5, clip=True):
    """robust_normalize as it was before the fast percentiles: np.percentile on the same
    even subsample."""
    from napari_registration.core.metrics import PERCENTILE_SAMPLES

    image = np.asarray(image, dtype=np.float32)
    values = image[mask] if mask is not None else image.ravel()
    if values.size > PERCENTILE_SAMPLES:
        values = values[:: values.size // PERCENTILE_SAMPLES]
    lo, hi = np.percentile(values, [low, high])
    out = image - np.float32(lo)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


def test_normalize_is_the_np_percentile_rescale_bit_for_bit():
    from skimage import data

    rng = np.random.default_rng(3)
    images = [data.moon().astype(np.float32) / 255, data.camera().astype(np.float32),
              rng.normal(size=(300, 400)).astype(np.float32),
              rng.random((40, 50, 60)).astype(np.float32)]
    for img in images:
        before = img.copy()
        mask = img > np.median(img)
        for m in (None, mask):
            for clip in (True, False):
                want = _reference_normalize(img, m, clip=clip)
                np.testing.assert_array_equal(normalize(img, m, clip=clip), want)
                np.testing.assert_array_equal(robust_normalize(img, m, clip=clip), want)
        np.testing.assert_array_equal(img, before)
