"""Fourier backend: sub-pixel translation in nD, rotation + scale in 2D, on real photos."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import color, data

from napari_registration import Transform, register
from napari_registration.backends.fourier import phase_correlate
from napari_registration.core.resample import resample
from napari_registration.data import blobs_volume, grid_points, tre_against_truth


def _photo():
    return color.rgb2gray(data.astronaut()).astype(np.float32)


def _shifted_pair(image, shift, margin=40):
    """moving shows the fixed content displaced by +shift (cubic spline), both cropped."""
    moving = ndimage.shift(image, shift, order=3, mode="nearest")
    crop = tuple(slice(margin, -margin) for _ in image.shape)
    return image[crop], moving[crop]


@pytest.mark.parametrize("shift", [(3.37, -5.71), (-0.25, 0.6), (12.5, 7.125)])
def test_subpixel_shift_on_real_photo(shift):
    fixed, moving = _shifted_pair(_photo(), shift)
    result = register(fixed, moving, method="fourier", transform="translation")
    # moving content displaced by +d  ->  moving->fixed translation is -d
    np.testing.assert_allclose(result.transform.matrix[:2, 2], -np.array(shift), atol=0.05)
    truth = Transform.from_translation(-np.array(shift))
    assert tre_against_truth(result.transform, truth, grid_points(fixed.shape))["mean"] <= 0.05


def test_convention_pure_row_shift():
    """A shift of +3 rows gives matrix[0, -1] == -3 and a warped image equal to fixed."""
    fixed = _photo()[100:300, 100:300]
    moving = np.zeros_like(fixed)
    moving[3:] = fixed[:-3]  # content moved down by 3 rows
    result = register(fixed, moving, method="fourier", transform="translation")
    assert result.transform.matrix[0, -1] == pytest.approx(-3.0, abs=0.02)
    assert result.transform.matrix[1, -1] == pytest.approx(0.0, abs=0.02)
    np.testing.assert_allclose(result.warped[:-4], fixed[:-4], atol=1e-3)
    assert result.warped.shape == fixed.shape


def test_rotation_and_scale_on_real_photo():
    fixed = color.rgb2gray(data.astronaut()).astype(np.float32)
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(20.0, center=centre, scale=1.15, shift=(4.0, -6.0))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3)  # moving(q) = fixed(truth(q))
    result = register(fixed, moving, method="fourier", transform="similarity")
    err = tre_against_truth(result.transform, truth, grid_points(fixed.shape, margin=0.3))
    assert err["mean"] <= 0.5, (err, result.info)
    assert result.metrics["after"]["ncc"] > result.metrics["before"]["ncc"] + 0.3


def test_rigid_keeps_scale_one():
    fixed = data.camera().astype(np.float32)
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(-12.0, center=centre, shift=(-7.0, 3.5))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3)
    result = register(fixed, moving, method="fourier", transform="rigid")
    lin = result.transform.matrix[:2, :2]
    np.testing.assert_allclose(lin @ lin.T, np.eye(2), atol=1e-9)
    assert tre_against_truth(result.transform, truth, grid_points(fixed.shape, margin=0.3))["mean"] <= 0.5


def test_3d_translation_with_anisotropic_spacing():
    vol = blobs_volume((56, 96, 96))
    d = np.array([2.0, -3.5, 4.25])  # index units
    moving = ndimage.shift(vol, d, order=3, mode="nearest")
    crop = (slice(8, -8),) * 3
    spacing = np.array([2.0, 0.5, 0.5])
    result = register(vol[crop], moving[crop], method="fourier", transform="translation",
                      fixed_spacing=spacing, moving_spacing=spacing)
    np.testing.assert_allclose(result.transform.matrix[:3, 3] / spacing, -d, atol=0.05)


def test_different_shapes_and_spacings():
    photo = _photo()
    fixed = photo[50:350, 60:420]
    # moving is a zoomed-out crop: half the pixels at twice the spacing
    moving_full = photo[30:400, 20:480]
    moving = ndimage.zoom(ndimage.gaussian_filter(moving_full, 1.0), 0.5, order=1, grid_mode=True,
                          mode="grid-constant")
    result = register(fixed, moving, method="fourier", transform="translation",
                      fixed_spacing=(1.0, 1.0), moving_spacing=(2.0, 2.0))
    # moving world (index*2, grid-mode centres shifted by 0.5 px) -> fixed world
    expected = np.array([30 - 50, 20 - 60]) + 0.5
    np.testing.assert_allclose(result.transform.matrix[:2, 2], expected, atol=0.35)
    assert result.warped.shape == fixed.shape


def test_origins_are_honoured():
    fixed, moving = _shifted_pair(_photo(), (4.0, -2.0))
    r0 = register(fixed, moving, method="fourier")
    r1 = register(fixed, moving, method="fourier", fixed_origin=(100.0, 0.0), moving_origin=(0.0, 50.0))
    # a moving world point p corresponds to p - moving_origin in the zero-origin case
    p = np.array([[60.0, 70.0]])
    expected = r0.transform.apply(p - [0.0, 50.0]) + [100.0, 0.0]
    np.testing.assert_allclose(r1.transform.apply(p), expected, atol=1e-6)
    np.testing.assert_allclose(r1.warped, r0.warped, atol=1e-5)


def test_phase_correlate_integer_roll_exact():
    img = data.camera().astype(np.float32)
    shift, peak = phase_correlate(img, np.roll(img, (3, -5), axis=(0, 1)), window=False)
    np.testing.assert_allclose(shift, [-3, 5], atol=1e-9)
    assert peak > 0.9


def test_3d_rotation_is_refused_with_advice():
    vol = blobs_volume((24, 32, 32))
    with pytest.raises(ValueError, match="intensity"):
        register(vol, vol, method="fourier", transform="rigid")
