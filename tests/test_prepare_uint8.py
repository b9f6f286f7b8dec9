"""The core's one-pass uint8 stretch for the features backend (UINT8_INPUT) is, bit for
bit, what the backend made from the float image before (to_uint8 of prepare), so the
keypoints and the fitted transform do not change; percentiles' one-sided tail brackets
still give np.percentile's numbers with infinities and NaNs about."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration.core.metrics import percentiles, robust_normalize_uint8
from napari_registration.core.preprocess import prepare, prepare_uint8


def _images():
    rng = np.random.default_rng(7)
    yield rng.random((300, 280)).astype(np.float32)  # [0, 1]
    yield (rng.normal(size=(257, 401)) * 900 + 40).astype(np.float32)  # any range
    yield rng.integers(0, 4096, (320, 330)).astype(np.uint16)  # 12-bit camera
    yield np.round(rng.exponential(size=(400, 300)), 1)  # float64, many ties
    dark = np.zeros((300, 300), np.float32)  # mostly background
    dark[rng.integers(0, 300, 400), rng.integers(0, 300, 400)] = 1.0
    yield dark


@pytest.mark.parametrize("masked", [False, True])
def test_prepare_uint8_is_to_uint8_of_prepare_bit_for_bit(masked):
    from napari_registration.backends.features import to_uint8

    rng = np.random.default_rng(3)
    for img in _images():
        before = img.copy()
        mask = rng.random(img.shape) > 0.4 if masked else None
        want = to_uint8(prepare(img, mask=mask))
        got = prepare_uint8(img, mask=mask)
        assert got.dtype == np.uint8 and got.shape == img.shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(img, before)  # input untouched


def test_prepare_uint8_of_views_and_degenerate_images():
    from napari_registration.backends.features import to_uint8

    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 300)).astype(np.float32)
    for view in (a[:, ::2], a[::3], a.T, a[10:150, 20:290]):
        np.testing.assert_array_equal(prepare_uint8(view), to_uint8(prepare(view)))
    const = np.full((50, 60), 3.0, np.float32)
    np.testing.assert_array_equal(robust_normalize_uint8(const), np.zeros((50, 60), np.uint8))
    empty_mask = np.zeros((50, 60), bool)
    assert not robust_normalize_uint8(a[:50, :60], empty_mask).any()


def test_percentile_tails_with_infinities_and_nans():
    rng = np.random.default_rng(11)
    v = rng.random(200_000).astype(np.float32)
    w = v.copy()
    w[rng.integers(0, w.size, 300)] = np.inf
    w[rng.integers(0, w.size, 300)] = -np.inf
    for arr in (v, w):
        for q in ([0.5, 99.5], [0.0, 100.0], [0.01, 99.99], [2.0, 50.0, 98.0]):
            np.testing.assert_array_equal(percentiles(arr, q), np.percentile(arr, q))
    x = v.copy()
    x[123] = np.nan
    np.testing.assert_array_equal(percentiles(x, [0.5, 99.5]), np.percentile(x, [0.5, 99.5]))


def test_features_register_is_unchanged_by_the_uint8_handover(monkeypatch):
    """The same transform, keypoints and matches whether the core hands over uint8
    (UINT8_INPUT) or the float image the backend converts itself."""
    pytest.importorskip("cv2")
    from skimage import data
    from skimage.transform import AffineTransform, warp

    import napari_registration as nr
    from napari_registration.backends import features

    fixed = data.camera()[::2, ::2].astype(np.float32) * 3 + 100  # not [0, 1]
    tf = AffineTransform(rotation=0.08, translation=(6, -4))
    moving = warp(fixed, tf.inverse, order=1, preserve_range=True).astype(np.float32)
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(features, "UINT8_INPUT", flag)
        for det in ("sift", "orb"):
            r = nr.register(fixed, moving, method="features", transform="rigid", detector=det,
                            score=False)
            results[flag, det] = r
    for det in ("sift", "orb"):
        a, b = results[True, det], results[False, det]
        np.testing.assert_array_equal(a.transform.matrix, b.transform.matrix)
        assert a.info["keypoints_fixed"] == b.info["keypoints_fixed"]
        assert a.info["inliers"] == b.info["inliers"]
        np.testing.assert_array_equal(a.warped, b.warped)
