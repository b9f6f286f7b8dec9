"""An initial transform passed as ``init=Transform`` reaches the backend (the option
type check must not reject it: ``auto`` hands its coarse estimate to ``intensity`` so)."""

import numpy as np
import pytest

from napari_registration import Transform, available_methods, register
from napari_registration.data import grid_points, tre_against_truth


@pytest.mark.skipif("intensity" not in available_methods(), reason="intensity backend not installed")
def test_intensity_accepts_transform_init():
    from skimage import data
    from skimage.transform import downscale_local_mean

    from napari_registration.core.resample import resample

    fixed = downscale_local_mean(data.camera().astype(np.float32), (4, 4))
    fixed = (fixed - fixed.min()) / np.ptp(fixed)
    truth = Transform.from_rotation(4.0, center=(63.5, 63.5), shift=(3.0, -2.0))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3)
    init = Transform.from_translation((3.0, -2.0))
    result = register(fixed, moving, method="intensity", transform="rigid", init=init, score=False)
    assert tre_against_truth(result.transform, truth, grid_points(fixed.shape))["mean"] < 0.5


def test_auto_refines_3d_rotation_with_intensity():
    if "intensity" not in available_methods():
        pytest.skip("intensity backend not installed")
    from napari_registration.data import volume_pair

    fixed, moving, truth, spacing = volume_pair()
    result = register(fixed, moving, method="auto", transform="rigid", fixed_spacing=spacing,
                      moving_spacing=spacing, score=False)
    assert not any(s.get("error") for s in result.info.get("stages", [])), result.info.get("stages")
    assert tre_against_truth(result.transform, truth, grid_points(fixed.shape, spacing))["mean"] < 0.5
