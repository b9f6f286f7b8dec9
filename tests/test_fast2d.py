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
