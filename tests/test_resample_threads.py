"""The warp spread over threads gives the values of the one-thread warp, and both are
scipy's exact interpolation; the parallel helpers return results in order and re-raise
the first error."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import ndimage

from napari_registration.core import parallel
from napari_registration.core.resample import SLAB_VOXELS, resample
from napari_registration.core.transform import Transform


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32)


def _affine(ndim, seed=1):
    rng = np.random.default_rng(seed)
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += rng.uniform(-0.08, 0.08, (ndim, ndim))
    m[:ndim, ndim] = rng.uniform(-6, 6, ndim)
    return Transform(m)


CASES = [
    ((300, 410), _affine(2), 1),
    ((300, 410), _affine(2), 3),
    ((23, 70, 90), _affine(3), 1),
    ((128, 600), _affine(2, seed=5), 0),
]


@pytest.mark.parametrize("shape,transform,order", CASES)
def test_threads_do_not_change_the_values(shape, transform, order):
    image = _image(shape)
    one = resample(image, transform, shape, order=order, threads=1)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(resample(image, transform, shape, order=order,
                                              threads=threads), one)


@pytest.mark.parametrize("shape,transform,order", CASES)
def test_slabbed_warp_is_scipys_single_call(shape, transform, order):
    """Slabs change only the rounding of the sampled position (~1e-13 px): the values are
    those of one scipy call on the whole grid, to float32 rounding."""
    image = _image(shape)
    assert np.prod(shape) > SLAB_VOXELS  # several slabs
    m = np.linalg.inv(transform.matrix)
    work = ndimage.spline_filter(image, order=order, output=np.float64) if order > 1 else image
    ref = ndimage.affine_transform(work, m[:-1, :-1], offset=m[:-1, -1], order=order,
                                   mode="constant", prefilter=False, output=np.float32)
    got = resample(image, transform, shape, order=order)
    assert np.abs(got - ref).max() <= 1e-6
    assert not np.array_equal(got, np.zeros_like(got))


def test_projective_warp_threads_match_and_equal_map_coordinates():
    shape = (280, 333)
    image = _image(shape, 3)
    m = np.eye(3)
    m[:2, :2] += [[0.03, -0.05], [0.04, 0.02]]
    m[2, :2] = [2e-4, -1.5e-4]
    m[:2, 2] = [4.0, -3.0]
    transform = Transform(m)
    assert transform.is_projective
    one = resample(image, transform, shape, threads=1)
    np.testing.assert_array_equal(resample(image, transform, shape, threads=4), one)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    pts = np.stack([rows.ravel(), cols.ravel()], 1).astype(float)
    src = transform.apply_inverse(pts).T
    ref = ndimage.map_coordinates(image, src, order=1, mode="constant").reshape(shape)
    assert np.abs(one - ref).max() <= 1e-6
    cubic = resample(image, transform, shape, order=3, threads=3)
    ref3 = ndimage.map_coordinates(image, src, order=3, mode="constant").reshape(shape)
    assert np.abs(cubic - ref3).max() <= 1e-6


def test_run_all_keeps_order_runs_at_once_and_reraises():
    barrier = threading.Barrier(3, timeout=10)

    def task(i):
        barrier.wait()  # deadlocks (times out) unless all three run at the same time
        return i * i

    assert parallel.run_all([lambda i=i: task(i) for i in range(3)]) == [0, 1, 4]

    def boom():
        raise ValueError("second")

    with pytest.raises(ValueError, match="second"):
        parallel.run_all([lambda: 1, boom, lambda: 3])
    assert parallel.run_all([]) == []


def test_split_covers_the_range_once():
    for n, parts in ((10, 3), (3, 8), (1, 1), (512, 2)):
        pieces = parallel.split(n, parts)
        assert pieces[0][0] == 0 and pieces[-1][1] == n
        assert all(a < b for a, b in pieces)
        assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:]))
        assert len(pieces) == min(n, parts)
    assert parallel.n_workers(3) == 3 and parallel.n_workers(0) >= 1
