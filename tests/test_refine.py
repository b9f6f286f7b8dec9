"""Gauss-Newton refinement on a cubic-spline pyramid (core.refine) and its use as the
final stage of ``fourier`` (rigid/similarity) and ``intensity`` (linear ``polish``):
real images, known transforms, perturbed starts, recovered to a tolerance a user would
accept for a "precise" method (hundredths of a pixel or better)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration import register
from napari_registration.core.refine import refine_linear
from napari_registration.core.transform import Transform
from napari_registration.data import _warp_by_truth, grid_points, tre_against_truth


@pytest.fixture(scope="module")
def coins():
    from skimage import data

    return (data.coins().astype(np.float32) / 255)


def _centre(shape, spacing=None):
    sp = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    return (np.array(shape) - 1) / 2 * sp


@pytest.mark.parametrize("model", ["translation", "rigid", "similarity", "affine"])
def test_recovers_2d_linear_from_a_perturbed_start(coins, model):
    c = _centre(coins.shape)
    lin = {"translation": np.eye(2), "rigid": Transform.from_rotation(9.0).matrix[:2, :2],
           "similarity": Transform.from_rotation(6.0, scale=1.05).matrix[:2, :2],
           "affine": np.array([[1.04, 0.05], [-0.03, 0.97]])}[model]
    truth = Transform.from_linear(lin, c, (3.3, -4.6))
    moving = _warp_by_truth(coins, truth).astype(np.float32)
    # a start ~2 px off (what a coarse Fourier or ITK stage leaves)
    off = Transform.from_rotation(0.0 if model == "translation" else 0.6, center=c,
                                  scale=1.003 if model in ("similarity", "affine") else 1.0,
                                  shift=(1.2, -0.9))
    start = off @ truth
    pts = grid_points(coins.shape)
    assert tre_against_truth(start, truth, pts)["mean"] > 1.0
    out, info = refine_linear(coins, moving, start, model=model, start_error_px=4)
    assert info["accepted"], info
    assert tre_against_truth(out, truth, pts)["mean"] < 0.01
    if model in ("rigid", "translation"):  # the model is kept: no scale creeps in
        assert np.allclose(np.linalg.det(out.matrix[:2, :2]), 1.0, atol=1e-9)


def test_recovers_3d_rigid_with_anisotropic_spacing():
    from napari_registration.data import volume_pair

    fixed, moving, truth, spacing = volume_pair()
    c = _centre(fixed.shape, spacing)
    a = np.deg2rad(0.8)
    wobble = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    start = Transform.from_linear(wobble, c, (0.6, -0.4, 0.5)) @ truth
    pts = grid_points(fixed.shape, spacing)
    assert tre_against_truth(start, truth, pts)["mean"] > 0.5
    out, info = refine_linear(fixed, moving, start, model="rigid", fixed_spacing=spacing,
                              moving_spacing=spacing, start_error_px=2)
    assert info["accepted"], info
    assert tre_against_truth(out, truth, pts)["mean"] < 0.02
    assert np.allclose(out.matrix[:3, :3] @ out.matrix[:3, :3].T, np.eye(3), atol=1e-9)


def test_recovers_3d_affine_from_random_samples_repeatably():
    """samples="random": a seeded random subset of every non-flat voxel (what the 3D
    affine polish uses); the same inputs give the same matrix, and it converges."""
    from napari_registration.data import volume_pair

    fixed, _, _, spacing = volume_pair()
    c = _centre(fixed.shape, spacing)
    lin = np.array([[1.03, 0.02, 0.0], [0.0, 0.97, 0.03], [-0.02, 0.0, 1.02]])
    truth = Transform.from_linear(lin, c, (1.5, -2.0, 1.0))
    moving = _warp_by_truth(fixed, truth, output_spacing=spacing,
                            input_spacing=spacing).astype(np.float32)
    start = Transform.from_linear(np.eye(3) * 1.004, c, (0.5, -0.4, 0.3)) @ truth
    pts = grid_points(fixed.shape, spacing)
    assert tre_against_truth(start, truth, pts)["mean"] > 0.4
    kw = dict(model="affine", fixed_spacing=spacing, moving_spacing=spacing,
              start_error_px=2, max_samples=2 ** 13, samples="random")
    out, info = refine_linear(fixed, moving, start, **kw)
    again, _ = refine_linear(fixed, moving, start, **kw)
    assert info["accepted"], info
    assert np.array_equal(out.matrix, again.matrix)
    assert tre_against_truth(out, truth, pts)["mean"] < 0.05
    with pytest.raises(ValueError, match="samples must be"):
        refine_linear(fixed, moving, start, **dict(kw, samples="every"))


def test_declines_when_contrast_is_not_linear_and_keeps_the_start(coins):
    c = _centre(coins.shape)
    truth = Transform.from_rotation(5.0, center=c, shift=(2.0, 1.0))
    moving = _warp_by_truth(coins, truth).astype(np.float32)
    moving = (np.abs(moving - 0.45) * 2).astype(np.float32)  # folded contrast: NCC ~ 0
    start = Transform.from_translation((1.0, 0.5)) @ truth
    out, info = refine_linear(coins, moving, start, model="rigid")
    assert not info["accepted"] and "declined" in info["reason"]
    assert out == start


def test_bad_input_is_a_value_error(coins):
    with pytest.raises(ValueError, match="model must be one of"):
        refine_linear(coins, coins, Transform.identity(2), model="bspline")
    proj = np.eye(3)
    proj[2, 0] = 1e-3
    with pytest.raises(ValueError, match="linear"):
        refine_linear(coins, coins, Transform(proj), model="affine")


def test_fourier_rigid_is_precise_on_a_real_photo(coins):
    c = _centre(coins.shape)
    truth = Transform.from_rotation(10.0, center=c, shift=(4.2, -6.5))
    moving = _warp_by_truth(coins, truth).astype(np.float32)
    r = register(coins, moving, method="fourier", transform="rigid", warp=False, score=False)
    assert r.info["spline_refine"]["accepted"], r.info["spline_refine"]
    # the NCC polish it replaces reached ~2e-3 px here
    assert tre_against_truth(r.transform, truth, grid_points(coins.shape))["mean"] < 1.5e-3


def test_intensity_polish_is_used_for_same_contrast_and_skipped_across_contrasts(coins):
    c = _centre(coins.shape)
    truth = Transform.from_rotation(7.0, center=c, shift=(-3.0, 5.0))
    moving = _warp_by_truth(coins, truth).astype(np.float32)
    pts = grid_points(coins.shape)
    r = register(coins, moving, method="intensity", transform="rigid", seed=0, warp=False,
                 score=False)
    assert r.info["polish"]["accepted"]
    assert tre_against_truth(r.transform, truth, pts)["mean"] < 2e-3
    folded = (np.abs(moving - 0.45) * 2).astype(np.float32)
    r2 = register(coins, folded, method="intensity", transform="rigid", seed=0, warp=False,
                  score=False)
    assert not r2.info["polish"]["accepted"]
    r3 = register(coins, moving, method="intensity", transform="rigid", seed=0, warp=False,
                  score=False, polish=False)
    assert "polish" not in r3.info
