"""Packaging: light imports, a valid manifest, working sample data."""

import subprocess
import sys

import numpy as np


def test_import_loads_no_napari_qt_cv2_or_simpleitk():
    code = (
        "import sys, napari_registration as nr;"
        "nr.register;"
        "heavy = [m for m in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'cv2', 'SimpleITK', 'magicgui') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules loaded at import: {out.stdout}"


def test_manifest_validates_with_imports():
    exe = [sys.executable, "-m", "npe2", "validate", "napari-registration", "--imports"]
    out = subprocess.run(exe, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_sample_data_carries_the_truth():
    from napari_registration import Transform
    from napari_registration._sample_data import fluorescence_pair, photo_pair, volume_pair

    for make in (fluorescence_pair, photo_pair, volume_pair):
        layers = make()
        assert len(layers) == 2
        (fixed, fkw, _), (moving, mkw, _) = layers
        truth = Transform.from_dict(mkw["metadata"]["registration_truth"])
        assert truth.ndim == fixed.ndim and fixed.shape == moving.shape
        assert not np.allclose(fixed, moving)
