"""ITK interop, checked through SimpleITK itself: a .tfm follows ITK's resampling
convention (fixed physical (x, y[, z]) -> moving physical)."""

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_registration import Transform, load_transform, register, save_transform  # noqa: E402
from napari_registration.core.itk import to_sitk_image  # noqa: E402
from napari_registration.data import fluorescence_pair  # noqa: E402


def _affine3d():
    rng = np.random.default_rng(0)
    m = np.eye(4)
    m[:3, :3] = np.eye(3) + rng.normal(0, 0.05, (3, 3))
    m[:3, 3] = rng.normal(0, 3, 3)
    return Transform(m)


@pytest.mark.parametrize("t", [Transform.from_rotation(17, center=(30, 40), scale=1.1, shift=(2, -5)), _affine3d()])
def test_tfm_maps_fixed_points_to_moving_points_in_itk(tmp_path, t):
    path = save_transform(t, tmp_path / "t.tfm")
    itk_tx = sitk.ReadTransform(str(path))
    fixed_pts = np.random.default_rng(1).uniform(0, 50, (10, t.ndim))
    expected_moving = t.apply_inverse(fixed_pts)
    for p, q in zip(fixed_pts, expected_moving):
        got = np.array(itk_tx.TransformPoint([float(v) for v in p[::-1]]))[::-1]
        np.testing.assert_allclose(got, q, atol=1e-9)
    again = load_transform(path)
    np.testing.assert_allclose(again.matrix, t.matrix, atol=1e-12)


def test_sitk_resample_with_tfm_reproduces_warped(tmp_path):
    fixed, moving, _ = fluorescence_pair()
    spacing, origin = (0.5, 0.25), (10.0, -3.0)
    result = register(fixed, moving, method="fourier", transform="rigid", fixed_spacing=spacing,
                      moving_spacing=spacing, fixed_origin=origin, moving_origin=origin)
    path = save_transform(result.transform, tmp_path / "t.tfm")
    f_img = to_sitk_image(fixed, spacing, origin)
    m_img = to_sitk_image(moving, spacing, origin)
    itk_warped = sitk.GetArrayFromImage(
        sitk.Resample(m_img, f_img, sitk.ReadTransform(str(path)), sitk.sitkLinear, 0.0))
    inner = (slice(40, -40), slice(40, -40))
    np.testing.assert_allclose(itk_warped[inner], result.warped[inner], atol=1e-4)


def test_displacement_field_saves_to_h5_and_reads_back(tmp_path):
    from scipy import ndimage

    from napari_registration.core.transform import FieldStep

    field = ndimage.gaussian_filter(np.random.default_rng(0).normal(0, 20, (30, 40, 2)), (6, 6, 0))
    t = Transform(steps=[FieldStep(field, spacing=(1.5, 1.0), origin=(2.0, 0.0))])
    path = save_transform(t, tmp_path / "t.h5")
    itk_tx = sitk.ReadTransform(str(path))
    p = np.array([20.0, 17.0])
    got = np.array(itk_tx.TransformPoint([float(v) for v in p[::-1]]))[::-1]
    np.testing.assert_allclose(got, t.apply_inverse(p[None])[0], atol=1e-6)
    again = load_transform(path)
    pts = np.random.default_rng(1).uniform(5, 25, (8, 2))
    np.testing.assert_allclose(again.apply_inverse(pts), t.apply_inverse(pts), atol=1e-6)


def test_corrupt_tfm_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.tfm"
    bad.write_text("#Insight Transform File V1.0\nTransform: Nonsense\n")
    with pytest.raises(ValueError, match="not a transform ITK can read"):
        load_transform(bad)
