"""Tile refinement pieces: the least-squares polish of a tile's shift, the consensus fit
that rejects a cluster of bad tiles, and chunk-aware tile placement."""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import ndimage
from skimage import data as skdata
from skimage.transform import resize

from napari_registration import Transform
from napari_registration.backends.landmarks import fit_landmarks
from napari_registration.core.pyramid import (_consensus_fit, _place_tile, _polish_shift,
                                              _tile_shift, as_levels)


def _smooth_volume(n=64):
    # a smooth volume from real photos (camera x moon x coins), blurred like an MR head
    a = resize(skdata.camera().astype(np.float32), (n, n), anti_aliasing=True)
    b = resize(skdata.moon().astype(np.float32), (n, n), anti_aliasing=True)
    c = resize(skdata.coins().astype(np.float32), (n, n), anti_aliasing=True)
    vol = a[None] * b[:, None] * c[:, :, None]
    return ndimage.gaussian_filter(vol, 3.0)


def test_polish_recovers_a_subvoxel_shift_of_a_smooth_tile():
    vol = _smooth_volume()
    true = np.array([0.37, -0.21, 0.13])  # moving -> fixed, voxels
    fixed = ndimage.shift(vol, true, order=3, mode="nearest")
    start = true + np.array([0.06, -0.05, 0.04])  # as good as a phase-correlation peak
    got = _polish_shift(fixed, vol, start)
    assert np.abs(got - true).max() < 0.01
    # and the whole tile measurement, from scratch, in world units
    shift = _tile_shift(fixed * 2.0 + 5.0, vol, np.array([2.0, 1.0, 1.0]), np.zeros(3))
    np.testing.assert_allclose(shift, true * [2.0, 1.0, 1.0], atol=0.02)


def test_polish_refuses_a_tile_with_one_direction_of_structure():
    ramp = np.tile(np.sin(np.linspace(0, 6, 64))[None, :], (64, 1)).astype(np.float32)
    assert _polish_shift(ramp, ramp, np.zeros(2)) is None


def test_consensus_drops_a_cluster_of_agreeing_bad_tiles():
    rng = np.random.default_rng(0)
    truth = Transform.from_rotation(0.3, center=(500, 500)).then(Transform.from_translation((0.4, -0.2)))
    moving = rng.uniform(0, 1000, (19, 2))
    fixed = truth.apply(moving) + rng.normal(0, 0.005, (19, 2))
    fixed[:5] += (-2.2, -2.2)  # five tiles that agree with one another, and are wrong
    # the current estimate is close (what the coarse level gives): tiles measure corrections
    current = Transform.from_rotation(0.31, center=(500, 500)).then(
        Transform.from_translation((0.9, -0.5)))
    new, fit, keep = _consensus_fit(fixed, moving, "rigid", 2, np.ones(2), fit_landmarks, current)
    assert not keep[:5].any() and keep[5:].all()
    pts = np.array([[0, 0], [999, 999], [0, 999]], float)
    assert np.abs(new.apply(pts) - truth.apply(pts)).max() < 0.02


def test_tiles_are_placed_to_read_few_chunks():
    image = da.zeros((4096, 4096), np.float32, chunks=1024)
    lev = as_levels(image)[0]
    tf = Transform.from_translation((130.0, -70.0))
    side = np.array([512, 512])
    corner = _place_tile(np.array([1700, 1700]), side, np.array(lev.shape), tf, lev, lev,
                         [np.r_[0, np.cumsum(c)] for c in image.chunks],
                         [np.r_[0, np.cumsum(c)] for c in image.chunks])
    assert np.abs(corner - 1700).max() <= 512  # near its grid position
    # the fixed tile inside one chunk, and the moving region it pulls back to as well
    assert (corner // 1024 == (corner + 511) // 1024).all()
    back_lo, back_hi = corner - (130, -70) - 2, corner + 511 - (130, -70) + 3
    assert (back_lo // 1024 == back_hi // 1024).all()
