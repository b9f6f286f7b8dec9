"""Feature registration on several threads (both images detected at once, brute-force
matching shared out) gives exactly the one-thread result."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration import register
from napari_registration.backends import features
from napari_registration.core.resample import resample
from napari_registration.core.transform import Transform

cv2 = pytest.importorskip("cv2")


def _pair(name="camera"):
    from skimage import color
    from skimage import data as skdata

    img = getattr(skdata, name)()
    if img.ndim == 3:
        img = color.rgb2gray(img)
    fixed = img.astype(np.float32)
    fixed = (fixed - fixed.min()) / np.ptp(fixed)
    c = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(9.0, center=c, scale=1.05, shift=(3.5, -6.25))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3).astype(np.float32)
    return fixed, moving, truth


@pytest.mark.parametrize("detector", ["orb", "sift"])
@pytest.mark.parametrize("cross_check", [False, True])
def test_threads_give_the_one_thread_result(detector, cross_check):
    fixed, moving, _ = _pair()
    out = [register(fixed, moving, method="features", transform="similarity", detector=detector,
                    cross_check=cross_check, threads=t, score=False) for t in (1, 2, 3)]
    for other in out[1:]:
        np.testing.assert_array_equal(other.transform.matrix, out[0].transform.matrix)
        np.testing.assert_array_equal(other.warped, out[0].warped)
        for key in ("keypoints_fixed", "keypoints_moving", "matches", "inliers"):
            assert other.info[key] == out[0].info[key]
        np.testing.assert_array_equal(other.extras["fixed_matches"], out[0].extras["fixed_matches"])


def test_parallel_knn_equals_one_call():
    rng = np.random.default_rng(4)
    query = rng.integers(0, 256, (1500, 32), dtype=np.uint8)
    train = rng.integers(0, 256, (1200, 32), dtype=np.uint8)
    one = features._knn(features._matcher("bf", "orb"), query, train, 2)
    for workers in (2, 4):
        idx, dist = features._knn_parallel("bf", "orb", query, train, 2, workers)
        np.testing.assert_array_equal(idx, one[0])
        np.testing.assert_array_equal(dist, one[1])
    mi, fi, kind = features.match(query, train, detector="orb", matcher="bf", workers=2)
    mi1, fi1, _ = features.match(query, train, detector="orb", matcher="bf", workers=1)
    assert kind == "bf"
    np.testing.assert_array_equal(mi, mi1)
    np.testing.assert_array_equal(fi, fi1)


def test_cancel_during_concurrent_detection_is_reported():
    fixed, moving, _ = _pair()
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1

    from napari_registration.core.register import RegistrationCancelled

    with pytest.raises(RegistrationCancelled):
        register(fixed, moving, method="features", transform="rigid", detector="orb",
                 threads=2, cancel=cancel, score=False)
