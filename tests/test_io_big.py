"""Big-image formats: OME-Zarr (multiscale, coordinateTransformations) written block by
block, atomically, resumable, on a dask cluster; pyramidal OME-TIFF; DICOM series;
orientation from ITK headers; validation before native readers."""

from __future__ import annotations

import json
import locale
import threading

import dask
import dask.array as da
import numpy as np
import pytest
from skimage import data as skdata

from napari_registration import Transform, apply_transform, register
from napari_registration.io_big import (read_big, read_dicom_series, read_geometry, read_ome_tiff,
                                        read_ome_zarr, write_ome_tiff, write_ome_zarr)


def test_ome_zarr_round_trip_levels_and_geometry(tmp_path):
    image = skdata.camera()[:500, :470]
    out = write_ome_zarr(tmp_path / "cam.ome.zarr", image, spacing=(0.5, 0.25), origin=(3, 4),
                         chunks=128, n_levels=3)
    assert out.exists() and not (tmp_path / "cam.ome.zarr.tmp").exists()
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in meta["datasets"]]
    assert scales == [[0.5, 0.25], [1.0, 0.5], [2.0, 1.0]]
    back = read_ome_zarr(out)
    assert back.spacing == (0.5, 0.25) and back.origin == (3.0, 4.0) and not back.rgb
    assert [lev.shape for lev in back.levels] == [(500, 470), (250, 235), (125, 117)]
    np.testing.assert_array_equal(np.asarray(back.levels[0]), image)
    # level 1: 2x2 block means, and its translation puts each pixel at its block's centre
    expect = image[:500, :470].reshape(250, 2, 235, 2).mean(axis=(1, 3))
    assert np.abs(np.asarray(back.levels[1]).astype(float) - expect).max() <= 0.5
    assert back.meta["level_translations"][1] == [3.25, 4.125]
    assert back.levels[0].chunksize == (128, 128)


def test_ome_zarr_rgb_and_channel_choice(tmp_path):
    rgb = skdata.astronaut()
    out = write_ome_zarr(tmp_path / "a.ome.zarr", rgb, rgb=True, n_levels=2, chunks=256)
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert [a["name"] for a in meta["axes"]] == ["c", "y", "x"]
    back = read_ome_zarr(out)
    assert back.rgb and back.levels[0].shape == (512, 512, 3)
    np.testing.assert_array_equal(np.asarray(back.levels[0]), rgb)
    green = read_ome_zarr(out, channel=1)
    np.testing.assert_array_equal(np.asarray(green.levels[0]), rgb[..., 1])
    with pytest.raises(ValueError, match="channel 5"):
        read_ome_zarr(out, channel=5)


def test_ome_zarr_write_is_resumed_without_recomputing_done_blocks(tmp_path):
    image = skdata.camera()
    calls = {"n": 0, "fail_after": 5}
    lock = threading.Lock()

    def counted(block):
        with lock:
            calls["n"] += 1
            if calls["fail_after"] is not None and calls["n"] > calls["fail_after"]:
                raise OSError("simulated crash")
        return block

    def make_level(shape, spacing, origin):
        src = da.from_array(image, chunks=128)
        lazy = apply_transform(src, Transform.identity(2), output_shape=shape,
                               output_spacing=spacing, output_origin=origin, chunks=128)
        return lazy.map_blocks(counted, dtype=lazy.dtype, meta=np.empty((0, 0), lazy.dtype))

    target = tmp_path / "w.ome.zarr"
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError, match="simulated"):
        write_ome_zarr(target, image, chunks=128, n_levels=2, make_level=make_level)
    assert not target.exists() and (tmp_path / "w.ome.zarr.tmp").exists()
    finished = sum(1 for p in (tmp_path / "w.ome.zarr.tmp" / ".done").rglob("*") if p.is_file())
    assert 1 <= finished <= 5
    total = 16 + 4  # 4x4 blocks at level 0, 2x2 at level 1
    calls.update(n=0, fail_after=None)
    with dask.config.set(scheduler="synchronous"):
        write_ome_zarr(target, image, chunks=128, n_levels=2, make_level=make_level)
    assert calls["n"] == total - finished  # finished blocks were not recomputed
    back = read_ome_zarr(target)
    np.testing.assert_array_equal(np.asarray(back.levels[0]), image)
    assert not (target / ".done").exists()


def test_ome_zarr_write_on_a_dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    image = skdata.camera()
    t = Transform.from_rotation(5.0, center=(256, 256))
    lazy = apply_transform(da.from_array(image, chunks=128), t, output_shape=image.shape, chunks=128)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        out = write_ome_zarr(tmp_path / "c.ome.zarr", lazy, chunks=128, n_levels=1, client=client)
    np.testing.assert_array_equal(np.asarray(read_ome_zarr(out).levels[0]),
                                  apply_transform(image, t, output_shape=image.shape))


def test_registering_ome_zarr_pyramids(tmp_path):
    from napari_registration.bigdata import slide_pair

    fixed, moving, truth = slide_pair(1024, angle=1.5, shift=(12.5, -7.25), levels=3, chunks=256)
    fp = write_ome_zarr(tmp_path / "f.ome.zarr", fixed, rgb=True, chunks=256)
    mp = write_ome_zarr(tmp_path / "m.ome.zarr", moving, rgb=True, chunks=256)
    f, m = read_big(fp), read_big(mp)
    assert len(f.levels) == 3 and f.rgb
    r = register(f.data, m.data, method="fourier", transform="rigid", pixel_budget=300,
                 fixed_spacing=f.spacing, moving_spacing=m.spacing)
    pts = np.array([[0, 0], [1023, 1023], [0, 1023]], float)
    assert np.abs(r.transform.apply(pts) - truth.apply(pts)).max() < 0.5


def test_pyramidal_ome_tiff_round_trip(tmp_path):
    rgb = skdata.astronaut()
    levels = [rgb, rgb[::2, ::2], rgb[::4, ::4]]
    out = write_ome_tiff(tmp_path / "p.ome.tif", [da.from_array(a, chunks=(128, 128, 3)) for a in levels],
                         spacing=(0.25, 0.5), rgb=True, tile=128)
    back = read_ome_tiff(out)
    assert back.rgb and [lev.shape for lev in back.levels] == [a.shape for a in levels]
    assert back.spacing == (0.25, 0.5)
    assert isinstance(back.levels[1], da.Array)
    np.testing.assert_array_equal(np.asarray(back.levels[1]), levels[1])
    assert read_big(out).meta["ome"]


def test_dicom_series_and_itk_orientation(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(0)
    vol = (rng.random((6, 40, 50)) * 1000).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -5.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # SimpleITK's DICOM writer (GDCM) switches the whole process to the "C" locale and
    # leaves it there: Python's default text encoding becomes ASCII for every later test.
    # The package never writes DICOM; the test puts the locale back
    saved = locale.setlocale(locale.LC_ALL)
    try:
        for z in range(vol.shape[0]):
            sl = img[:, :, z]
            sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # series UID
            sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
            sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
            sl.SetMetaData("0018|0050", "2.5")
            sl.SetMetaData("0020|0013", str(z))
            writer.SetFileName(str(folder / f"s{z:03d}.dcm"))
            writer.Execute(sl)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    before = locale.setlocale(locale.LC_ALL)
    series = read_dicom_series(folder)
    assert series.levels[0].shape == vol.shape
    np.testing.assert_allclose(series.spacing, (2.5, 0.8, 0.7), atol=1e-6)
    np.testing.assert_allclose(series.origin, (3.0, -5.0, 10.0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(series.levels[0]), vol)
    assert read_big(folder).meta["format"] == "dicom"
    assert locale.setlocale(locale.LC_ALL) == before  # reading leaves the locale alone

    oblique = sitk.GetImageFromArray(vol.astype(np.float32))
    c, s = np.cos(0.3), np.sin(0.3)
    oblique.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    sitk.WriteImage(oblique, str(tmp_path / "o.nii.gz"))
    geo = read_geometry(tmp_path / "o.nii.gz")
    assert geo["meta"]["oblique"]
    assert np.allclose(np.abs(np.linalg.det(np.array(geo["direction"]))), 1.0)
    assert read_big(tmp_path / "o.nii.gz").direction == geo["direction"]


def test_bad_files_say_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        read_big(tmp_path / "empty")
    junk = tmp_path / "junk.ome.zarr"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read OME-Zarr"):
        read_ome_zarr(junk)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="cannot read TIFF"):
        read_big(tmp_path / "bad.tif")
    with pytest.raises(FileNotFoundError):
        read_big(tmp_path / "missing.ome.zarr")
    four_channels = np.zeros((5, 64, 64), np.uint8)
    import ngff_zarr as nz

    img = nz.to_ngff_image(four_channels, dims=("c", "y", "x"))
    nz.to_ome_zarr(str(tmp_path / "c5.ome.zarr"), nz.to_multiscales(img, scale_factors=[]))
    with pytest.raises(ValueError, match="pass channel=N"):
        read_ome_zarr(tmp_path / "c5.ome.zarr")


def test_cli_registers_ome_zarr_and_writes_a_multiscale_warp(tmp_path, capsys):
    from napari_registration.bigdata import slide_pair
    from napari_registration.cli import main

    fixed, moving, truth = slide_pair(1024, angle=-2.0, shift=(-9.5, 14.25), levels=3, chunks=256)
    fp = write_ome_zarr(tmp_path / "f.ome.zarr", fixed, rgb=True, chunks=256, spacing=(0.5, 0.5))
    mp = write_ome_zarr(tmp_path / "m.ome.zarr", moving, rgb=True, chunks=256, spacing=(0.5, 0.5))
    out = tmp_path / "out"
    code = main(["register", str(fp), str(mp), "--method", "fourier", "--transform", "rigid",
                 "--pixel-budget", "300", "--format", "ome-zarr", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["info"]["pyramid"]["fixed_level"] == 2
    assert report["fixed"]["geometry"]["spacing"] == [0.5, 0.5]
    assert report["fixed"]["geometry"]["levels"] == [[1024, 1024, 3], [512, 512, 3], [256, 256, 3]]
    from napari_registration import load_transform

    t = load_transform(out / "transform.json")
    pts = np.array([[0, 0], [1023, 1023], [1023, 0]], float)
    # world units are 0.5 per pixel: truth (pixels) scaled
    assert np.abs(t.apply(pts * 0.5) / 0.5 - truth.apply(pts)).max() < 0.5
    warped = read_ome_zarr(out / "warped.ome.zarr")
    assert [lev.shape for lev in warped.levels] == [(1024, 1024, 3), (512, 512, 3), (256, 256, 3)]
    assert warped.spacing == (0.5, 0.5)
    ref = np.asarray(fixed[1][200:400, 200:400]).astype(float)
    got = np.asarray(warped.levels[1][200:400, 200:400]).astype(float)
    assert np.abs(got - ref).mean() < 3.0
    assert (out / "checkerboard.png").exists()


def test_cli_nifti_records_orientation(tmp_path, capsys):
    sitk = pytest.importorskip("SimpleITK")
    from napari_registration.cli import main

    rng = np.random.default_rng(1)
    from scipy import ndimage

    vol = ndimage.gaussian_filter(rng.random((30, 40, 40)), 2).astype(np.float32)
    moved = np.roll(vol, (2, -3, 1), axis=(0, 1, 2))
    for name, arr in (("f.nii.gz", vol), ("m.nii.gz", moved)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 2.0))
        img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))  # axes swapped in the header
        sitk.WriteImage(img, str(tmp_path / name))
    out = tmp_path / "o"
    assert main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"),
                 "--pixel-budget", "2048", "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    geo = report["moving"]["geometry"]
    assert geo["spacing"] == [2.0, 1.0, 1.0] and geo["oblique"] is False
    assert geo["direction"] != np.eye(3).tolist()
    # the arrays moved by (-4, 3, -1) world units along their (z, y, x) axes; the headers
    # swap the array's y and x axes in physical space, where the transform now lives
    # (files with a non-identity direction are registered in physical space)
    np.testing.assert_allclose(load_shift(out), (-4.0, -1.0, 3.0), atol=0.2)
    assert json.loads((out / "transform.json").read_text())["space"] == "physical"
    assert (out / "warped.nii.gz").exists()


def load_shift(out):
    from napari_registration import load_transform

    return load_transform(out / "transform.json").matrix[:3, 3]
