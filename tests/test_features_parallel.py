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


# ------------------------------------------------------------------ guided matching
def _tre(result, truth, shape):
    from napari_registration import data

    pts = data.grid_points(shape, (1.0, 1.0))
    return data.tre_against_truth(result.transform, truth, pts)["mean"]


def test_sift_matches_all_against_all():
    fixed, moving, _ = _pair("astronaut")
    r = register(fixed, moving, method="features", transform="similarity", score=False,
                 warp=False)
    assert r.info["matcher"] in ("bf", "flann")


@pytest.mark.parametrize("detector", ["orb", "akaze"])
def test_guided_matching_is_used_and_as_accurate_as_all_against_all(detector):
    fixed, moving, truth = _pair("astronaut")
    guided = register(fixed, moving, method="features", transform="similarity",
                      detector=detector, score=False, warp=False)
    full = register(fixed, moving, method="features", transform="similarity",
                    detector=detector, guided=False, score=False, warp=False)
    assert guided.info["matcher"] == "guided"
    assert full.info["matcher"] in ("bf", "flann")
    tre_g, tre_f = _tre(guided, truth, fixed.shape), _tre(full, truth, fixed.shape)
    assert tre_g <= 0.1 and tre_f <= 0.1
    assert tre_g <= 2 * tre_f + 0.01
    # as many inliers, give or take: guided matching offers every keypoint a candidate
    assert guided.info["inliers"] >= 0.8 * full.info["inliers"]
    # an explicit matcher or cross_check means all against all
    for opts in ({"matcher": "bf"}, {"cross_check": True}):
        r = register(fixed, moving, method="features", transform="similarity",
                     detector=detector, score=False, warp=False, **opts)
        assert r.info["matcher"] != "guided"


def test_guided_matches_are_one_to_one_and_near_the_truth():
    fixed, moving, truth = _pair("camera")
    f8, m8 = features.to_uint8(fixed), features.to_uint8(moving)
    f_xy, f_desc, f_resp = features.detect(f8, None, "orb", 5000, with_response=True)
    m_xy, m_desc, m_resp = features.detect(m8, None, "orb", 5000, with_response=True)
    assert len(f_resp) == len(f_xy) and np.all(np.isfinite(f_resp)) and np.ptp(f_resp) > 0
    f_pts = features.xy_to_rowcol(f_xy)
    m_pts = features.xy_to_rowcol(m_xy)
    mi, fi = features.match_guided(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, detector="orb",
                                   transform="similarity", ratio=0.75, radius=6.0,
                                   estimator="ransac", threshold=3.0, confidence=0.999,
                                   max_iters=5000, seed=0)
    assert len(mi) > 500
    assert len(np.unique(fi)) == len(fi)
    err = np.linalg.norm(truth.apply(m_pts[mi]) - f_pts[fi], axis=1)
    assert np.mean(err < 3.0) > 0.9  # nearly all are true correspondences
    # unrelated descriptors: no seed fit, the caller falls back to matching all
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, m_desc.shape, dtype=np.uint8)
    assert features.match_guided(m_pts, f_pts, noise, f_desc, m_resp, f_resp, detector="orb",
                                 transform="similarity", ratio=0.75, radius=6.0,
                                 estimator="ransac", threshold=3.0, confidence=0.999,
                                 max_iters=5000, seed=0) is None


def test_guided_matching_tries_a_larger_seed_when_the_small_one_fails(monkeypatch):
    fixed, moving, truth = _pair("camera")
    f8, m8 = features.to_uint8(fixed), features.to_uint8(moving)
    f_xy, f_desc, f_resp = features.detect(f8, None, "orb", 5000, with_response=True)
    m_xy, m_desc, m_resp = features.detect(m8, None, "orb", 5000, with_response=True)
    f_pts, m_pts = features.xy_to_rowcol(f_xy), features.xy_to_rowcol(m_xy)
    kw = dict(detector="orb", transform="similarity", ratio=0.75, radius=6.0, estimator="ransac",
              threshold=3.0, confidence=0.999, max_iters=5000, seed=0)
    calls = []
    real_match = features.match

    def counting_match(dm, df, **opts):
        calls.append(len(dm))
        return real_match(dm, df, **opts)

    monkeypatch.setattr(features, "match", counting_match)
    # 8 keypoints a side cannot give the 12 seed matches a similarity needs: the next seed
    monkeypatch.setattr(features, "GUIDED_SEEDS", (8, 400))
    mi, fi = features.match_guided(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, **kw)
    assert calls == [8, 400]
    assert len(mi) > 500
    err = np.linalg.norm(truth.apply(m_pts[mi]) - f_pts[fi], axis=1)
    assert np.mean(err < 3.0) > 0.9
    # a seed that succeeds is the only one matched
    calls.clear()
    monkeypatch.setattr(features, "GUIDED_SEEDS", (300, 400))
    features.match_guided(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, **kw)
    assert calls == [300]


@pytest.mark.parametrize("detector", ["orb", "sift", "akaze"])
def test_descriptor_distance_is_opencvs(detector):
    fixed, moving, _ = _pair("coins")
    _, d1 = features.detect(features.to_uint8(fixed), None, detector, 300)
    _, d2 = features.detect(features.to_uint8(moving), None, detector, 300)
    n = min(len(d1), len(d2))
    norm = cv2.NORM_L2 if detector == "sift" else cv2.NORM_HAMMING
    want = [cv2.norm(d1[i], d2[i], norm) for i in range(n)]
    np.testing.assert_allclose(features.descriptor_distance(d1[:n], d2[:n], detector), want,
                               rtol=1e-5)


def test_popcount_table_equals_bitwise_count():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (300, 61), dtype=np.uint8)
    want = np.array([sum(bin(v).count("1") for v in row) for row in x.tolist()])
    np.testing.assert_array_equal(features._popcount_rows(x, table=True), want)
    np.testing.assert_array_equal(features._popcount_rows(x), want)


@pytest.mark.parametrize("detector,make", [
    ("orb", lambda rng, n: rng.integers(0, 256, (n, 32), dtype=np.uint8)),
    ("akaze", lambda rng, n: rng.integers(0, 256, (n, 61), dtype=np.uint8)),
    ("sift", lambda rng, n: (rng.random((n, 128)) * 200).astype(np.float32)),
])
@pytest.mark.parametrize("n_query,n_train,k", [(700, 500, 2), (40, 1, 1), (0, 30, 2), (60, 1, 2)])
def test_brute_force_knn_arrays_equal_opencvs_knnmatch(detector, make, n_query, n_train, k):
    """Brute force reads cv2.batchDistance's arrays instead of DMatch objects: the same
    neighbours and distances as BFMatcher.knnMatch, ties and short train sets included."""
    rng = np.random.default_rng(n_query + n_train)
    query, train = make(rng, n_query), make(rng, n_train)
    if detector == "orb":
        query[1::7] = train[0]  # exact duplicates: ties at distance 0 and equal seconds
    want_idx, want_dist = features._knn(features._matcher("bf", detector), query, train, k)
    idx, dist = features._knn_bf(detector, query, train, k)
    assert idx.shape == want_idx.shape == (n_query, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dist, want_dist)


def test_binary_descriptor_distance_in_64_bit_words_equals_bytes():
    rng = np.random.default_rng(8)
    a = rng.integers(0, 256, (500, 32), dtype=np.uint8)
    b = rng.integers(0, 256, (500, 32), dtype=np.uint8)
    want = features._popcount_rows(np.bitwise_xor(a, b), table=True)
    got = features.descriptor_distance(a, b, "orb")
    np.testing.assert_array_equal(got, want)
    # rows that are views into a larger array (not contiguous) too
    np.testing.assert_array_equal(features.descriptor_distance(a[::2], b[::2], "orb"), want[::2])
    assert features._popcount_rows(np.bitwise_xor(a, b).view(np.uint64), table=True).tolist() == want.tolist()
