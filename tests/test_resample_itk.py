"""Linear (order 1) warps of float images go through ITK's resampler: the values are
scipy's exact interpolation to float rounding, the footprint is scipy's (points within
``0 <= coordinate <= n - 1``), and maps that send pixels exactly onto pixels (90-degree
rotations, flips, axis swaps, whole-pixel shifts) keep every edge row that scipy's
rounded coordinates dropped."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_registration.core import resample as rs
from napari_registration.core.transform import Transform


def _scipy(image, transform, shape, monkeypatch, **kw):
    """The same call on the scipy path (the ITK path switched off by its size limit)."""
    with monkeypatch.context() as m:
        m.setattr(rs, "ITK_MAX_VOXELS", 0)
        return rs.resample(image, transform, shape, **kw)


def _random_affine(rng, ndim):
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += rng.normal(0, 0.1, (ndim, ndim))
    m[:ndim, ndim] = rng.normal(0, 8 if ndim == 2 else 2, ndim)
    return Transform(m)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_itk_warp_is_scipys_to_rounding(ndim, dtype, monkeypatch):
    rng = np.random.default_rng(ndim)
    non_empty = 0
    for trial in range(12):
        size = 200 if ndim == 2 else 40
        in_shape = tuple(int(v) for v in rng.integers(size // 3, size, ndim))
        out_shape = tuple(int(v) for v in rng.integers(size // 3, size, ndim))
        image = rng.random(in_shape).astype(dtype)
        before = image.copy()
        t = _random_affine(rng, ndim)
        geo = {}
        if trial % 3 == 1:
            geo = dict(input_spacing=rng.uniform(0.5, 2, ndim), output_spacing=rng.uniform(0.5, 2, ndim),
                       input_origin=rng.normal(0, 3, ndim), output_origin=rng.normal(0, 3, ndim))
        cval = [0.0, -1.0, 7.5][trial % 3]
        got = rs.resample(image, t, out_shape, cval=cval, **geo)
        ref = _scipy(image, t, out_shape, monkeypatch, cval=cval, **geo)
        assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
        np.testing.assert_array_equal(image, before)
        np.testing.assert_array_equal(got == cval, ref == cval)  # the same footprint
        if dtype == np.float32:
            np.testing.assert_array_max_ulp(got, ref, maxulp=1)
        else:
            assert np.abs(got - ref).max() <= 1e-12
        non_empty += bool((got != cval).any())
    assert non_empty >= 10


def test_itk_warp_integer_input_and_views(monkeypatch):
    rng = np.random.default_rng(3)
    image = (ndimage.gaussian_filter(rng.random((300, 260)), 2) * 60000).astype(np.uint16)
    t = _random_affine(rng, 2)
    got = rs.resample(image, t, (280, 310))
    ref = _scipy(image, t, (280, 310), monkeypatch)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, ref)
    view = image.astype(np.float32)[::2, 1::3]  # strided: copied for ITK, not modified
    np.testing.assert_array_max_ulp(rs.resample(view, t, (150, 90)),
                                    _scipy(view, t, (150, 90), monkeypatch), maxulp=1)
    one = rs.resample(view, t, (150, 90), threads=1)
    np.testing.assert_array_equal(one, rs.resample(view, t, (150, 90), threads=3))


def _exact_pullback(image, m, out_shape):
    """Reference for maps that send output pixels onto input pixels: an index lookup."""
    d = image.ndim
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in out_shape], indexing="ij"), -1).reshape(-1, d)
    src = np.rint(idx @ m[:d, :d].T + m[:d, d]).astype(int)
    ok = np.all((src >= 0) & (src < np.array(image.shape)), axis=1)
    out = np.zeros(len(idx), image.dtype)
    out[ok] = image[tuple(src[ok].T)]
    return out.reshape(out_shape)


def test_pixel_to_pixel_maps_keep_every_edge_row(monkeypatch):
    rng = np.random.default_rng(5)
    lost_by_scipy = 0
    for trial in range(40):
        d = 2 if trial % 2 else 3
        in_shape = tuple(int(v) for v in rng.integers(5, 90 if d == 2 else 25, d))
        out_shape = tuple(int(v) for v in rng.integers(5, 90 if d == 2 else 25, d))
        if d == 2:
            th = np.pi / 2 * rng.integers(4)  # cos/sin leave ~1e-16 off the exact values
            lin = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        else:
            lin = np.eye(3)[rng.permutation(3)]
        lin = lin * rng.choice([1, -1], d)[:, None]
        m = np.eye(d + 1)
        m[:d, :d] = lin
        m[:d, d] = rng.integers(-10, 10, d)
        t = Transform(m)
        image = (rng.random(in_shape) + 1).astype(np.float32)  # never 0 inside
        expect = _exact_pullback(image, np.linalg.inv(m), out_shape)
        np.testing.assert_array_equal(rs.resample(image, t, out_shape), expect)
        lost_by_scipy += int(np.sum(_scipy(image, t, out_shape, monkeypatch) != expect))
    assert lost_by_scipy > 0  # the case this guards: scipy's rounded test drops edge pixels


def test_points_just_outside_stay_outside(monkeypatch):
    """A shift 3e-7 px past a whole pixel leaves the edge row outside, as on scipy's
    path and in register_stack's own translation warp."""
    image = np.arange(1.0, 1 + 20 * 30, dtype=np.float32).reshape(20, 30)
    t = Transform.from_translation((2.0000003, 0.0))
    got = rs.resample(image, t, image.shape)
    ref = _scipy(image, t, image.shape, monkeypatch)
    np.testing.assert_array_equal(got == 0, ref == 0)
    assert (got[:3] == 0).all() and (got[3] != 0).all()  # row 2 samples row -3e-7


def test_large_inputs_and_other_orders_keep_scipy(monkeypatch):
    calls = []
    real = rs._itk_linear
    monkeypatch.setattr(rs, "_itk_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    t = Transform.from_rotation(10.0, center=(32, 32))
    rs.resample(image, t, (64, 64))
    assert calls == [1]
    rs.resample(image, t, (64, 64), order=3)
    rs.resample(image, t, (64, 64), labels=True)
    rs.resample(image, Transform(np.array([[1, 0, 0], [0, 1, 0], [1e-4, 0, 1.0]])), (64, 64))
    monkeypatch.setattr(rs, "ITK_MAX_VOXELS", 64 * 64 - 1)
    rs.resample(image, t, (64, 64))
    assert calls == [1]


def test_overlap_mask_solved_per_row_is_the_warped_ones(monkeypatch):
    """The row-by-row overlap mask is the footprint of a nearest-neighbour warp of ones
    (what it was computed as before), and that of the linear warp."""
    rng = np.random.default_rng(11)
    for trial in range(16):
        d = 2 if trial % 2 else 3
        size = 150 if d == 2 else 36
        in_shape = tuple(int(v) for v in rng.integers(size // 3, size, d))
        out_shape = tuple(int(v) for v in rng.integers(size // 3, size, d))
        t = _random_affine(rng, d)
        geo = {}
        if trial % 4 == 1:
            geo = dict(input_spacing=rng.uniform(0.5, 2, d), output_spacing=rng.uniform(0.5, 2, d),
                       input_origin=rng.normal(0, 3, d), output_origin=rng.normal(0, 3, d))
        mask = rs.overlap_mask(in_shape, t, out_shape, **geo)
        ones = rs.resample(np.ones(in_shape, np.uint8), t, out_shape, labels=True, **geo)
        assert mask.dtype == bool and mask.shape == out_shape
        np.testing.assert_array_equal(mask, ones.astype(bool))
        warped = rs.resample(rng.random(in_shape).astype(np.float32) + 1, t, out_shape, **geo)
        np.testing.assert_array_equal(mask, warped != 0)
    # a projective map still warps ones
    h = Transform(np.array([[1.0, 0.02, 3.0], [0.01, 1.0, -2.0], [1e-4, -2e-4, 1.0]]))
    ones = rs.resample(np.ones((60, 70), np.uint8), h, (64, 66), labels=True).astype(bool)
    np.testing.assert_array_equal(rs.overlap_mask((60, 70), h, (64, 66)), ones)
