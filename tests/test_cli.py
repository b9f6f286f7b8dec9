"""The command line: register files, demo, clear errors."""

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage import data

from napari_registration import load_transform
from napari_registration.cli import main


@pytest.fixture
def tiff_pair(tmp_path):
    img = data.camera().astype(np.float32)
    moving = ndimage.shift(img, (4.5, -2.25), order=3, mode="nearest")
    tifffile.imwrite(tmp_path / "fixed.tif", img[30:-30, 30:-30])
    tifffile.imwrite(tmp_path / "moving.tif", moving[30:-30, 30:-30])
    return tmp_path / "fixed.tif", tmp_path / "moving.tif"


def test_register_writes_all_outputs(tiff_pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["register", str(tiff_pair[0]), str(tiff_pair[1]), "--out", str(out), "-q"]) == 0
    for name in ("warped.tif", "transform.json", "transform.tfm", "checkerboard.png", "report.json"):
        assert (out / name).exists(), name
    t = load_transform(out / "transform.json")
    np.testing.assert_allclose(t.matrix[:2, 2], [-4.5, 2.25], atol=0.05)
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["after"]["ncc"] > report["metrics"]["before"]["ncc"]
    assert tifffile.imread(out / "warped.tif").shape == tifffile.imread(tiff_pair[0]).shape
    assert "ncc" in capsys.readouterr().out


def test_register_nifti_uses_header_spacing(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from napari_registration.data import blobs_volume

    vol = blobs_volume((40, 64, 64))
    moving = ndimage.shift(vol, (0, 3, 0), order=3, mode="nearest")
    for name, arr in (("f.nii.gz", vol), ("m.nii.gz", moving)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.5, 0.5, 2.0))  # x, y, z
        sitk.WriteImage(img, str(tmp_path / name))
    out = tmp_path / "out"
    assert main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--out", str(out), "-q"]) == 0
    t = load_transform(out / "transform.json")
    np.testing.assert_allclose(t.matrix[:3, 3], [0.0, -1.5, 0.0], atol=0.05)  # 3 rows * 0.5 world
    assert (out / "warped.nii.gz").exists()


def test_unreadable_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff at all")
    assert main(["register", str(bad), str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "Traceback" not in err
    assert main(["register", str(tmp_path / "nope.tif"), str(bad)]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_reports_accuracy(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "TRE against the known transform" in out
    mean_tre = float(out.split("mean ")[1].split(" px")[0])
    assert mean_tre < 0.5
    assert (tmp_path / "demo" / "checkerboard.png").exists()


def test_methods_lists_fourier(capsys):
    assert main(["methods"]) == 0
    assert "fourier" in capsys.readouterr().out
