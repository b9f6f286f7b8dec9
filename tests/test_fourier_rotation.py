"""fourier keeps its capture range: any rotation to 180 degrees (the log-polar search
finds the angle up to a half turn; the translation peak, or the NCC when the peaks are
close, picks the angle or the angle + 180)."""

import numpy as np
import pytest

from napari_registration import register
from napari_registration.core.resample import resample
from napari_registration.core.transform import Transform


@pytest.mark.parametrize("angle, scale", [(150.0, 1.0), (-120.0, 1.0), (179.0, 0.92),
                                          (95.0, 1.1), (-60.0, 1.0)])
def test_fourier_recovers_large_rotations(angle, scale):
    from skimage import data

    fixed = data.camera()[::2, ::2].astype(np.float32) / 255
    c = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(angle, center=c, scale=scale, shift=(3.0, -4.5))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3)
    model = "rigid" if scale == 1.0 else "similarity"
    r = register(fixed, moving, method="fourier", transform=model, score=False)
    ys, xs = np.meshgrid(np.linspace(0.3, 0.7, 5) * 255, np.linspace(0.3, 0.7, 5) * 255,
                         indexing="ij")
    p = np.stack([ys.ravel(), xs.ravel()], 1)
    err = np.linalg.norm(r.transform.apply_inverse(p) - truth.apply_inverse(p), axis=1)
    assert err.mean() < 0.01, (angle, err.mean())
    # the chosen turn, not the one 180 degrees off
    assert abs((r.info["angle_deg"] - angle + 180) % 360 - 180) < 0.05
