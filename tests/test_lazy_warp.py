"""Lazy (block-wise) warps: apply_transform on a dask image returns a dask array whose
values equal the eager warp's, and each block reads only the input region it needs."""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
from skimage import data as skdata

from napari_registration import Transform, apply_transform
from napari_registration.core.resample import resample
from napari_registration.core.transform import FieldStep


@pytest.fixture(scope="module")
def camera():
    return skdata.camera()  # 512x512 uint8, a real photo


def _motion(center=(256.0, 256.0)):
    return Transform.from_rotation(11.0, center=center, scale=1.07).then(
        Transform.from_translation((17.3, -9.6)))


GEOMETRIES = [
    {},
    dict(input_spacing=(0.5, 0.5), output_spacing=(0.7, 0.6), output_origin=(3.0, -4.0),
         input_origin=(1.5, 2.0)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_lazy_equals_eager(camera, geometry, dtype):
    image = camera.astype(dtype)
    before = image.copy()
    t = _motion()
    eager = apply_transform(image, t, output_shape=(480, 530), **geometry)
    lazy = apply_transform(da.from_array(image, chunks=(100, 130)), t, output_shape=(480, 530),
                           chunks=(90, 128), **geometry)
    assert isinstance(lazy, da.Array)
    assert lazy.dtype == eager.dtype == image.dtype
    assert lazy.chunks[0][0] == 90 and lazy.chunks[1][0] == 128
    np.testing.assert_array_equal(lazy.compute(), eager)
    np.testing.assert_array_equal(image, before)


def test_lazy_labels_nearest_dtype_kept(camera):
    labels = (camera // 32).astype(np.uint16) + 1000
    t = _motion()
    eager = apply_transform(labels, t, output_shape=labels.shape, labels=True)
    lazy = apply_transform(labels, t, output_shape=labels.shape, labels=True, lazy=True,
                           chunks=100)
    assert isinstance(lazy, da.Array) and lazy.dtype == np.uint16
    out = lazy.compute()
    np.testing.assert_array_equal(out, eager)
    # nearest neighbour: no new label values appear
    assert set(np.unique(out)) <= set(np.unique(labels)) | {0}


def test_lazy_rgb_and_3d(camera):
    rgb = skdata.astronaut()
    t = _motion()
    eager = apply_transform(rgb, t, output_shape=rgb.shape[:2], rgb=True)
    lazy = apply_transform(da.from_array(rgb, chunks=(128, 128, 3)), t,
                           output_shape=rgb.shape[:2], rgb=True)
    assert lazy.shape == eager.shape
    np.testing.assert_array_equal(lazy.compute(), eager)

    rng = np.random.default_rng(1)
    vol = (rng.random((40, 50, 60)) * 4000).astype(np.uint16)
    t3 = Transform.from_linear(
        np.array([[0.99, 0.05, 0.0], [-0.05, 0.99, 0.02], [0.0, -0.02, 1.0]]),
        center=(20, 25, 30), shift=(1.5, -2.25, 3.1))
    eager3 = apply_transform(vol, t3, output_shape=(38, 52, 61), input_spacing=(2, 1, 1),
                             output_spacing=(2, 1, 1))
    lazy3 = apply_transform(da.from_array(vol, chunks=(16, 20, 25)), t3, output_shape=(38, 52, 61),
                            input_spacing=(2, 1, 1), output_spacing=(2, 1, 1))
    np.testing.assert_array_equal(lazy3.compute(), eager3)


def test_lazy_projective_and_deformable(camera):
    image = camera.astype(np.float32)
    h = np.array([[1.02, 0.03, 4.0], [-0.02, 0.98, -6.0], [2e-5, -3e-5, 1.0]])
    t = Transform(h)
    assert t.is_projective
    eager = apply_transform(image, t, output_shape=image.shape)
    lazy = apply_transform(da.from_array(image, chunks=128), t, output_shape=image.shape)
    np.testing.assert_allclose(lazy.compute(), eager, atol=1e-4)

    yy, xx = np.meshgrid(np.linspace(0, 1, 17), np.linspace(0, 1, 17), indexing="ij")
    field = np.stack([6 * np.sin(3 * xx), -5 * np.cos(2 * yy)], axis=-1)
    tf = Transform(steps=[FieldStep(field, spacing=(32.0, 32.0))])
    eager = apply_transform(image, tf, output_shape=image.shape)
    lazy = apply_transform(da.from_array(image, chunks=128), tf, output_shape=image.shape)
    np.testing.assert_allclose(lazy.compute(), eager, atol=1e-4)


class _Recorder:
    """An array-like that records which regions dask reads from it."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads = []
        self.lock = threading.Lock()

    def __getitem__(self, key):
        if all(s.stop - s.start > 0 for s in key):  # dask's empty probe for meta is no read
            with self.lock:
                self.reads.append(key)
        return self.array[key]


def test_each_block_reads_only_its_region():
    rng = np.random.default_rng(0)
    image = rng.random((2048, 2048)).astype(np.float32)
    rec = _Recorder(image)
    src = da.from_array(rec, chunks=256, asarray=True)
    t = Transform.from_rotation(3.0, center=(1024, 1024)).then(Transform.from_translation((10, 20)))
    lazy = apply_transform(src, t, output_shape=image.shape, chunks=256)
    assert not rec.reads, "building the lazy warp must not read pixels"
    block = lazy.blocks[3, 4].compute()
    read = sum(int(np.prod([s.stop - s.start for s in key])) for key in rec.reads)
    # a 256^2 block rotated by 3 degrees needs a few 256^2 input chunks, never the image
    assert read <= 9 * 256 * 256, read
    eager = resample(image, t, image.shape)[768:1024, 1024:1280]
    # ITK walks each output row from its first pixel, so a block's values can differ from
    # the whole image's in the last bit (1 pixel of 65536 here); the footprint never
    np.testing.assert_array_equal(block == 0, eager == 0)
    np.testing.assert_array_max_ulp(block, eager, maxulp=1)


def test_lazy_false_computes_and_bad_order(camera):
    d = da.from_array(camera, chunks=128)
    out = apply_transform(d, Transform.identity(2), output_shape=camera.shape, lazy=False)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, camera)
    with pytest.raises(ValueError, match="order 0 or 1"):
        apply_transform(d, Transform.identity(2), output_shape=camera.shape, order=3)
    with pytest.raises(ValueError, match="chunks"):
        apply_transform(d, Transform.identity(2), output_shape=camera.shape, chunks="big")


def test_lazy_block_outside_input_is_background(camera):
    t = Transform.from_translation((5000.0, 0.0))
    out = apply_transform(da.from_array(camera, chunks=128), t, output_shape=(300, 300))
    assert out.compute().max() == 0


def test_lazy_runs_on_threaded_and_sync_schedulers(camera):
    t = _motion()
    lazy = apply_transform(da.from_array(camera, chunks=128), t, output_shape=camera.shape)
    with dask.config.set(scheduler="synchronous"):
        a = lazy.compute()
    b = lazy.compute(scheduler="threads")
    np.testing.assert_array_equal(a, b)


def test_lazy_fast_is_within_opencv_rounding_of_exact(camera):
    # OpenCV quantises source coordinates to 1/32 pixel, so a block's own offset can
    # round a coordinate into the neighbouring bin: not bit-identical to the eager fast
    # warp, but within 1/32 of the local grey-level step of the exact (scipy) warp
    t = _motion()
    exact = apply_transform(camera, t, output_shape=camera.shape).astype(float)
    lazy = apply_transform(da.from_array(camera, chunks=128), t, output_shape=camera.shape,
                           fast=True).compute().astype(float)
    eager = apply_transform(camera, t, output_shape=camera.shape, fast=True).astype(float)
    step = np.abs(np.diff(camera.astype(float), axis=0)).max()
    inner = (slice(100, -100), slice(100, -100))  # OpenCV and scipy treat the edge apart
    for fast in (lazy, eager):
        assert np.abs(fast - exact)[inner].max() <= step / 32 + 1
        assert np.abs(fast - exact)[inner].mean() < 0.3


def test_warp_levels_every_level_lazy_except_the_small_ones(camera):
    from napari_registration.core.lazy import lazy_resample, warp_levels

    rgb = np.stack([camera, camera[::-1], camera.T], axis=-1)
    pyr = [da.from_array(rgb, chunks=(128, 128, 3)),
           da.from_array(rgb[::2, ::2].copy(), chunks=(128, 128, 3)),
           da.from_array(rgb[::4, ::4].copy(), chunks=(128, 128, 3))]
    before = rgb.copy()
    t = _motion()
    shapes = [(512, 512), (256, 256), (128, 128)]
    spacings = [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    known = np.full((256, 256, 3), 7, np.uint8)
    out = warp_levels(pyr[:2], t, shapes, output_spacings=spacings, moving_spacings=spacings[:2],
                      rgb=True, chunks=64, eager_pixels=128 * 128, known={1: known})
    assert [o.shape for o in out] == [(512, 512, 3), (256, 256, 3), (128, 128, 3)]
    # level 0 lazy in 64 px blocks; level 1 the array given; level 2 (128^2 px) computed
    assert isinstance(out[0], da.Array) and out[0].chunksize == (64, 64, 3)
    assert out[1] is known
    assert isinstance(out[2], np.ndarray) and out[2].dtype == np.uint8
    np.testing.assert_array_equal(out[0].compute(), resample(rgb, t, (512, 512), rgb=True))
    # level 2 from the coarsest moving level there is (index 1), on its own grid
    expect = lazy_resample(pyr[1], t, (128, 128), output_spacing=(4.0, 4.0),
                           input_spacing=(2.0, 2.0), rgb=True).compute()
    np.testing.assert_array_equal(out[2], expect)
    # fast (OpenCV per block) and a dtype cast: close to the exact warp
    fast = warp_levels(pyr, t, shapes[:1], output_spacings=spacings[:1], moving_spacings=spacings,
                       rgb=True, chunks=64, fast=True, dtype=np.float32)
    assert fast[0].dtype == np.float32
    diff = np.abs(fast[0].compute() - out[0].compute().astype(np.float32))
    assert np.percentile(diff, 99) <= 8 and np.median(diff) <= 1
    np.testing.assert_array_equal(rgb, before)
    with pytest.raises(ValueError, match="one spacing per level"):
        warp_levels(pyr, t, shapes, output_spacings=spacings[:1], moving_spacings=spacings)
