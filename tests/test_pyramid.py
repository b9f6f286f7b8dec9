"""Register coarse, apply fine: pyramids, the pixel budget, tile refinement, lazy warps."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest

from napari_registration import Transform, register
from napari_registration.bigdata import lazy_scene, slide_pair
from napari_registration.core.pyramid import as_levels, choose_level


def _tre(transform, truth, size):
    n = size - 1
    pts = np.array([[0, 0], [0, n], [n, 0], [n, n], [n / 2, n / 2]], float)
    return float(np.max(np.linalg.norm(transform.apply(pts) - truth.apply(pts), axis=1)))


@pytest.fixture(scope="module")
def pair():
    return slide_pair(2048, angle=2.5, shift=(31.7, -18.3), levels=4, chunks=512)


def test_levels_spacing_origin_and_budget():
    image = np.zeros((1000, 600), np.float32)
    levels = as_levels(image, spacing=(0.5, 0.25), origin=(10.0, 0.0), budget=200)
    assert [lev.shape for lev in levels] == [(1000, 600), (500, 300), (250, 150), (125, 75)]
    np.testing.assert_allclose(levels[2].spacing, (2.0, 1.0))
    # a level-k pixel sits at the centre of the level-0 block it averages
    np.testing.assert_allclose(levels[2].origin, (10.0 + 1.5 * 0.5, 1.5 * 0.25))
    assert choose_level(levels, 200) == 3
    assert choose_level(levels, 600) == 1
    # a given pyramid keeps its levels; factors come from the shapes
    given = as_levels([image, image[::4, ::4]], budget=200)
    assert len(given) == 2 and tuple(given[1].factor) == (4.0, 4.0)
    with pytest.raises(ValueError, match="fine to coarse"):
        as_levels([image[::2, ::2], image])


def test_block_average_levels_match_the_origin_convention():
    # a smooth ramp: the mean of each 4x4 block equals the ramp at the block's centre,
    # which is where as_levels says level 2's pixel sits
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    ramp = 3 * yy + 2 * xx
    lev = as_levels(da.from_array(ramp, chunks=64), budget=64)[2]
    coarse = np.asarray(lev.data)
    iy, ix = np.mgrid[0:lev.shape[0], 0:lev.shape[1]]
    world = np.stack([iy * lev.spacing[0] + lev.origin[0], ix * lev.spacing[1] + lev.origin[1]])
    np.testing.assert_allclose(coarse, 3 * world[0] + 2 * world[1], rtol=1e-5)


def test_register_pyramid_recovers_full_resolution_motion(pair):
    fixed, moving, truth = pair
    result = register(fixed, moving, method="fourier", transform="rigid", pixel_budget=300)
    pyr = result.info["pyramid"]
    assert pyr["fixed_level"] == 3 and pyr["moving_level"] == 3  # 256^2 fits 300, 512^2 not
    assert pyr["refinements"] and pyr["refinements"][-1]["level"] == 0
    assert pyr["refinements"][-1]["tiles_used"] >= 3
    coarse = Transform.from_dict(pyr["coarse_transform"])
    assert _tre(result.transform, truth, 2048) < 0.5
    assert _tre(result.transform, truth, 2048) <= _tre(coarse, truth, 2048) + 0.05
    # the warped result: one lazy array per fixed level, each on that level's grid
    assert isinstance(result.warped, list) and len(result.warped) == 4
    for w, f in zip(result.warped, fixed):
        assert isinstance(w, da.Array) and w.shape == f.shape and w.dtype == np.uint8
    level2 = np.asarray(result.warped[2][100:400, 100:400]).astype(float)
    ref = np.asarray(fixed[2][100:400, 100:400]).astype(float)
    assert np.abs(level2 - ref).mean() < 3.0  # aligned: grey levels agree to ~1 %
    assert result.fixed_shape == (2048, 2048)


class _Recorder:
    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.largest = 0
        self.lock = threading.Lock()

    def __getitem__(self, key):
        out = self.array[key]
        with self.lock:
            self.largest = max(self.largest, out.size)
        return out


def test_dask_level0_only_builds_levels_lazily_and_never_reads_it_whole(pair):
    fixed, moving, truth = pair
    f0 = _Recorder(np.asarray(fixed[1]))  # 1024^2 RGB, as if it were a big file
    m0 = _Recorder(np.asarray(moving[1]))
    f_d = da.from_array(f0, chunks=(256, 256, 3), asarray=True)
    m_d = da.from_array(m0, chunks=(256, 256, 3), asarray=True)
    result = register(f_d, m_d, method="fourier", transform="rigid", pixel_budget=256,
                      fixed_spacing=(2, 2), moving_spacing=(2, 2),
                      fixed_origin=(0.5, 0.5), moving_origin=(0.5, 0.5))
    assert result.info["pyramid"]["fixed_level"] == 2
    assert f0.largest <= 256 * 256 * 3 and m0.largest <= 256 * 256 * 3
    assert _tre(result.transform, truth, 2048) < 1.0  # level-1 data, level-0 world units
    assert isinstance(result.warped, da.Array) and result.warped.shape == f_d.shape


def test_numpy_with_and_without_budget(pair):
    fixed, moving, truth = pair
    f, m = np.asarray(fixed[2]), np.asarray(moving[2])  # 512^2
    plain = register(f, m, method="fourier", transform="rigid")
    assert isinstance(plain.warped, np.ndarray) and "pyramid" not in plain.info
    coarse = register(f, m, method="fourier", transform="rigid", pixel_budget=128)
    assert coarse.info["pyramid"]["fixed_level"] == 2
    assert isinstance(coarse.warped, da.Array)
    np.testing.assert_allclose(coarse.transform.matrix, plain.transform.matrix, atol=0.05)
    # a mask given at level 0 is sampled onto the estimation level
    mask = np.ones(f.shape[:2], bool)
    masked = register(f, m, method="intensity", transform="rigid", pixel_budget=128,
                      fixed_mask=mask, pyramid_refine=None)
    assert masked.info["masks"]["fixed"]


def test_pyramid_options_leave_backend_options_alone(pair):
    fixed, moving, _ = pair
    # `auto` has a `refine` option of its own: it must reach the backend, numpy or pyramid
    f, m = np.asarray(fixed[3]), np.asarray(moving[3])
    r = register(f, m, method="auto", transform="rigid", refine=False, use_features=False)
    assert r.info["method"] == "auto"
    r = register(fixed, moving, method="auto", transform="rigid", refine=False,
                 use_features=False, pixel_budget=300, pyramid_refine=None)
    assert r.info["pyramid"]["refinements"] == []


def test_bad_pyramid_options(pair):
    fixed, moving, _ = pair
    with pytest.raises(ValueError, match="pixel_budget"):
        register(fixed, moving, pixel_budget=3)
    with pytest.raises(ValueError, match="pyramid_refine must be"):
        register(fixed, moving, pyramid_refine="yes")
    with pytest.raises(ValueError, match="applies to pyramids"):
        register(np.asarray(fixed[3]), np.asarray(moving[3]), refine_tile=64)
    with pytest.raises(ValueError, match="fine to coarse"):
        register(fixed[::-1], moving)
    with pytest.raises(ValueError, match="dtype"):
        register([np.zeros((64, 64), complex)], moving)


def test_3d_volume_dask(pair):
    rng = np.random.default_rng(3)
    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.random((40, 40, 40)).astype(np.float32), 1.5)
    texture = ((texture - texture.min()) / np.ptp(texture) * 4000).astype(np.uint16)
    truth = Transform.from_translation((3.4, -5.2, 2.6))
    shape = (96, 128, 128)
    f = lazy_scene(texture, shape, magnify=3.0, chunks=64)
    m = lazy_scene(texture, shape, magnify=3.0, transform=truth, chunks=64)
    result = register(f, m, method="fourier", transform="translation", pixel_budget=200)
    assert result.info["pyramid"]["fixed_level"] == 2  # 24x32x32 voxels <= 200^2
    assert result.info["pyramid"]["refinements"][-1]["tiles_used"] >= 4  # 3D tiles at level 0
    np.testing.assert_allclose(result.transform.matrix[:3, 3], (3.4, -5.2, 2.6), atol=0.3)
    assert result.warped.dtype == np.uint16 and result.warped.shape == shape


def test_napari_multiscale_data_is_a_pyramid(pair):
    pytest.importorskip("napari")
    from napari.layers._multiscale_data import MultiScaleData

    from napari_registration.core.pyramid import is_pyramid

    fixed, moving, truth = pair
    data = MultiScaleData(fixed)
    assert is_pyramid(data) and not is_pyramid(np.zeros((4, 4))) and not is_pyramid(fixed[0])
    levels = as_levels(data, rgb=True)
    assert [lev.shape for lev in levels] == [f.shape[:2] for f in fixed]


def test_tiles_that_disagree_do_not_replace_the_estimate(pair, monkeypatch):
    import napari_registration.core.pyramid as pyramid

    fixed, moving, truth = pair
    rng = np.random.default_rng(0)
    monkeypatch.setattr(pyramid, "_tile_shift",
                        lambda f, w, spacing, origin: rng.normal(0, 3, 2) * spacing)
    result = register(fixed, moving, method="fourier", transform="rigid", pixel_budget=300)
    step = result.info["pyramid"]["refinements"][-1]
    assert "tiles disagree" in step["skipped"]
    coarse = Transform.from_dict(result.info["pyramid"]["coarse_transform"])
    np.testing.assert_allclose(result.transform.matrix, coarse.matrix)
