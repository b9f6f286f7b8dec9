"""The faster paths of core.refine give the numbers of the straightforward ones: the
spline gradient gathered at the samples, the one-selection median, the interpolation
and prefilters split over threads (issue #15, round 5), and the coarse search of the
intensity backend on threads."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import napari_registration.core.refine as refine
from napari_registration.core.transform import Transform
from napari_registration.data import _warp_by_truth


def test_spline_gradient_at_samples_matches_the_full_image_filters():
    rng = np.random.default_rng(3)
    img = rng.random((41, 57)).astype(np.float32)
    c = ndimage.spline_filter(img.astype(np.float64), order=3, mode="mirror")
    full = refine.spline_gradient_from_coefficients(c)
    inner = np.zeros(img.shape, bool)
    inner[1:-1, 1:-1] = True
    idx = np.flatnonzero(inner)[::3]
    got = refine._spline_gradient_at(img, idx)
    for axis in range(2):
        np.testing.assert_allclose(got[:, axis], full[axis].ravel()[idx], rtol=0, atol=1e-12)
    # border pixels take the full-image path (mirror boundary): the same numbers
    every = np.arange(img.size)
    got = refine._spline_gradient_at(img, every, coeffs=c)
    for axis in range(2):
        np.testing.assert_array_equal(got[:, axis], full[axis].ravel())


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 1000, 1001])
def test_median_is_numpys(n):
    a = np.random.default_rng(n).standard_normal(n)
    before = a.copy()
    assert refine._median(a) == np.median(a)
    np.testing.assert_array_equal(a, before)  # a copy is reordered, not the caller's


def test_threaded_interpolation_is_the_same_array(monkeypatch):
    rng = np.random.default_rng(0)
    c = rng.random((120, 130))
    q = rng.random((2, 3 * refine._PARALLEL_SAMPLES + 7)) * [[119.0], [129.0]]
    ref = ndimage.map_coordinates(c, q, order=3, mode="mirror", prefilter=False)
    monkeypatch.setattr(refine, "_spare_cores", lambda: True)
    monkeypatch.setattr("napari_registration.core.parallel.n_workers", lambda threads=0: 3)
    np.testing.assert_array_equal(refine._interpolate(c, q), ref)


def test_refine_linear_threads_or_not_same_result(monkeypatch):
    from skimage import data

    fixed = data.camera()[::2, ::2].astype(np.float32) / 255  # 256^2: threaded levels
    c = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_linear(np.array([[1.03, 0.04], [-0.02, 0.98]]), c, (2.5, -1.5))
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    start = Transform.from_linear(np.eye(2), c, (2.0, -1.0))
    results = []
    for spare in (False, True):
        monkeypatch.setattr(refine, "_spare_cores", lambda spare=spare: spare)
        monkeypatch.setattr(refine, "_PARALLEL_SAMPLES", 2 ** 12)
        out, info = refine.refine_linear(fixed, moving, start, model="affine")
        assert info["accepted"]
        results.append(out.matrix)
    np.testing.assert_array_equal(results[0], results[1])


def test_coarse_search_threads_or_not_same_result(monkeypatch):
    from skimage import data

    from napari_registration import register

    fixed = data.coins().astype(np.float32) / 255
    c = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(20.0, center=c, shift=(3.0, -4.0))
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    out = []
    for spare in (False, True):
        # the load-average test both the search and the refinement ask
        monkeypatch.setattr("napari_registration.core.parallel.spare_cores", lambda spare=spare: spare)
        monkeypatch.setattr("napari_registration.core.parallel.n_workers", lambda threads=0: 2)
        r = register(fixed, moving, method="intensity", transform="rigid", score=False)
        out.append((r.transform.matrix, r.info["stage"]["search"]["runs"]))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(64, 64), (67, 90)])
def test_block_mean_is_the_reshaped_mean(factor, shape):
    img = np.random.default_rng(factor).random(shape).astype(np.float32) * 1000
    n0, n1 = (shape[0] // factor) * factor, (shape[1] // factor) * factor
    ref = img[:n0, :n1].reshape(n0 // factor, factor, n1 // factor, factor).mean(
        axis=(1, 3), dtype=np.float32)
    before = img.copy()
    np.testing.assert_array_equal(refine._block_mean(img, factor), ref)
    np.testing.assert_array_equal(img, before)


def test_map_parts_keeps_the_order_and_runs_every_item():
    from napari_registration.core.parallel import map_parts

    items = list(range(11))
    for workers in (1, 2, 3, 20):
        assert map_parts(lambda x: x * x, items, workers) == [x * x for x in items]
    assert map_parts(lambda x: x, [], 4) == []
