"""The last least-squares fit of `features` uses the inliers that agree best with the
consensus model: right-but-imprecise matches (within the RANSAC threshold) no longer pull
the estimate, and few or perfect points leave the model as it was."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration.backends import features

pytest.importorskip("cv2")


def _similarity(angle_deg=7.0, scale=1.06, shift=(12.0, -5.0)):
    a = np.deg2rad(angle_deg)
    m = np.eye(3)
    m[:2, :2] = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m[:2, 2] = shift
    return m


def _matches(truth, n_precise=400, n_rough=150, n_wrong=100, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 500, (n_precise + n_rough + n_wrong, 2))
    dst = features._project(truth, src)
    dst[:n_precise] += rng.normal(0, 0.2, (n_precise, 2))
    # right but imprecise: 1.5-2.8 px off in any direction, inside the 3 px RANSAC
    # threshold (keypoints from a coarse pyramid level)
    rough = slice(n_precise, n_precise + n_rough)
    angle = rng.uniform(0, 2 * np.pi, n_rough)
    dst[rough] += rng.uniform(1.5, 2.8, (n_rough, 1)) * np.c_[np.cos(angle), np.sin(angle)]
    dst[n_precise + n_rough:] = rng.uniform(0, 500, (n_wrong, 2))  # outliers
    return src, dst


def _err(m, truth):
    pts = np.array([[0, 0], [500, 0], [0, 500], [500, 500], [250, 250.0]])
    return float(np.abs(features._project(m, pts) - features._project(truth, pts)).max())


@pytest.mark.parametrize("transform", ["similarity", "affine", "homography", "translation"])
def test_tight_refit_ignores_imprecise_inliers(transform):
    truth = _similarity() if transform != "translation" else _similarity(0.0, 1.0)
    src, dst = _matches(truth)
    m, inl, _ = features.fit(src, dst, transform, threshold=3.0, seed=1)
    assert inl.sum() >= 500  # precise and rough ones are both inliers
    plain = features._refit(src[inl], dst[inl], transform)
    assert _err(m, truth) < 0.7 * _err(plain, truth)
    assert _err(m, truth) < 0.15


def test_tight_refit_leaves_few_or_perfect_points_alone():
    truth = _similarity()
    src, dst = _matches(truth, n_precise=30, n_rough=5, n_wrong=0)
    inl = np.ones(len(src), bool)
    m0 = features._refit(src, dst, "similarity")
    np.testing.assert_array_equal(features._tight_refit(m0, src, dst, inl, "similarity"), m0)
    exact = features._project(truth, src)
    src2 = np.vstack([src] * 3)
    dst2 = np.vstack([exact] * 3)
    inl2 = np.ones(len(src2), bool)
    np.testing.assert_array_equal(features._tight_refit(truth, src2, dst2, inl2, "similarity"), truth)


def test_closed_form_2d_umeyama_equals_the_svd_solution():
    """The rigid/similarity refit writes Umeyama's SVD solution out for 2D: same matrix
    to rounding, including clouds whose best fit would be a mirror (proper rotation)."""
    rng = np.random.default_rng(11)
    for trial in range(200):
        n = int(rng.integers(2, 120))
        src = rng.normal(0, rng.uniform(1, 300), (n, 2))
        a = rng.uniform(-np.pi, np.pi)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        dst = src @ (rng.uniform(0.3, 3) * rot).T + rng.normal(0, 40, 2)
        dst += rng.normal(0, rng.uniform(0, 5), (n, 2))
        if trial % 5 == 0:
            dst[:, 0] *= -1
        for with_scale in (True, False):
            mu_s, mu_d = src.mean(0), dst.mean(0)
            u, sv, vt = np.linalg.svd((dst - mu_d).T @ (src - mu_s) / n)
            e = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
            scale = (sv * np.diag(e)).sum() / ((src - mu_s) ** 2).sum() * n if with_scale else 1.0
            want = np.eye(3)
            want[:2, :2] = scale * u @ e @ vt
            want[:2, 2] = mu_d - want[:2, :2] @ mu_s
            got = features._umeyama(src, dst, with_scale)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9 * (1 + np.abs(want).max()))
