"""Label pyramids: coarser levels of a label image are block modes, never averages, so no
level holds an id that is not in level 0 (OME-Zarr and pyramidal OME-TIFF)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from skimage import data as skdata
from skimage.measure import label

from napari_registration import Transform, apply_transform
from napari_registration.io_big import (label_levels, read_ome_tiff, read_ome_zarr,
                                        write_ome_tiff, write_ome_zarr)


@pytest.fixture(scope="module")
def coins_labels():
    # a real segmentation: scikit-image's coins thresholded and labelled (ids 1..N, with
    # ids far apart so that an average of two neighbours is a third, unused id)
    img = skdata.coins()
    ids = label(img > 110).astype(np.uint16)
    return (ids * 7).astype(np.uint16)  # 0, 7, 14, ...: means of neighbours fall between


def _ids(a):
    return set(np.unique(np.asarray(a)).tolist())


def test_block_mode_levels_keep_ids_and_majorities(coins_labels):
    levels = label_levels(coins_labels, 4)
    assert [lev.shape for lev in levels] == [(303, 384), (151, 192), (75, 96), (37, 48)]
    ids0 = _ids(coins_labels)
    for lev in levels[1:]:
        assert lev.dtype == np.uint16 and _ids(lev) <= ids0
    # a 2x2 block with a 3-of-4 majority takes the majority; ties take the top-left pixel
    toy = np.array([[5, 5, 1, 2], [5, 9, 3, 4]], np.uint8)
    np.testing.assert_array_equal(np.asarray(label_levels(toy, 2)[1]), [[5, 1]])
    # 3D: 2x2x2 blocks
    vol = np.zeros((4, 4, 4), np.int32)
    vol[:, :, 2:] = 3
    vol[0, 0, 0] = 8
    np.testing.assert_array_equal(np.asarray(label_levels(vol, 2)[1]),
                                  [[[0, 3], [0, 3]], [[0, 3], [0, 3]]])


def test_ome_zarr_label_pyramid_has_no_new_ids(tmp_path, coins_labels):
    ids0 = _ids(coins_labels)
    out = write_ome_zarr(tmp_path / "labels.ome.zarr", coins_labels, labels=True, n_levels=3,
                         chunks=64)
    back = read_ome_zarr(out)
    np.testing.assert_array_equal(np.asarray(back.levels[0]), coins_labels)
    for lev in back.levels[1:]:
        assert _ids(lev) <= ids0
    # what averaging does to the same labels: new ids appear (the reason for this option)
    avg = write_ome_zarr(tmp_path / "avg.ome.zarr", coins_labels, n_levels=3, chunks=64)
    assert not _ids(read_ome_zarr(avg).levels[1]) <= ids0
    with pytest.raises(ValueError, match="integer"):
        write_ome_zarr(tmp_path / "f.ome.zarr", coins_labels.astype(np.float32), labels=True)


def test_warped_labels_written_as_a_label_pyramid(tmp_path, coins_labels):
    # a segmentation carried onto the fixed grid lazily (nearest neighbour), then written
    # as multiscale OME-Zarr: every level's ids are ids of the moving segmentation
    t = Transform.from_rotation(7.0, center=(150, 190)).then(Transform.from_translation((4.5, -3.2)))
    warped = apply_transform(da.from_array(coins_labels, chunks=100), t,
                             output_shape=coins_labels.shape, labels=True)
    out = write_ome_zarr(tmp_path / "w.ome.zarr", warped, labels=True, n_levels=3, chunks=128)
    back = read_ome_zarr(out)
    ids0 = _ids(coins_labels)
    assert all(_ids(lev) <= ids0 for lev in back.levels)
    assert len(_ids(back.levels[2])) > 10  # coins survive at 1/4 size


def test_ome_tiff_label_pyramid(tmp_path, coins_labels):
    out = write_ome_tiff(tmp_path / "labels.ome.tif", coins_labels, labels=True, n_levels=3,
                         tile=64)
    back = read_ome_tiff(out)
    assert [lev.shape for lev in back.levels] == [(303, 384), (151, 192), (75, 96)]
    ids0 = _ids(coins_labels)
    assert all(_ids(lev) <= ids0 for lev in back.levels)
    np.testing.assert_array_equal(np.asarray(back.levels[0]), coins_labels)
    # images (labels=False) get block means at the same shapes
    img = write_ome_tiff(tmp_path / "img.ome.tif", skdata.coins(), n_levels=3, tile=64)
    lev1 = np.asarray(read_ome_tiff(img).levels[1]).astype(float)
    expect = skdata.coins()[:302].reshape(151, 2, 192, 2).mean(axis=(1, 3))
    assert np.abs(lev1 - expect).max() <= 0.5
