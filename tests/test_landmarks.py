"""Landmark registration: exact recovery, noise against theory, TPS, errors, origins."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_registration import Transform, available_methods, load_transform, register, save_transform
from napari_registration.backends.landmarks import fit_landmarks, umeyama
from napari_registration.core.tps import TpsStep


def _rotation3d(angles_deg):
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _truth(kind, ndim, rng):
    m = np.eye(ndim + 1)
    if ndim == 2:
        a = np.deg2rad(37.0)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    else:
        rot = _rotation3d([20.0, -35.0, 50.0])
    if kind == "translation":
        lin = np.eye(ndim)
    elif kind == "rigid":
        lin = rot
    elif kind == "similarity":
        lin = 1.3 * rot
    else:  # affine
        lin = rot @ np.diag(np.linspace(0.8, 1.4, ndim)) + 0.15 * rng.standard_normal((ndim, ndim))
    m[:ndim, :ndim] = lin
    m[:ndim, ndim] = rng.uniform(-30, 30, ndim)
    return Transform(m)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
def test_noise_free_points_recover_the_transform_exactly(kind, ndim):
    rng = np.random.default_rng(1)
    truth = _truth(kind, ndim, rng)
    moving = rng.uniform(0, 200, (8, ndim))
    fixed = truth.apply(moving)
    est, info = fit_landmarks(fixed, moving, kind)
    np.testing.assert_allclose(est.matrix, truth.matrix, atol=1e-9)
    assert info["fre_max"] < 1e-9
    assert len(info["residuals"]) == 8 and len(info["loo_errors"]) == 8
    assert np.nanmax(info["loo_errors"]) < 1e-8  # exact model: every pair predicted by the rest


def test_rigid_never_returns_a_reflection():
    rng = np.random.default_rng(2)
    moving = rng.uniform(0, 100, (6, 2))
    fixed = moving * np.array([1.0, -1.0])  # a mirror image: no rotation explains it
    m = umeyama(moving, fixed, with_scale=False)
    assert np.linalg.det(m[:2, :2]) > 0
    np.testing.assert_allclose(m[:2, :2] @ m[:2, :2].T, np.eye(2), atol=1e-12)


def test_minimal_point_counts_are_enough():
    rng = np.random.default_rng(3)
    for kind, ndim, n in [("translation", 2, 1), ("rigid", 2, 2), ("similarity", 2, 2),
                          ("affine", 2, 3), ("rigid", 3, 3), ("affine", 3, 4)]:
        truth = _truth(kind, ndim, rng)
        moving = rng.uniform(0, 100, (n, ndim))
        est, _ = fit_landmarks(truth.apply(moving), moving, kind)
        np.testing.assert_allclose(est.matrix, truth.matrix, atol=1e-8, err_msg=f"{kind} {ndim}D")


# ---------------------------------------------------------------- noisy clicks vs theory
def test_translation_tre_matches_sigma_sqrt_d_over_n():
    """Mean offset of N noisy pairs: the error is the mean of the click noise, so
    E|err|^2 = D * sigma_pair^2 / N, with sigma_pair^2 = 2 sigma^2 (both clicks noisy)."""
    rng = np.random.default_rng(4)
    sigma, n, d, trials = 1.5, 10, 2, 2000
    truth = Transform.from_translation([12.0, -7.0])
    moving = rng.uniform(0, 500, (n, d))
    sq = []
    for _ in range(trials):
        mc = moving + rng.normal(0, sigma, moving.shape)
        fc = truth.apply(moving) + rng.normal(0, sigma, moving.shape)
        est, _ = fit_landmarks(fc, mc, "translation", leave_one_out=False)
        sq.append(np.sum((est.matrix[:d, d] - truth.matrix[:d, d]) ** 2))
    expected = d * 2 * sigma ** 2 / n
    # 2000 trials of a chi-square with 2 dof: the mean is within ~5% (3 sd)
    assert abs(np.mean(sq) / expected - 1) < 0.07


def test_rigid_tre_matches_fitzpatrick_prediction():
    """2D rigid: E TRE^2(r) = FLE^2/N * (1 + d^2 / (2 f^2)) (Fitzpatrick et al. 1998, in
    2D), with d the target's distance from the landmarks' centroid, f^2 their mean
    squared distance from it, FLE^2 = 2 sigma_pair^2."""
    rng = np.random.default_rng(5)
    sigma, n, trials = 1.0, 8, 1500
    truth = Transform.from_rotation(25.0, center=(100, 100), shift=(5, -3))
    moving = rng.uniform(20, 180, (n, 2))
    centroid = moving.mean(axis=0)
    f2 = np.mean(np.sum((moving - centroid) ** 2, axis=1))
    targets = centroid + np.array([[0.0, 0.0], [150.0, 0.0], [0.0, -300.0]])
    sq = np.zeros(len(targets))
    for _ in range(trials):
        mc = moving + rng.normal(0, sigma, moving.shape)
        fc = truth.apply(moving) + rng.normal(0, sigma, moving.shape)
        est, _ = fit_landmarks(fc, mc, "rigid", leave_one_out=False)
        sq += np.sum((est.apply(targets) - truth.apply(targets)) ** 2, axis=1)
    sq /= trials
    sigma_pair2 = 2 * sigma ** 2
    fle2 = 2 * sigma_pair2
    d2 = np.sum((targets - centroid) ** 2, axis=1)
    expected = fle2 / n * (1 + d2 / (2 * f2))
    np.testing.assert_allclose(sq, expected, rtol=0.1)
    # and the fiducial residuals: E FRE^2 = (1 - p/(N D)) FLE^2 with p = 3 parameters
    rss = []
    for _ in range(300):
        fc = truth.apply(moving) + rng.normal(0, sigma * np.sqrt(2), moving.shape)
        _, info = fit_landmarks(fc, moving, "rigid", leave_one_out=False)
        rss.append(info["fre_rms"] ** 2)
    np.testing.assert_allclose(np.mean(rss), (1 - 3 / (2 * n)) * fle2, rtol=0.1)


def test_affine_tre_matches_least_squares_leverage():
    """Affine least squares with noise sigma on the fixed clicks: the prediction error at
    x has covariance sigma^2 h(x) I with h(x) = [x 1] (X^T X)^-1 [x 1]^T (exact)."""
    rng = np.random.default_rng(6)
    sigma, n, trials = 2.0, 6, 2000
    truth = _truth("affine", 3, rng)
    moving = rng.uniform(0, 100, (n, 3))
    design = np.hstack([moving, np.ones((n, 1))])
    targets = np.array([[50.0, 50.0, 50.0], [150.0, -20.0, 80.0]])
    th = np.hstack([targets, np.ones((2, 1))])
    h = np.einsum("ij,jk,ik->i", th, np.linalg.inv(design.T @ design), th)
    sq = np.zeros(2)
    for _ in range(trials):
        fc = truth.apply(moving) + rng.normal(0, sigma, moving.shape)
        est, _ = fit_landmarks(fc, moving, "affine", leave_one_out=False)
        sq += np.sum((est.apply(targets) - truth.apply(targets)) ** 2, axis=1)
    np.testing.assert_allclose(sq / trials, 3 * sigma ** 2 * h, rtol=0.08)


# --------------------------------------------------------------------------------- TPS
@pytest.mark.parametrize("ndim", [2, 3])
def test_tps_interpolates_its_landmarks_and_inverts(ndim):
    rng = np.random.default_rng(7)
    moving = rng.uniform(0, 100, (12, ndim))
    bend = 4.0 * np.sin(moving[:, ::-1] / 15.0)
    fixed = moving * 1.1 + 5.0 + bend
    est, info = fit_landmarks(fixed, moving, "tps")
    assert not est.is_linear and est.kind == "tps"
    np.testing.assert_allclose(est.apply(moving), fixed, atol=1e-8)
    assert info["fre_max"] < 1e-8
    assert np.all(np.isfinite(info["loo_errors"])) and info["tre_loo_mean"] > 0.01
    # the inverse maps the fixed landmarks back, and round-trips arbitrary points
    np.testing.assert_allclose(est.apply_inverse(fixed), moving, atol=1e-6)
    grid = rng.uniform(0, 100, (500, ndim))
    np.testing.assert_allclose(est.apply(est.apply_inverse(grid)), grid, atol=1e-6)
    np.testing.assert_allclose(est.inverse().apply(fixed), moving, atol=1e-6)


def test_tps_of_affine_points_is_that_affine():
    rng = np.random.default_rng(8)
    truth = _truth("affine", 2, rng)
    moving = rng.uniform(0, 100, (10, 2))
    est, _ = fit_landmarks(truth.apply(moving), moving, "tps")
    pts = rng.uniform(-50, 150, (200, 2))
    np.testing.assert_allclose(est.apply(pts), truth.apply(pts), atol=1e-7)
    assert est.steps[0].bending_energy() < 1e-12


def test_tps_regularization_smooths_instead_of_interpolating():
    rng = np.random.default_rng(9)
    moving = rng.uniform(0, 100, (15, 2))
    fixed = moving + rng.normal(0, 2.0, moving.shape)
    exact, _ = fit_landmarks(fixed, moving, "tps")
    smooth, info = fit_landmarks(fixed, moving, "tps", regularization=10.0)
    assert info["fre_max"] > 0.1
    assert smooth.steps[0].bending_energy() < exact.steps[0].bending_energy()


def test_tps_json_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    moving = rng.uniform(0, 100, (9, 3))
    fixed = moving + 3 * np.cos(moving / 20.0)
    est, _ = fit_landmarks(fixed, moving, "tps")
    full = Transform.from_translation([1.0, 2.0, 3.0]).then(est)  # a chain, as register makes
    path = save_transform(full, tmp_path / "tps.json")
    back = load_transform(path)
    assert back == full
    pts = rng.uniform(0, 100, (50, 3))
    np.testing.assert_array_equal(back.apply(pts), full.apply(pts))
    np.testing.assert_allclose(back.apply_inverse(pts), full.apply_inverse(pts), atol=1e-9)
    # and JSON of a bare dict works in a fresh interpreter (lazy step import)
    import subprocess
    import sys

    code = ("import json,sys;from napari_registration import Transform;"
            "t=Transform.from_dict(json.load(open(sys.argv[1])));print(t.kind)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tps" in out.stdout
    assert json.loads(path.read_text())["steps"][1]["kind"] == "tps"


def test_tps_step_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        TpsStep(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="paired"):
        TpsStep(np.zeros((4, 2)), np.zeros((5, 2)))
    line = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    with pytest.raises(ValueError, match="singular.*one line"):
        TpsStep(line, line + 1.0)


# ------------------------------------------------------------------------------ errors
def test_clear_errors():
    good = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    with pytest.raises(ValueError, match="at least 3 landmark pairs"):
        fit_landmarks(good[:2], good[:2], "affine")
    with pytest.raises(ValueError, match="4 fixed and 3 moving"):
        fit_landmarks(good, good[:3], "rigid")
    nan = good.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf coordinates at pair\(s\) \[2\]"):
        fit_landmarks(nan, good, "affine")
    line = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    with pytest.raises(ValueError, match="collinear"):
        fit_landmarks(line, good, "affine")
    with pytest.raises(ValueError, match="collinear"):
        fit_landmarks(good, line, "tps")
    with pytest.raises(ValueError, match="same place"):
        fit_landmarks(np.ones((3, 2)), good[:3], "rigid")
    plane = np.array([[0, 0, 0], [0, 5, 0], [0, 0, 5], [0, 5, 5], [0, 2, 7]], float)
    vol = np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5], [3, 3, 3]], float)
    with pytest.raises(ValueError, match="coplanar"):
        fit_landmarks(vol, plane, "affine")
    dup = vol.copy()
    dup[4] = dup[1]
    with pytest.raises(ValueError, match="same position"):
        fit_landmarks(vol, dup, "tps")
    with pytest.raises(ValueError, match="cannot fit transform 'homography'"):
        fit_landmarks(good, good, "homography")
    with pytest.raises(ValueError, match=r"shape \(N, 2\) or \(N, 3\)"):
        fit_landmarks(good[:, :1], good[:, :1], "translation")


# --------------------------------------------------------------- through register()
def test_register_landmarks_with_origins_and_spacing():
    """Points are full world coordinates; the core removes origins before the backend
    and composes them back, so the result is the world transform that made the data."""
    from napari_registration.data import tre_against_truth

    fixed, moving, truth = _camera_pair()
    f_or, m_or = np.array([10.0, -20.0]), np.array([-5.0, 7.5])
    world_truth = (Transform.from_translation(-m_or).then(truth)
                   .then(Transform.from_translation(f_or)))
    rng = np.random.default_rng(11)
    m_pts = rng.uniform(20, 230, (6, 2)) + m_or
    f_pts = world_truth.apply(m_pts)
    res = register(fixed, moving, method="landmarks", transform="similarity",
                   fixed_points=f_pts, moving_points=m_pts, fixed_origin=f_or, moving_origin=m_or)
    np.testing.assert_allclose(res.transform.matrix, world_truth.matrix, atol=1e-8)
    assert res.info["fre_max"] < 1e-8 and res.info["n_points"] == 6
    np.testing.assert_allclose(res.extras["fixed_points"], f_pts)
    np.testing.assert_allclose(res.extras["moving_points"], m_pts)
    np.testing.assert_allclose(res.extras["fixed_mapped_points"], f_pts, atol=1e-8)
    assert res.metrics["after"]["ncc"] > 0.95 > res.metrics["before"]["ncc"]
    grid = np.random.default_rng(0).uniform(0, 255, (50, 2)) + f_or
    assert tre_against_truth(res.transform, world_truth, grid)["max"] < 1e-6


def test_register_tps_warps_and_scores():
    fixed, moving, truth = _camera_pair()
    rng = np.random.default_rng(12)
    m_pts = rng.uniform(10, 245, (10, 2))
    res = register(fixed, moving, method="landmarks", transform="tps",
                   fixed_points=truth.apply(m_pts), moving_points=m_pts)
    assert "tps" in res.transform.kind and res.transform.matrix is None
    assert res.warped.shape == fixed.shape
    assert res.metrics["after"]["ncc"] > 0.95
    json.dumps(res.to_dict())


def test_register_landmarks_3d_anisotropic():
    from napari_registration.data import grid_points, tre_against_truth, volume_pair

    fixed, moving, truth, spacing = volume_pair()
    rng = np.random.default_rng(14)
    m_pts = rng.uniform(0.1, 0.9, (5, 3)) * (np.array(moving.shape) - 1) * spacing  # world
    res = register(fixed, moving, method="landmarks", transform="rigid",
                   fixed_points=truth.apply(m_pts), moving_points=m_pts,
                   fixed_spacing=spacing, moving_spacing=spacing)
    assert tre_against_truth(res.transform, truth, grid_points(fixed.shape, spacing))["max"] < 1e-8
    assert res.metrics["after"]["ncc"] > res.metrics["before"]["ncc"]


def test_register_landmarks_needs_points():
    fixed, moving, _ = _camera_pair()
    with pytest.raises(ValueError, match="needs fixed_points and moving_points"):
        register(fixed, moving, method="landmarks", transform="rigid")
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        register(fixed, moving, method="landmarks", transform="rigid",
                 fixed_points=np.zeros((3, 3)), moving_points=np.zeros((3, 3)))


def _camera_pair():
    from skimage import data, transform as sktf

    fixed = sktf.rescale(data.camera().astype(np.float32) / 255, 0.5, anti_aliasing=True)
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(12.0, center=centre, scale=1.1, shift=(4.0, -6.0))
    from napari_registration.data import _warp_by_truth

    return fixed.astype(np.float32), _warp_by_truth(fixed, truth).astype(np.float32), truth


@pytest.mark.skipif("intensity" not in available_methods(), reason="intensity backend not installed")
def test_landmarks_then_intensity_refinement():
    """Landmark-guided refinement: a rough landmark fit (noisy clicks) as init for the
    intensity method ends closer to the truth than the landmarks alone."""
    from napari_registration.data import grid_points, tre_against_truth

    fixed, moving, truth = _camera_pair()
    rng = np.random.default_rng(13)
    m_pts = rng.uniform(30, 220, (4, 2))
    f_pts = truth.apply(m_pts) + rng.normal(0, 2.0, m_pts.shape)
    rough = register(fixed, moving, method="landmarks", transform="similarity",
                     fixed_points=f_pts, moving_points=m_pts)
    refined = register(fixed, moving, method="intensity", transform="similarity",
                       init=rough.transform)
    pts = grid_points(fixed.shape)
    tre_rough = tre_against_truth(rough.transform, truth, pts)["mean"]
    tre_refined = tre_against_truth(refined.transform, truth, pts)["mean"]
    assert tre_rough > 0.5
    assert tre_refined < 0.5 * tre_rough
