"""2D linear registration, fast path (issue #15): the Fourier backend's spline
Gauss-Newton stage is kept whenever its own same-footing check accepts it, the
refinement's shortcuts (one Gauss-Newton matrix per level, no re-evaluation of the
result) give the same answer, and known transforms are recovered on real photos."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration import register
from napari_registration.core.refine import refine_linear
from napari_registration.core.transform import Transform
from napari_registration.data import _warp_by_truth, grid_points, tre_against_truth


def _grey(rgb):
    return (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255


def _centre(shape):
    return (np.array(shape) - 1) / 2


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return _grey(data.astronaut())


def test_fourier_rigid_keeps_the_spline_result_on_a_photo_with_flat_areas(astronaut):
    # a whole-image NCC with linear interpolation used to veto the spline result here and
    # fall back to a Powell polish at ~2.3e-3 px; the spline stage reaches < 1e-3 px
    c = _centre(astronaut.shape)
    truth = Transform.from_rotation(12.0, center=c, shift=(-7.4, 5.8))
    moving = _warp_by_truth(astronaut, truth).astype(np.float32)
    r = register(astronaut, moving, method="fourier", transform="rigid", warp=False, score=False)
    assert r.info["spline_refine"]["accepted"], r.info["spline_refine"]
    assert "refine_evaluations" not in r.info  # no Powell fallback ran
    assert tre_against_truth(r.transform, truth, grid_points(astronaut.shape))["mean"] < 1.2e-3
    assert 0.99 < r.info["ncc"] <= 1.0


def test_fourier_similarity_recovers_zoom_and_rotation(astronaut):
    img = astronaut[::2, ::2].copy()  # 256 x 256: quick
    c = _centre(img.shape)
    truth = Transform.from_rotation(-8.0, center=c, scale=0.93, shift=(3.1, -2.2))
    moving = _warp_by_truth(img, truth).astype(np.float32)
    r = register(img, moving, method="fourier", transform="similarity", warp=False, score=False)
    assert tre_against_truth(r.transform, truth, grid_points(img.shape))["mean"] < 5e-3
    assert r.info["scale"] == pytest.approx(0.93, abs=1e-4)
    assert r.info["angle_deg"] == pytest.approx(-8.0, abs=0.01)


def test_refinement_with_samples_outside_the_moving_image_still_converges(astronaut):
    # a large shift puts part of the sampled fixed pixels outside the moving image: the
    # Gauss-Newton matrix then has their rows subtracted (not rebuilt) and must stay right
    img = astronaut[::2, ::2].copy()
    c = _centre(img.shape)
    truth = Transform.from_rotation(4.0, center=c, shift=(40.0, -35.0))
    moving = _warp_by_truth(img, truth).astype(np.float32)
    start = Transform.from_translation((0.8, -0.6)) @ truth
    out, info = refine_linear(img, moving, start, model="rigid", start_error_px=2)
    assert info["accepted"], info
    pts = grid_points(img.shape, margin=0.35)
    assert tre_against_truth(out, truth, pts)["mean"] < 5e-3


def _stage_names(info):
    return [(s["method"], s["model"]) for s in info["stages"]]


def test_auto_keeps_the_fast_fourier_stage_and_skips_intensity_on_same_contrast(astronaut):
    img = astronaut[::2, ::2].copy()
    c = _centre(img.shape)
    truth = Transform.from_rotation(35.0, center=c, shift=(-4.3, 6.1))
    moving = _warp_by_truth(img, truth).astype(np.float32)
    r = register(img, moving, method="auto", transform="rigid", warp=False, score=False)
    assert r.info["chosen"]["method"] == "fourier" and r.info["chosen"]["model"] == "rigid"
    assert ("intensity", "rigid") not in _stage_names(r.info)  # skipped: already aligned
    assert tre_against_truth(r.transform, truth, grid_points(img.shape))["mean"] < 5e-3
    # the same pair with intensity alone: auto is not less precise than it (1.25x)
    ri = register(img, moving, method="intensity", transform="rigid", seed=0, warp=False,
                  score=False)
    e_auto = tre_against_truth(r.transform, truth, grid_points(img.shape))["mean"]
    e_int = tre_against_truth(ri.transform, truth, grid_points(img.shape))["mean"]
    assert e_auto <= max(1.25 * e_int, 1e-3)


def test_auto_affine_from_a_fourier_similarity_start(coins):
    c = _centre(coins.shape)
    truth = Transform.from_linear(np.array([[1.04, 0.05], [-0.03, 0.97]]), c, (3.3, -4.6))
    moving = _warp_by_truth(coins, truth).astype(np.float32)
    r = register(coins, moving, method="auto", transform="affine", warp=False, score=False)
    chosen = r.info["chosen"]
    assert (chosen["method"], chosen["model"]) == ("polish", "affine")
    assert ("intensity", "affine") not in _stage_names(r.info)
    assert tre_against_truth(r.transform, truth, grid_points(coins.shape))["mean"] < 0.01


def test_auto_multimodal_pair_falls_through_to_intensity(coins):
    # folded contrast: fourier's spline stage declines (no linear intensity relation)
    # without its slow Powell fallback, and intensity (mutual information) decides
    c = _centre(coins.shape)
    truth = Transform.from_rotation(6.0, center=c, shift=(2.0, -3.0))
    moving = _warp_by_truth(coins, truth).astype(np.float32)
    folded = (np.abs(moving - 0.45) * 2).astype(np.float32)
    r = register(coins, folded, method="auto", transform="rigid", seed=0, warp=False, score=False)
    fast = [s for s in r.info["stages"] if (s["method"], s["model"]) == ("fourier", "rigid")][0]
    assert fast.get("spline_refine", {}).get("accepted") is False
    assert "refine_evaluations" not in fast  # no Powell fallback
    assert ("intensity", "rigid") in _stage_names(r.info)
    assert r.info["chosen"]["method"] != "fourier"


@pytest.fixture(scope="module")
def coins():
    from skimage import data

    return data.coins().astype(np.float32) / 255


def test_mutual_information_matches_numpy_histogram2d():
    from napari_registration.core.metrics import mutual_information

    rng = np.random.default_rng(3)
    a = rng.random(5000)
    b = np.round((0.6 * a + 0.4 * rng.random(5000)) * 8) / 8  # values on bin edges too
    mask = rng.random(5000) > 0.3
    hist, _, _ = np.histogram2d(a[mask], b[mask], bins=32)
    pxy = hist / hist.sum()
    px, py = pxy.sum(1, keepdims=True), pxy.sum(0, keepdims=True)
    nz = pxy > 0
    expected = float(np.sum(pxy[nz] * np.log(pxy[nz] / (px @ py)[nz])))
    assert mutual_information(a, b, mask) == pytest.approx(expected, rel=1e-12)
    assert mutual_information(np.full(50, 0.2), np.full(50, 0.7)) == 0.0


def test_fourier_large_zoom_searches_again_at_full_resolution():
    """At 60 degrees and 1.3x the 2x2 block-mean log-polar search found the scale as 1.0
    and the spline stage declined; the full-resolution search then finds it."""
    from skimage import data, transform as sktf

    from napari_registration.data import _warp_by_truth

    fixed = sktf.resize(data.camera().astype(np.float32) / 255, (384, 384), anti_aliasing=True)
    fixed = fixed.astype(np.float32)
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(60.0, center=centre, scale=1.3, shift=(10.0, -15.0))
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    res = register(fixed, moving, method="fourier", transform="similarity", fallback=False,
                   score=False)
    assert abs(res.info["scale"] - 1.3) < 1e-3
    assert res.info["spline_refine"]["accepted"]
