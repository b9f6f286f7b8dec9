"""The round-6 speed paths of the features (ORB) call give the results of the plain ones:
percentiles without the NaN pass, the uint8 stretch made in each detection thread,
OpenCV's threads shared between two detections, guided matching without a sort per row,
OpenCV's polish skipped where the least-squares refit replaces it, and the cached
registry look-ups."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from napari_registration.core import metrics, parallel
from napari_registration.core import register as core_register
from napari_registration.core.preprocess import prepare_uint8

cv2 = pytest.importorskip("cv2")
from napari_registration.backends import features  # noqa: E402


# ------------------------------------------------------------------ percentiles
@pytest.mark.parametrize("seed", range(4))
def test_percentiles_finite_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(70_000, 300_000))
    kind = seed % 4
    if kind == 0:
        v = rng.random(n, dtype=np.float32)
    elif kind == 1:  # heavy ties (a quantised image)
        v = (rng.integers(0, 40, n) / 39.0).astype(np.float32)
    elif kind == 2:  # skewed, negative values
        v = (rng.standard_exponential(n) - 3.0).astype(np.float32)
    else:  # float64, a few huge outliers
        v = rng.normal(size=n)
        v[rng.integers(0, n, 50)] = 1e30
    q = [0.5, 99.5] if seed % 2 == 0 else [0.5, 25.0, 99.5]
    got = metrics.percentiles(v, q, finite=True)
    np.testing.assert_array_equal(got, np.percentile(v, q))
    np.testing.assert_array_equal(got, metrics.percentiles(v, q))


def test_robust_normalize_uint8_finite_same_bits():
    rng = np.random.default_rng(5)
    img = rng.gamma(2.0, 1.0, (300, 260)).astype(np.float32)
    mask = rng.random(img.shape) > 0.3
    before = img.copy()
    for m in (None, mask):
        np.testing.assert_array_equal(metrics.robust_normalize_uint8(img, m, finite=True),
                                      metrics.robust_normalize_uint8(img, m))
        np.testing.assert_array_equal(prepare_uint8(img, mask=m, finite=True),
                                      prepare_uint8(img, mask=m))
    np.testing.assert_array_equal(img, before)


# --------------------------------------- the stretch in each detection thread
@pytest.mark.parametrize("spacing,masked", [((1.0, 1.0), False), ((1.0, 1.6), True)])
def test_stretch_in_backend_same_as_core_uint8(spacing, masked):
    """register() hands the features backend its float32 grey images with stretch_uint8
    (each detection thread stretches its own image): the keypoints, matches and transform
    are those of the backend given the core's uint8 stretches (prepare_uint8), as before;
    the caller's arrays are not modified."""
    from scipy import ndimage

    from napari_registration import register

    rng = np.random.default_rng(4)
    fixed = (ndimage.gaussian_filter(rng.random((220, 240)), 2.5) * 7 + 3).astype(np.float32)
    moving = ndimage.shift(fixed, (2.6, -3.1), order=1, mode="nearest").astype(np.float32)
    f_mask = m_mask = None
    if masked:
        f_mask = np.ones(fixed.shape, bool)
        f_mask[:, :15] = False
        m_mask = np.ones(moving.shape, bool)
        m_mask[-10:] = False
    copies = fixed.copy(), moving.copy()
    got = register(fixed, moving, method="features", detector="orb", transform="rigid",
                   fixed_spacing=spacing, moving_spacing=spacing, fixed_mask=f_mask,
                   moving_mask=m_mask, score=False, warp=False)
    np.testing.assert_array_equal(fixed, copies[0])
    np.testing.assert_array_equal(moving, copies[1])
    u8 = [prepare_uint8(img, mask=m) for img, m in ((fixed, f_mask), (moving, m_mask))]
    want = features.register(u8[0], u8[1], transform="rigid", fixed_spacing=spacing,
                             moving_spacing=spacing, progress=lambda f, m: None,
                             cancel=lambda: False, fixed_mask=f_mask, moving_mask=m_mask,
                             detector="orb")
    for key in ("fixed_keypoints", "moving_keypoints", "fixed_matches", "moving_matches"):
        np.testing.assert_array_equal(got.extras[key], want.extras[key])
    np.testing.assert_array_equal(got.transform.matrix, want.transform.matrix)
    assert "stretch_uint8" not in core_register.method_info("features")["options"]


# ------------------------------------------------------------ guided matching
def _guided_reference(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, *, detector, transform,
                      ratio, radius, estimator, threshold, confidence, max_iters, seed):
    """The guided matching as it was before round 6 (a stable sort of every row, a 2D
    scatter of the distances), after the seed step, which round 6 left as it was."""
    from scipy.spatial import cKDTree

    seeded = features._guided_seed(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp,
                                   detector=detector, transform=transform, ratio=ratio,
                                   estimator=estimator, threshold=threshold,
                                   confidence=confidence, max_iters=max_iters, seed=seed)
    if seeded is None:
        return None
    m0, cap = seeded
    pred = features._project(m0, m_pts)
    ok = np.all(np.isfinite(pred), axis=1)
    k = min(features.GUIDED_NEIGHBOURS, len(f_pts))
    tree = cKDTree(f_pts)
    _, nb = tree.query(np.where(ok[:, None], pred, 1e300), k=k, distance_upper_bound=float(radius))
    nb = nb.reshape(len(m_pts), k)
    rows, cols = np.nonzero(nb < len(f_pts))
    dist = np.full(nb.shape, np.inf)
    dist[rows, cols] = features.descriptor_distance(m_desc[rows], f_desc[nb[rows, cols]], detector)
    two = np.argsort(dist, axis=1, kind="stable")[:, :2]
    q = np.arange(len(m_pts))
    best = dist[q, two[:, 0]]
    second = dist[q, two[:, 1]] if k >= 2 else np.full(len(q), np.inf)
    keep = np.isfinite(best) & (best <= cap) & (best < ratio * second)
    mi = q[keep]
    fi = nb[mi, two[keep, 0]]
    order = np.lexsort((mi, best[mi], fi))
    first = np.ones(len(order), bool)
    first[1:] = fi[order][1:] != fi[order][:-1]
    sel = np.sort(order[first])
    return mi[sel], fi[sel]


def _synthetic_keypoints(seed, n=1400):
    """Fixed keypoints in clusters (as ORB's pyramid levels make them), moving ones a
    similarity of them plus noise and outliers; descriptors that are near copies, with
    many equal Hamming distances."""
    rng = np.random.default_rng(seed)
    centres = rng.random((n // 3, 2)) * 500
    f_pts = (centres[rng.integers(0, len(centres), n)] + rng.normal(0, 1.5, (n, 2)))
    f_desc = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    ang, s = np.deg2rad(7.0), 1.08
    rot = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    m_pts = (f_pts - 250) @ np.linalg.inv(rot).T + 250 + rng.normal(0, 0.7, (n, 2))
    m_desc = f_desc.copy()
    flips = rng.integers(0, 32, (n, 3))
    for j in range(3):  # a few bits off each descriptor
        m_desc[np.arange(n), flips[:, j]] ^= np.uint8(1 << j)
    out = rng.random(n) < 0.25  # a quarter are outliers with random descriptors
    m_pts[out] = rng.random((out.sum(), 2)) * 500
    m_desc[out] = rng.integers(0, 256, (out.sum(), 32), dtype=np.uint8)
    perm = rng.permutation(n)
    f_resp = rng.random(n).round(2)  # ties in the responses too
    m_resp = f_resp[perm] if seed % 2 else rng.random(n).round(2)
    return m_pts[perm], f_pts, m_desc[perm], f_desc, m_resp, f_resp


@pytest.mark.parametrize("seed", range(3))
def test_guided_matching_equals_reference(seed):
    m_pts, f_pts, m_desc, f_desc, m_resp, f_resp = _synthetic_keypoints(seed)
    kw = dict(detector="orb", transform="similarity", ratio=0.75, radius=6.0,
              estimator="ransac", threshold=3.0, confidence=0.999, max_iters=5000, seed=0)
    ref = _guided_reference(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, **kw)
    assert ref is not None and len(ref[0]) > 200
    got = features.match_guided(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, workers=2, **kw)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


# ------------------------------------------------------------------- the fit
@pytest.mark.parametrize("transform,estimator,refine", [
    ("similarity", "ransac", True), ("rigid", "ransac", True), ("rigid", "ransac", False),
    ("affine", "ransac", True), ("similarity", "lmeds", True), ("similarity", "ransac", False),
    ("affine", "usac_magsac", True)])
def test_fit_without_opencv_polish_same_result(transform, estimator, refine, monkeypatch):
    """OpenCV's Levenberg-Marquardt polish is skipped where the least-squares refit
    replaces the model: the matrix and the inliers are those of a fit with the polish."""
    rng = np.random.default_rng(11)
    n = 400
    src = rng.random((n, 2)) * 400
    ang = np.deg2rad(5.0)
    lin = 1.05 * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    if transform == "affine":
        lin = lin @ np.array([[1.0, 0.04], [0.0, 0.97]])
    if transform == "rigid":
        lin = lin / 1.05
    dst = src @ lin.T + (12.0, -7.0) + rng.normal(0, 0.6, (n, 2))
    dst[: n // 5] = rng.random((n // 5, 2)) * 400  # outliers
    got = features.fit(src, dst, transform, estimator=estimator, refine=refine, seed=3)

    calls = []
    for name in ("estimateAffinePartial2D", "estimateAffine2D"):
        real = getattr(cv2, name)

        def polished(*args, real=real, **kw):
            calls.append(kw.get("refineIters"))
            kw["refineIters"] = 10  # OpenCV's default
            return real(*args, **kw)

        monkeypatch.setattr(cv2, name, polished)
    want = features.fit(src, dst, transform, estimator=estimator, refine=refine, seed=3)
    replaced = refine or transform == "rigid"
    assert calls == [0 if replaced else 10]
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]
    np.testing.assert_array_equal(got[0], want[0])


# ------------------------------------------------------------ registry caches
def test_available_methods_cached_but_fresh(monkeypatch):
    first = core_register.available_methods()
    first.append("not-a-method")
    assert "not-a-method" not in core_register.available_methods()
    backends = dict(core_register._BACKENDS)
    backends["ghost"] = "napari_registration.backends.no_such_module"
    backends["fourier2"] = core_register._BACKENDS["fourier"]
    monkeypatch.setattr(core_register, "_BACKENDS", backends)
    names = core_register.available_methods()
    assert "fourier2" in names and "ghost" not in names


def test_option_type_check_still_names_the_option():
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    for _ in range(2):  # the cached signature gives the same message the second time
        with pytest.raises(ValueError, match="n_features"):
            core_register.register(img, img, method="features", detector="orb",
                                   transform="rigid", n_features="many")


# ------------------------------------------- OpenCV's threads during two detections
def test_share_cores_restores_opencv_threads_when_nested():
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        want = max(1, parallel.n_workers() // 2)
        with features._share_cores(2):
            assert cv2.getNumThreads() == want
            with features._share_cores(2):  # an overlapping user (another thread's call)
                assert cv2.getNumThreads() == want
            assert cv2.getNumThreads() == want  # still in use by the outer one
        assert cv2.getNumThreads() == 3
        with pytest.raises(RuntimeError):
            with features._share_cores(2):
                raise RuntimeError("a failed detection")
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


def test_threads_and_share_cores_overlapping_restore_the_setting():
    """A call with threads=N and a call that shares the cores, overlapping in either
    order (two threads' calls): OpenCV's process-wide setting comes back as it was.
    With two separate save/restores the one that left last put back the other's count."""
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        share = max(1, parallel.n_workers() // 2)
        a, b = features._threads(5), features._share_cores(2)
        a.__enter__()
        assert cv2.getNumThreads() == 5
        b.__enter__()
        assert cv2.getNumThreads() == share  # the latest request holds while both run
        a.__exit__(None, None, None)
        assert cv2.getNumThreads() == share  # still in use by the other call
        b.__exit__(None, None, None)
        assert cv2.getNumThreads() == 3
        b, a = features._share_cores(2), features._threads(5)
        b.__enter__()
        a.__enter__()
        b.__exit__(None, None, None)
        a.__exit__(None, None, None)
        assert cv2.getNumThreads() == 3
        with features._threads(0):  # 0 leaves OpenCV's setting alone
            assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


def test_orb_pair_detection_keeps_opencv_setting_and_keypoints(monkeypatch):
    """Two ORB detections at once with half the cores each for OpenCV: the keypoints and
    the fit of one detection after the other (threads=1), and OpenCV's setting afterwards."""
    from napari_registration import register

    rng = np.random.default_rng(2)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.random((200, 220)), 2.0).astype(np.float32)
    moving = ndimage.shift(img, (3.2, -4.7), order=1, mode="nearest").astype(np.float32)
    before = cv2.getNumThreads()
    monkeypatch.setattr(features, "n_workers", lambda threads=0: 2 if not threads else threads)
    monkeypatch.setattr(features, "spare_cores", lambda: False)  # a busy machine: shared
    seen = []
    real_share = features._share_cores

    @contextlib.contextmanager
    def spy(parts):
        with real_share(parts):
            seen.append(cv2.getNumThreads())
            yield

    monkeypatch.setattr(features, "_share_cores", spy)
    a = register(img, moving, method="features", detector="orb", transform="translation",
                 score=False, warp=False)
    assert seen == [max(1, parallel.n_workers() // 2)]
    assert cv2.getNumThreads() == before
    b = register(img, moving, method="features", detector="orb", transform="translation",
                 score=False, warp=False, threads=1)
    for key in ("fixed_keypoints", "moving_keypoints", "fixed_matches", "moving_matches"):
        np.testing.assert_array_equal(a.extras[key], b.extras[key])
    np.testing.assert_array_equal(a.transform.matrix, b.transform.matrix)
