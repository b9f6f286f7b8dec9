"""Feature backend: known transforms on real photographs are recovered to sub-pixel TRE
with every detector; conventions (OpenCV x/y vs napari row/col, spacing) are pinned;
failures are RegistrationError with advice, never cv2.error."""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest

from napari_registration import data, register
from napari_registration.backends import features
from napari_registration.core.register import (RegistrationCancelled, RegistrationError,
                                               method_info)
from napari_registration.core.resample import resample
from napari_registration.core.transform import Transform

pytest.importorskip("cv2")


# ------------------------------------------------------------------------- helpers
@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    from skimage import color
    from skimage import data as skdata

    img = getattr(skdata, name)()
    if img.ndim == 3:
        img = color.rgb2gray(img)
    img = img.astype(np.float32)
    return (img - img.min()) / np.ptp(img)


def _random_truth(kind: str, shape, seed: int, spacing=(1.0, 1.0)) -> Transform:
    """A random moving -> fixed transform of ``kind`` about the image centre (world)."""
    rng = np.random.default_rng(seed)
    centre = (np.array(shape, float) - 1) / 2 * np.asarray(spacing)
    angle = rng.uniform(-15, 15) if kind != "translation" else 0.0
    scale = rng.uniform(0.9, 1.1) if kind in ("similarity", "affine", "homography") else 1.0
    shift = rng.uniform(-12, 12, 2) * np.asarray(spacing)
    m = Transform.from_rotation(angle, center=centre, scale=scale, shift=shift).matrix
    if kind in ("affine", "homography"):
        lin = np.eye(3)
        lin[:2, :2] += rng.uniform(-0.06, 0.06, (2, 2))
        c = np.eye(3)
        c[:2, 2] = centre
        m = m @ c @ lin @ np.linalg.inv(c)
    if kind == "homography":
        p = np.eye(3)
        p[2, :2] = rng.uniform(-1.5e-4, 1.5e-4, 2) / np.asarray(spacing)
        c = np.eye(3)
        c[:2, 2] = centre
        m = c @ p @ np.linalg.inv(c) @ m
    return Transform(m)


@lru_cache(maxsize=None)
def _pair(name: str, kind: str, seed: int, spacing=(1.0, 1.0)):
    """(fixed, moving, truth), cached: register() never modifies its inputs."""
    fixed = _photo(name)
    truth = _random_truth(kind, fixed.shape, seed, spacing)
    # moving(q) = fixed(truth(q)): truth (moving -> fixed) aligns it
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3, output_spacing=spacing,
                      input_spacing=spacing).astype(np.float32)
    return fixed, moving, truth


def _tre_px(result, truth, shape, spacing=(1.0, 1.0)) -> float:
    pts = data.grid_points(shape, spacing)
    return data.tre_against_truth(result.transform, truth, pts)["mean"] / min(spacing)


# ------------------------------------------------------------------ conventions
def test_xy_to_rowcol_convention_is_pinned():
    # OpenCV (x=10, y=3) is column 10, row 3: napari (row, col) = (3, 10)
    np.testing.assert_array_equal(features.xy_to_rowcol([[10.0, 3.0], [0.5, 7.25]]),
                                  [[3.0, 10.0], [7.25, 0.5]])
    # world = index * spacing, spacing in napari order (row, col)
    np.testing.assert_allclose(features.keypoints_to_world([[10.0, 3.0]], (2.0, 0.5)), [[6.0, 5.0]])


def test_opencv_keypoint_lands_on_the_napari_pixel():
    """A blob drawn at array[row=40, col=90] is reported by SIFT at (row, col) = (40, 90)."""
    img = np.zeros((96, 160), np.float32)
    rr, cc = np.mgrid[:96, :160]
    img += np.exp(-((rr - 40) ** 2 + (cc - 90) ** 2) / (2 * 4.0 ** 2))
    xy, _ = features.detect(features.to_uint8(img), None, "sift", 0)
    assert len(xy) >= 1
    rc = features.xy_to_rowcol(xy)
    nearest = rc[np.argmin(np.linalg.norm(rc - [40, 90], axis=1))]
    np.testing.assert_allclose(nearest, [40, 90], atol=0.3)


def test_to_uint8_maps_unit_range_and_rescales_other_ranges():
    a = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    np.testing.assert_array_equal(features.to_uint8(a), [[0, 128], [255, 64]])
    raw = np.linspace(-500, 3000, 400, dtype=np.float32).reshape(20, 20)
    u = features.to_uint8(raw)
    assert u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    assert raw.min() == -500  # input untouched


def test_to_uint8_of_unit_images_rounds_half_up_and_leaves_input():
    rng = np.random.default_rng(3)
    a = rng.random((64, 80)).astype(np.float32)
    a[0, :6] = [0.0, 1.0, 0.5 / 255, 1.5 / 255, 254.5 / 255, np.nextafter(np.float32(1), 0)]
    before = a.copy()
    want = np.floor(a.astype(np.float32) * np.float32(255) + np.float32(0.5)).astype(np.uint8)
    np.testing.assert_array_equal(features.to_uint8(a), want)
    np.testing.assert_array_equal(a, before)
    # NaN or inf is not a unit image: zero there, the rest stretched by percentiles
    b = a.copy()
    b[5, 5], b[6, 6] = np.nan, np.inf
    u = features.to_uint8(b)
    assert u[5, 5] == 0 and u[6, 6] == 0 and u.max() == 255


# ---------------------------------------------------------------- accuracy on photos
CASES = [("astronaut", "homography", 1), ("camera", "affine", 2), ("coins", "similarity", 3)]


@pytest.mark.parametrize("detector", features.DETECTORS)
@pytest.mark.parametrize("name,kind,seed", CASES)
def test_every_detector_recovers_known_transform(detector, name, kind, seed):
    fixed, moving, truth = _pair(name, kind, seed)
    result = register(fixed, moving, method="features", transform=kind, detector=detector,
                      score=False, warp=False)
    assert _tre_px(result, truth, fixed.shape) <= 0.5
    info = result.info
    assert info["inliers"] >= 10 and 0 < info["inlier_ratio"] <= 1
    assert info["keypoints_fixed"] >= info["matches"] >= info["inliers"] or \
        info["keypoints_moving"] >= info["matches"]


@pytest.mark.parametrize("kind", ["translation", "rigid"])
def test_translation_and_rigid_are_exact_models(kind):
    fixed, moving, truth = _pair("camera", kind, 7)
    result = register(fixed, moving, method="features", transform=kind, score=False, warp=False)
    assert _tre_px(result, truth, fixed.shape) <= 0.5
    lin = result.transform.matrix[:2, :2]
    if kind == "translation":
        np.testing.assert_array_equal(lin, np.eye(2))
    else:  # no scale, no shear: a rotation
        np.testing.assert_allclose(lin @ lin.T, np.eye(2), atol=1e-12)


@pytest.mark.parametrize("kind,estimator", [("rigid", "ransac"), ("similarity", "usac_magsac")])
def test_without_refine_the_model_is_still_of_its_kind(kind, estimator):
    fixed, moving, truth = _pair("coins", kind, 9)
    result = register(fixed, moving, method="features", transform=kind, estimator=estimator,
                      refine=False, score=False, warp=False)
    lin = result.transform.matrix[:2, :2]
    scale = np.sqrt(np.linalg.det(lin))
    np.testing.assert_allclose(lin @ lin.T, scale ** 2 * np.eye(2), atol=1e-12)
    if kind == "rigid":
        assert scale == pytest.approx(1.0, abs=1e-12)
    assert _tre_px(result, truth, fixed.shape) <= 0.5


def test_photo_pair_homography_registers():
    fixed, moving, truth = data.photo_pair()
    result = register(fixed, moving, method="features", transform="homography")
    assert _tre_px(result, truth, fixed.shape) <= 0.5
    assert result.metrics["after"]["ncc"] > result.metrics["before"]["ncc"]
    assert result.metrics["after"]["ncc"] > 0.95
    import json

    saved = json.loads(json.dumps(result.to_dict()))  # info (timings, counts) is JSON-safe
    assert saved["info"]["inliers"] == result.info["inliers"] >= 10
    assert set(saved["info"]["timings"]) == {"detect", "match", "fit"}


@pytest.mark.parametrize("matcher,estimator,detector,kind", [
    ("flann", "usac_magsac", "sift", "affine"), ("flann", "lmeds", "orb", "affine"),
    ("bf", "usac_magsac", "akaze", "homography"), ("bf", "usac_magsac", "brisk", "similarity"),
    ("flann", "usac_magsac", "sift", "rigid"), ("bf", "lmeds", "sift", "similarity"),
])
def test_matchers_and_estimators(matcher, estimator, detector, kind):
    fixed, moving, truth = _pair("astronaut", kind, 11)
    result = register(fixed, moving, method="features", transform=kind, detector=detector,
                      matcher=matcher, estimator=estimator, cross_check=True, score=False,
                      warp=False)
    assert result.info["matcher"] == matcher and result.info["estimator"] == estimator
    assert _tre_px(result, truth, fixed.shape) <= 0.5


@pytest.mark.parametrize("matcher", ["bf", "flann"])
def test_same_seed_same_answer(matcher):
    # FLANN's trees are random: without seeding, two runs in one process differ
    fixed, moving, _ = _pair("coins", "homography", 5)
    kw = dict(method="features", transform="homography", detector="sift", seed=3, score=False,
              warp=False, matcher=matcher)
    a = register(fixed, moving, **kw).transform.matrix
    b = register(fixed, moving, **kw).transform.matrix
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- spacing
def test_anisotropic_spacing_fits_in_world_units():
    """Pixels twice as tall as wide: a world rotation is a shear in pixel space; the
    fit must be a rotation in world units."""
    spacing = (2.0, 1.0)
    fixed = _photo("camera")[::2].copy()  # 256 x 512 pixels of 2 x 1 world units: a square
    truth = Transform.from_rotation(9.0, center=(255.0, 255.5), shift=(6.0, -8.0))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3, output_spacing=spacing,
                      input_spacing=spacing).astype(np.float32)
    result = register(fixed, moving, method="features", transform="rigid", fixed_spacing=spacing,
                      moving_spacing=spacing, score=False, warp=False)
    assert _tre_px(result, truth, fixed.shape, spacing) <= 0.5
    lin = result.transform.matrix[:2, :2]
    np.testing.assert_allclose(lin @ lin.T, np.eye(2), atol=1e-9)
    assert np.rad2deg(np.arctan2(lin[1, 0], lin[0, 0])) == pytest.approx(9.0, abs=0.1)
    # keypoints are reported in world units: rows reach beyond the 256 pixel rows
    kp = result.extras["fixed_keypoints"]
    assert kp[:, 0].max() > 300 and kp[:, 0].max() <= 2 * 255
    assert kp[:, 1].max() <= 511


def test_strongly_anisotropic_pixels_need_square_pixel_detection():
    """Pixels 4 x 1: a 25 degree world rotation distorts pixel-space shapes so much that
    descriptors stop matching; detecting on square pixels recovers it."""
    spacing = (4.0, 1.0)
    fixed = _photo("camera")[::4].copy()
    truth = Transform.from_rotation(25.0, center=(254.0, 255.5), shift=(6.0, -8.0))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3, output_spacing=spacing,
                      input_spacing=spacing).astype(np.float32)
    kw = dict(method="features", transform="rigid", fixed_spacing=spacing, moving_spacing=spacing,
              score=False, warp=False)
    result = register(fixed, moving, **kw)
    assert _tre_px(result, truth, fixed.shape, spacing) <= 0.5
    with pytest.raises(RegistrationError):
        register(fixed, moving, isotropic=False, **kw)


def test_square_pixels_keeps_world_positions():
    img = np.zeros((20, 50), np.float32)
    img[10, 30] = 1.0
    mask = np.zeros(img.shape, bool)
    mask[10, 30] = True
    out, out_mask, sp = features.square_pixels(img, (4.0, 1.0), mask)
    np.testing.assert_array_equal(sp, [1.0, 1.0])
    assert out.shape == (77, 50)  # rows 0..19 of 4 units -> 0..76 of 1 unit
    assert np.unravel_index(np.argmax(out), out.shape) == (40, 30)  # world (10*4, 30*1)
    assert out.min() >= 0.0 and out.max() <= 1.0  # no cubic overshoot out of [0, 1]
    assert out_mask[40, 30] and not out_mask[30, 30]
    same, _, sp1 = features.square_pixels(img, (1.0, 1.02))
    assert same is img and tuple(sp1) == (1.0, 1.02)


def test_moving_at_half_resolution_is_rigid_in_world():
    """moving sampled every 2 world units: with moving_spacing=2 the world map is rigid."""
    fixed = _photo("astronaut")
    truth = Transform.from_rotation(-6.0, center=(255.5, 255.5), shift=(10.0, 4.0))
    moving = resample(fixed, truth.inverse(), (256, 256), order=3, output_spacing=(2.0, 2.0))
    result = register(fixed, moving, method="features", transform="rigid",
                      moving_spacing=(2.0, 2.0), score=False, warp=False)
    assert _tre_px(result, truth, fixed.shape) <= 0.5


def test_extras_are_world_points_paired_by_the_transform():
    fixed, moving, truth = _pair("camera", "similarity", 4)
    fixed_before, moving_before = fixed.copy(), moving.copy()
    origin = (100.0, -50.0)
    result = register(fixed, moving, method="features", transform="similarity",
                      fixed_origin=origin, score=False, warp=False)
    np.testing.assert_array_equal(fixed, fixed_before)  # inputs untouched
    np.testing.assert_array_equal(moving, moving_before)
    ex = result.extras
    assert ex["fixed_keypoints"].shape == (result.info["keypoints_fixed"], 2)
    assert ex["moving_keypoints"].shape == (result.info["keypoints_moving"], 2)
    assert ex["fixed_matches"].shape == ex["moving_matches"].shape == (result.info["inliers"], 2)
    # origins were added by the core, so the full transform pairs the matches
    err = np.linalg.norm(result.transform.apply(ex["moving_matches"]) - ex["fixed_matches"], axis=1)
    assert err.max() < 3.0
    assert np.sqrt(np.mean(err ** 2)) == pytest.approx(result.info["rms_px"], rel=1e-6)
    assert ex["fixed_keypoints"][:, 0].min() >= origin[0]


def test_masks_limit_where_keypoints_are_taken():
    fixed, moving, truth = _pair("astronaut", "similarity", 8)
    mask = np.zeros(fixed.shape, bool)
    mask[:, :300] = True
    result = register(fixed, moving, method="features", transform="similarity", fixed_mask=mask,
                      score=False, warp=False)
    assert result.extras["fixed_keypoints"][:, 1].max() < 300
    assert _tre_px(result, truth, fixed.shape) <= 0.5


# --------------------------------------------------------------------------- failures
def test_smooth_gradient_fails_with_advice():
    rr, cc = np.mgrid[:256, :256]
    fixed = (0.3 * rr / 255 + 0.7 * cc / 255).astype(np.float32)
    moving = np.roll(fixed, 5, axis=1)
    with pytest.raises(RegistrationError, match="keypoints") as err:
        register(fixed, moving, method="features", transform="affine")
    assert "equalize='clahe'" in str(err.value) and "method='intensity'" in str(err.value)


@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_noise_pair_fails_with_advice_not_cv2_error(detector):
    rng = np.random.default_rng(0)
    fixed = (0.5 + 1e-3 * rng.standard_normal((200, 200))).astype(np.float32)
    moving = (0.5 + 1e-3 * rng.standard_normal((200, 200))).astype(np.float32)
    with pytest.raises(RegistrationError, match="matches passed the ratio test") as err:
        register(fixed, moving, method="features", transform="homography", detector=detector)
    assert "method='intensity'" in str(err.value)
    # a loose ratio test lets random matches through: RANSAC finds no consensus
    with pytest.raises(RegistrationError, match="inliers among|degenerate") as err:
        register(fixed, moving, method="features", transform="homography", detector=detector,
                 ratio=0.99)
    assert "equalize='clahe'" in str(err.value)


def test_absurd_scale_is_reported_not_returned():
    fixed, moving, truth = _pair("camera", "similarity", 2)  # scale within 0.9..1.1
    s = np.sqrt(np.linalg.det(truth.matrix[:2, :2]))
    factor = max(s, 1 / s)
    assert factor > 1.02
    ok = register(fixed, moving, method="features", transform="similarity", score=False,
                  warp=False, max_scale=factor * 1.05)
    assert _tre_px(ok, truth, fixed.shape) <= 0.5
    with pytest.raises(RegistrationError, match="max_scale"):
        register(fixed, moving, method="features", transform="similarity",
                 max_scale=1 + 0.5 * (factor - 1))


def test_check_model_flags_degenerate_fits():
    corners = np.array([[0, 0], [0, 99], [99, 0], [99, 99]], float)
    line = np.stack([np.arange(20.0), 2 * np.arange(20.0) + 0.01 * (np.arange(20) % 2)], 1)
    assert any("line" in p for p in features.check_model(np.eye(3), "affine", line, corners, 10))
    spread = np.random.default_rng(0).uniform(0, 99, (30, 2))
    assert features.check_model(np.eye(3), "affine", spread, corners, 10) == []
    h = np.eye(3)
    h[2, :2] = (-0.02, 0.0)  # row 50 maps to infinity
    assert any("singular" in p for p in features.check_model(h, "homography", spread, corners, 10))
    # a homography and its negative are the same map: both fine
    ok = np.eye(3)
    ok[2, :2] = (1e-4, -1e-4)
    assert features.check_model(ok, "homography", spread, corners, 10) == []
    assert features.check_model(-ok, "homography", spread, corners, 10) == []
    mirror = np.diag([1.0, -1.0, 1.0])
    assert any("mirrors" in p for p in features.check_model(mirror, "affine", spread, corners, 10))
    big = np.diag([20.0, 20.0, 1.0])
    assert any("scales" in p for p in features.check_model(big, "similarity", spread, corners, 10))


def test_cv2_error_is_wrapped():
    import cv2

    with pytest.raises(RegistrationError, match="OpenCV failed while testing"):
        with features._cv2_errors("testing"):
            cv2.cvtColor(np.zeros((4, 4, 5), np.uint8), cv2.COLOR_BGR2GRAY)


def test_3d_input_is_a_value_error_pointing_elsewhere():
    vol = data.blobs_volume((16, 32, 32))
    with pytest.raises(ValueError, match="fourier|intensity"):
        register(vol, vol, method="features", transform="rigid")
    with pytest.raises(ValueError, match="method='intensity' or method='fourier'"):
        features.register(vol, vol, transform="rigid", fixed_spacing=(1, 1, 1),
                          moving_spacing=(1, 1, 1), progress=lambda *a: None,
                          cancel=lambda: False)


def test_bad_options_are_value_errors():
    fixed, moving, _ = _pair("coins", "translation", 0)
    for bad in (dict(detector="surf"), dict(matcher="kd"), dict(estimator="prosac"),
                dict(ratio=1.5), dict(reproj_threshold=0), dict(confidence=1.0)):
        with pytest.raises(ValueError):
            register(fixed, moving, method="features", transform="affine", **bad)
    with pytest.raises(ValueError, match="does not support"):
        register(fixed, moving, method="features", transform="bspline")


def test_cancel_stops():
    fixed, moving, _ = _pair("coins", "translation", 0)
    with pytest.raises(RegistrationCancelled):
        register(fixed, moving, method="features", transform="affine", cancel=lambda: True)
    # the backend polls cancel itself between stages (first poll: after the fixed image)
    polls = []
    with pytest.raises(RegistrationCancelled):
        features.register(fixed, moving, transform="affine", fixed_spacing=(1.0, 1.0),
                          moving_spacing=(1.0, 1.0), progress=lambda *a: None,
                          cancel=lambda: polls.append(1) or True)
    assert len(polls) == 1


def test_method_info_lists_options():
    info = method_info("features")
    assert info["ndims"] == (2,)
    assert set(info["transforms"]) == {"translation", "rigid", "similarity", "affine", "homography"}
    for key in ("detector", "n_features", "ratio", "matcher", "estimator", "reproj_threshold",
                "confidence", "seed"):
        assert key in info["options"]


def test_backend_import_does_not_load_cv2():
    code = ("import sys, napari_registration.backends.features as f; "
            "assert 'cv2' not in sys.modules, 'cv2 imported at module level'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_flann_matches_are_reproducible_with_seed(detector):
    fixed, moving, _ = _pair("astronaut", "homography", 1)
    _, fd = features.detect(features.to_uint8(fixed), None, detector, 5000)
    _, md = features.detect(features.to_uint8(moving), None, detector, 5000)
    a = features.match(md, fd, detector=detector, matcher="flann", seed=1)
    b = features.match(md, fd, detector=detector, matcher="flann", seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_progress_and_threads_option_restores_opencv_setting():
    import cv2

    fixed, moving, truth = _pair("coins", "rigid", 6)
    before = cv2.getNumThreads()
    seen = []
    result = register(fixed, moving, method="features", transform="rigid", threads=1,
                      progress=lambda f, msg: seen.append((f, msg)), score=False)
    assert cv2.getNumThreads() == before
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("matching" in msg for _, msg in seen)
    assert _tre_px(result, truth, fixed.shape) <= 0.5


@pytest.mark.parametrize("estimator", features.ESTIMATORS)
@pytest.mark.parametrize("kind", features.TRANSFORMS)
def test_fit_recovers_each_model_from_points_with_outliers(kind, estimator):
    """fit() alone on synthetic pairs: 70% inliers with 0.2 px noise, 30% wild outliers."""
    rng = np.random.default_rng(1)
    truth = _random_truth(kind, (400, 400), seed=5).matrix
    src = rng.uniform(0, 400, (300, 2))
    dst = features._project(truth, src) + rng.normal(0, 0.2, (300, 2))
    outliers = rng.random(300) < 0.3
    dst[outliers] = rng.uniform(0, 400, (outliers.sum(), 2))
    m, inl, _ = features.fit(src, dst, kind, estimator=estimator, threshold=2.0, seed=0)
    assert inl[~outliers].mean() > 0.97 and inl[outliers].mean() < 0.05
    grid = np.stack(np.meshgrid(np.linspace(50, 350, 5), np.linspace(50, 350, 5)), -1).reshape(-1, 2)
    err = np.linalg.norm(features._project(m, grid) - features._project(truth, grid), axis=1)
    assert err.mean() < 0.1
