"""Files with rotated axes (direction cosines) are registered in physical space: the CLI's
transform maps physical points, the warped image carries the fixed file's orientation, and
the ITK .tfm reproduces the warp with SimpleITK on the files themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from skimage import data as skdata
from skimage.transform import resize

from napari_registration import load_transform
from napari_registration.cli import main
from napari_registration.orientation import placement

sitk = pytest.importorskip("SimpleITK")


def _volume(shape=(40, 64, 64)):
    """A textured volume from three real photos (camera, moon, coins), one per plane
    orientation, so every axis has structure (product of the three, smoothed)."""
    z, y, x = shape
    a = resize(skdata.camera().astype(np.float32), (y, x), anti_aliasing=True)
    b = resize(skdata.moon().astype(np.float32), (z, x), anti_aliasing=True)
    c = resize(skdata.coins().astype(np.float32), (z, y), anti_aliasing=True)
    vol = a[None, :, :] * b[:, None, :] * c[:, :, None]
    vol = ndimage.gaussian_filter(vol, 0.8)
    return (vol / vol.max() * 1000).astype(np.float32)


def _rotation_itk(deg_z, deg_x):
    """A 3x3 rotation in ITK's (x, y, z) order, as SetDirection's row-major tuple."""
    cz, sz = np.cos(np.deg2rad(deg_z)), np.sin(np.deg2rad(deg_z))
    cx, sx = np.cos(np.deg2rad(deg_x)), np.sin(np.deg2rad(deg_x))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def _fixed_image():
    img = sitk.GetImageFromArray(_volume())
    img.SetSpacing((1.0, 1.2, 2.0))
    img.SetOrigin((-30.0, -40.0, -35.0))
    return img


def _on_rotated_grid(fixed, shift_xyz, rot, size=(60, 60, 36), spacing=(1.1, 1.1, 1.8)):
    """The fixed object shifted by ``shift_xyz`` (physical, ITK order), sampled on a grid
    of ``size``/``spacing`` whose axes are turned by ``rot``, centred on the fixed one."""
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(tuple(rot.ravel()))
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(
        tuple((np.array(fixed.GetSize()) - 1) / 2.0)))
    ref.SetOrigin(tuple(centre - rot @ ((np.array(size) - 1) / 2.0 * np.array(spacing))))
    # moving(p) = fixed(p + shift): a moving physical point p shows what fixed shows at p + shift
    return sitk.Resample(fixed, ref, sitk.TranslationTransform(3, tuple(shift_xyz)),
                         sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _phys_grid(img, n=5, margin=0.25):
    """Physical points (napari order z, y, x) inside an image's field of view."""
    size = np.array(img.GetSize(), float)
    axes = [np.linspace(margin * (s - 1), (1 - margin) * (s - 1), n) for s in size]
    idx = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    return np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in idx])[:, ::-1]


def _rotated_pair(tmp_path, shift_xyz, angles, moving_name):
    """The fixed image as ``fixed.nii.gz`` and the same scene shifted by ``shift_xyz`` on a
    grid rotated by ``angles`` (deg) as ``moving_name``; returns both SimpleITK images."""
    fixed = _fixed_image()
    moving = _on_rotated_grid(fixed, shift_xyz, _rotation_itk(*angles))
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / moving_name))
    return fixed, moving


def test_same_scene_on_a_rotated_grid_registers_in_physical_space(tmp_path, capsys):
    # the moving file is the same object, shifted by a known physical amount, sampled on a
    # grid rotated 25 deg (and tilted 10) against the fixed file's: only the headers say so
    shift_xyz = np.array([3.5, -2.25, 4.0])
    fixed, moving = _rotated_pair(tmp_path, shift_xyz, (25.0, 10.0), "moving.mha")
    out = tmp_path / "out"
    code = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.mha"),
                 "--method", "intensity", "--transform", "rigid", "-o", "seed=0",
                 "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert "physical space" in capsys.readouterr().out
    t = load_transform(out / "transform.json")
    doc = json.loads((out / "transform.json").read_text())
    assert doc["space"] == "physical"
    assert doc["geometry"]["moving"]["direction"] != np.eye(3).tolist()
    # truth: moving physical p -> fixed physical p + shift (napari order z, y, x)
    fixed_pts = _phys_grid(fixed)
    moving_pts = fixed_pts - shift_xyz[::-1]
    err = np.linalg.norm(t.apply(moving_pts) - fixed_pts, axis=1)
    assert err.max() < 0.3, err  # mm; the headers' rotation alone is 25 deg
    # the warped image: on the fixed file's grid, with its geometry, and aligned
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert warped.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(warped.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(warped.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    w, f = sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(fixed)
    inner = (slice(10, 30), slice(15, 50), slice(15, 50))
    assert np.corrcoef(w[inner].ravel(), f[inner].ravel())[0, 1] > 0.97
    # ITK reproduces our warp from the .tfm and the files' own geometry
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tfm, sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    assert np.abs(itk[inner] - w[inner]).max() < 0.01 * float(f.max())


def test_flipped_fixed_and_permuted_moving(tmp_path, capsys):
    # common headers: the fixed file flipped (RAS vs LPS), the moving one stored with its
    # x and y axes swapped; the same object, shifted by a known physical amount
    vol = _volume()
    f_img = sitk.GetImageFromArray(vol)
    f_img.SetSpacing((1.0, 1.2, 2.0))
    f_img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    f_img.SetOrigin((30.0, 40.0, -35.0))
    ref = sitk.Image((80, 64, 40), sitk.sitkFloat32)  # x and y swapped: (y, x, z) sizes
    ref.SetSpacing((1.2, 1.0, 2.0))
    ref.SetDirection((0, -1, 0, -1, 0, 0, 0, 0, 1))
    ref.SetOrigin((40.0, 30.0, -35.0))
    shift_xyz = np.array([-2.5, 3.0, 4.0])
    m_img = sitk.Resample(f_img, ref, sitk.TranslationTransform(3, tuple(shift_xyz)),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(f_img, str(tmp_path / "f.nrrd"))
    sitk.WriteImage(m_img, str(tmp_path / "m.nii.gz"))
    out = tmp_path / "o"
    assert main(["register", str(tmp_path / "f.nrrd"), str(tmp_path / "m.nii.gz"),
                 "--method", "intensity", "--transform", "translation", "-o", "seed=0",
                 "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    t = load_transform(out / "report.json")  # the report's transform is the physical one
    fixed_pts = _phys_grid(f_img)
    err = np.linalg.norm(t.apply(fixed_pts - shift_xyz[::-1]) - fixed_pts, axis=1)
    assert err.max() < 0.1, err
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.GetDirection(), f_img.GetDirection(), atol=1e-6)
    w = sitk.GetArrayFromImage(warped)
    inner = (slice(8, 32), slice(12, 52), slice(12, 52))
    assert np.corrcoef(w[inner].ravel(), vol[inner].ravel())[0, 1] > 0.97


def test_placement_matches_itk_physical_points():
    img = sitk.GetImageFromArray(np.zeros((7, 8, 9), np.float32))
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((1.0, -2.0, 3.0))
    img.SetDirection(tuple(_rotation_itk(40.0, -15.0).ravel()))
    from napari_registration.io_big import _itk_geometry

    geo = _itk_geometry(img)
    p = placement(geo["spacing"], geo["origin"], geo["direction"])
    idx = np.array([[0, 0, 0], [6, 7, 8], [3.5, 1.25, 7.0]])  # napari order (z, y, x)
    world = idx * np.array(geo["spacing"]) + np.array(geo["origin"])
    itk = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i[::-1])) for i in idx])[:, ::-1]
    np.testing.assert_allclose(p.apply(world), itk, atol=1e-9)
    with pytest.raises(ValueError, match="orthonormal"):
        placement((1, 1), (0, 0), [[1.0, 0.5], [0.0, 1.0]])


def test_batch_registers_rotated_headers_in_physical_space_and_resumes(tmp_path, capsys):
    # the batch command takes the same physical-space path as `register` for such files,
    # and a rerun skips the finished pair (its outputs are all there with their sizes)
    shift_xyz = np.array([2.0, -1.5, 3.0])
    fixed, moving = _rotated_pair(tmp_path, shift_xyz, (20.0, 0.0), "moving.nii.gz")
    out = tmp_path / "batch"
    args = ["batch", str(tmp_path / "moving.nii.gz"), "--fixed", str(tmp_path / "fixed.nii.gz"),
            "--method", "intensity", "--transform", "rigid", "-o", "seed=0", "--out", str(out),
            "-q"]
    assert main(args) == 0, capsys.readouterr().err
    item = next(p for p in out.iterdir() if p.is_dir())
    doc = json.loads((item / "transform.json").read_text())
    assert doc["space"] == "physical"
    t = load_transform(item / "transform.json")
    fixed_pts = _phys_grid(fixed)
    err = np.linalg.norm(t.apply(fixed_pts - shift_xyz[::-1]) - fixed_pts, axis=1)
    assert err.max() < 0.3, err
    capsys.readouterr()
    assert main(args) == 0
    assert "already done" in capsys.readouterr().err
