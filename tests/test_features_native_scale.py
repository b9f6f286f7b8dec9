"""ORB detects on an image's own 8-bit scale (uint8, or floating point within [0, 1])
when FAST finds enough corners there, and on the core's percentile stretch otherwise;
the other detectors and images without an 8-bit scale of their own always use the
stretch."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration import register
from napari_registration.core import register as core_register
from napari_registration.core.preprocess import prepare_uint8

cv2 = pytest.importorskip("cv2")
from napari_registration.backends import features  # noqa: E402


def _photo(contrast: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """A textured [0, 1] image with plenty of corners: blocks of random grey levels."""
    rng = np.random.default_rng(7)
    blocks = rng.random((24, 26))
    img = np.kron(blocks, np.ones((10, 10)))[:230, :250]
    img = img + 0.05 * rng.random(img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return (offset + contrast * img).astype(np.float32)


def _pair(contrast=1.0, offset=0.0):
    from scipy import ndimage

    fixed = _photo(contrast, offset)
    moving = ndimage.shift(fixed, (3.4, -2.2), order=1, mode="nearest").astype(np.float32)
    return fixed, moving


def _backend(f_u8, m_u8, detector="orb", **kw):
    return features.register(f_u8, m_u8, transform="rigid", fixed_spacing=(1.0, 1.0),
                             moving_spacing=(1.0, 1.0), progress=lambda f, m: None,
                             cancel=lambda: False, detector=detector, **kw)


def _same_result(got, want):
    for key in ("fixed_keypoints", "moving_keypoints", "fixed_matches", "moving_matches"):
        np.testing.assert_array_equal(got.extras[key], want.extras[key])
    np.testing.assert_array_equal(got.transform.matrix, want.transform.matrix)


@pytest.mark.parametrize("raw,lo,hi,want", [
    (np.zeros(3, np.uint8), 0.0, 255.0, 1.0),
    (np.zeros(3, np.float32), 0.0, 1.0, 255.0),
    (np.zeros(3, np.float64), 0.2, 0.7, 255.0),
    (np.zeros(3, np.float32), -0.1, 0.9, None),   # below 0: no 8-bit scale of its own
    (np.zeros(3, np.float32), 0.0, 3.5, None),    # raw intensities
    (np.zeros(3, np.uint16), 0.0, 200.0, None),   # uint16 is stretched even when dim
    (np.zeros(3, np.int32), 0.0, 255.0, None),
])
def test_native_gain_by_dtype_and_range(raw, lo, hi, want):
    assert core_register._native_uint8_gain(raw, lo, hi) == want


def test_native_uint8_rounds_and_clips():
    img = np.array([[0.0, 0.4 / 255, 0.6 / 255, 0.999, 1.0]], np.float32)
    np.testing.assert_array_equal(features.native_uint8(img, 255.0), [[0, 0, 1, 255, 255]])
    grey = np.array([[0.0, 12.49, 12.51, 254.6, 255.0]], np.float32)
    np.testing.assert_array_equal(features.native_uint8(grey, 1.0), [[0, 12, 13, 255, 255]])
    rng = np.random.default_rng(3)
    img = rng.random((97, 131)).astype(np.float32)
    want = np.clip(np.rint(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    got = features.native_uint8(img, 255.0)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_orb_on_a_bright_float_image_uses_its_own_scale():
    """Float images within [0, 1] with enough FAST corners: ORB sees x * 255 (rounded),
    not the stretch, and the result is the backend's on those uint8 images."""
    fixed, moving = _pair(contrast=0.6, offset=0.2)   # a gain of ~1.7 to stretch
    u8 = [features.native_uint8(img, 255.0) for img in (fixed, moving)]
    assert min(features.count_corners(u) for u in u8) >= features.NATIVE_MIN_CORNERS
    copies = fixed.copy(), moving.copy()
    got = register(fixed, moving, method="features", detector="orb", transform="rigid",
                   score=False, warp=False)
    np.testing.assert_array_equal(fixed, copies[0])
    np.testing.assert_array_equal(moving, copies[1])
    assert got.info["uint8_scale"] == {"fixed": "native", "moving": "native"}
    _same_result(got, _backend(*u8))
    # the stretch would have given ORB other (more) keypoints
    stretched = _backend(*(prepare_uint8(img) for img in (fixed, moving)))
    assert len(stretched.extras["fixed_keypoints"]) > len(got.extras["fixed_keypoints"])


def test_orb_on_a_uint8_image_reads_it_as_it_is():
    fixed, moving = _pair(contrast=0.6, offset=0.2)
    f8, m8 = (features.native_uint8(img, 255.0) for img in (fixed, moving))
    got = register(f8, m8, method="features", detector="orb", transform="rigid", score=False,
                   warp=False)
    assert got.info["uint8_scale"] == {"fixed": "native", "moving": "native"}
    _same_result(got, _backend(f8, m8))


def test_orb_on_a_dim_image_is_stretched():
    """Too few FAST corners on the image's own scale (a dim image): the stretch, as for
    every other image, bit for bit."""
    fixed, moving = _pair(contrast=0.02, offset=0.01)
    assert features.count_corners(features.native_uint8(fixed, 255.0)) < features.NATIVE_MIN_CORNERS
    got = register(fixed, moving, method="features", detector="orb", transform="rigid",
                   score=False, warp=False)
    assert got.info["uint8_scale"] == {"fixed": "stretched", "moving": "stretched"}
    _same_result(got, _backend(*(prepare_uint8(img) for img in (fixed, moving))))


def test_each_image_decides_for_itself():
    fixed, _ = _pair(contrast=0.6, offset=0.2)
    _, moving = _pair(contrast=0.02, offset=0.01)
    got = register(fixed, moving, method="features", detector="orb", transform="rigid",
                   score=False, warp=False, ratio=0.95, min_inliers=3)
    assert got.info["uint8_scale"] == {"fixed": "native", "moving": "stretched"}


@pytest.mark.parametrize("detector", ["sift", "akaze"])
def test_other_detectors_always_use_the_stretch(detector):
    fixed, moving = _pair(contrast=0.6, offset=0.2)
    got = register(fixed, moving, method="features", detector=detector, transform="rigid",
                   score=False, warp=False)
    assert got.info["uint8_scale"] == {"fixed": "stretched", "moving": "stretched"}
    _same_result(got, _backend(*(prepare_uint8(img) for img in (fixed, moving)), detector=detector))


def test_images_without_an_8bit_scale_are_stretched():
    fixed, moving = _pair(contrast=0.6, offset=0.2)
    f16, m16 = ((img * 4000).astype(np.uint16) for img in (fixed, moving))
    got = register(f16, m16, method="features", detector="orb", transform="rigid", score=False,
                   warp=False)
    assert got.info["uint8_scale"] == {"fixed": "stretched", "moving": "stretched"}


def test_normalize_false_keeps_its_own_path():
    fixed, moving = _pair(contrast=0.6, offset=0.2)
    got = register(fixed, moving, method="features", detector="orb", transform="rigid",
                   score=False, warp=False, normalize=False)
    assert got.info["uint8_scale"] == {"fixed": "given", "moving": "given"}


def test_native_scale_is_not_a_user_option():
    opts = core_register.method_info("features")["options"]
    assert "uint8_native" not in opts and "stretch_uint8" not in opts
    with pytest.raises(ValueError, match="unknown option 'uint8_native'"):
        register(*_pair(), method="features", detector="orb", transform="rigid",
                 uint8_native=(1.0, 1.0))


def test_corner_count_respects_mask_and_threshold():
    u8 = features.native_uint8(_photo(), 255.0)
    full = features.count_corners(u8)
    mask = np.zeros(u8.shape, bool)
    mask[:, : u8.shape[1] // 2] = True
    assert 0 < features.count_corners(u8, mask) < full
    assert features.count_corners(u8, threshold=60) < full
