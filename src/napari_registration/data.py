"""Sample pairs with known misalignment, built from images that ship inside the
scikit-image wheel (no network) or generated deterministically.

Each function returns ``(fixed, moving, truth)`` where ``truth`` is the
:class:`~napari_registration.Transform` mapping moving world -> fixed world, so a
registration can be scored by target registration error.
"""

from __future__ import annotations

import numpy as np

from .core.resample import resample
from .core.transform import Transform


def _warp_by_truth(fixed, truth, shape=None, **geometry):
    """Make a moving image such that ``truth`` (moving -> fixed) aligns it: moving(q) =
    fixed(truth(q))."""
    shape = fixed.shape if shape is None else shape
    return resample(fixed, truth.inverse(), shape, order=3, **geometry)


def fluorescence_pair():
    """Nuclei stain of a scikit-image IHC slide, shown like fluorescence, and the same
    field shifted by a sub-pixel channel offset plus a 3 degree rotation: the two-channel
    case. Returns float32 images (512 x 512)."""
    from skimage import color, data

    hed = color.rgb2hed(data.immunohistochemistry())
    nuclei = hed[..., 0]
    fixed = ((nuclei - nuclei.min()) / np.ptp(nuclei)).astype(np.float32)
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(3.0, center=centre, shift=(6.4, -9.7))
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    return fixed, moving, truth


def photo_pair():
    """scikit-image's astronaut photo (grey) and a perspective view of it: the
    features/homography case."""
    from skimage import color, data

    fixed = color.rgb2gray(data.astronaut()).astype(np.float32)
    m = np.array([[1.05, 0.08, -20.0], [-0.06, 0.97, 15.0], [1.2e-4, -0.8e-4, 1.0]])
    truth = Transform(m)
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    return fixed, moving, truth


def blobs_volume(shape=(48, 96, 96), seed: int = 0) -> np.ndarray:
    """A smooth synthetic 3D volume (blurred binary blobs), float32 in [0, 1]."""
    from scipy import ndimage
    from skimage.data import binary_blobs

    n = max(shape)
    vol = binary_blobs(length=n, n_dim=3, blob_size_fraction=0.12, volume_fraction=0.3,
                       rng=seed)[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    vol = ndimage.gaussian_filter(vol, 1.5)
    return (vol / vol.max()).astype(np.float32)


def volume_pair():
    """A 3D volume with anisotropic voxels (2 x 1 x 1 world units) and a rigidly moved
    copy (5 degrees about the plane axis, shifted by (3, -4, 2.5) world units)."""
    spacing = (2.0, 1.0, 1.0)
    fixed = blobs_volume()
    centre = (np.array(fixed.shape) - 1) / 2 * np.array(spacing)
    a = np.deg2rad(5.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    truth = Transform.from_linear(rot, centre, shift=(3.0, -4.0, 2.5))
    moving = _warp_by_truth(fixed, truth, output_spacing=spacing, input_spacing=spacing)
    return fixed, moving.astype(np.float32), truth, spacing


def grid_points(shape, spacing=None, n: int = 7, margin: float = 0.15) -> np.ndarray:
    """A regular grid of world points inside the image (for TRE)."""
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    axes = [np.linspace(margin * (s - 1), (1 - margin) * (s - 1), n) for s in shape]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in mesh], axis=1) * spacing


def rigid_drift_stack(base, angles, shifts, corner, size: int):
    """Frames of ``size`` x ``size`` cut from ``base`` at ``corner`` (row, col), frame k
    turned by ``angles[k]`` degrees about the frame centre and shifted by ``shifts[k]``;
    returns the float32 stack and the truths (frame k world -> frame 0 world).
    ``angles[0]``/``shifts[0]`` should be 0 so that frame 0 is the reference."""
    to_corner = Transform.from_translation(np.asarray(corner, float)).matrix
    centre = (np.full(2, size) - 1) / 2
    frames, truths = [], []
    for a, s in zip(angles, shifts):
        truth = Transform.from_rotation(float(a), center=centre, shift=s)
        # frame_k(p) = frame_0(truth(p)) = base(truth(p) + corner): resample pulls back
        # through the inverse of the transform it is given
        to_base = to_corner @ truth.matrix
        frames.append(resample(base, Transform(np.linalg.inv(to_base)), (size, size), order=3))
        truths.append(truth)
    return np.stack(frames).astype(np.float32), truths


def tre_against_truth(estimated: Transform, truth: Transform, fixed_points) -> dict:
    """TRE (world units) of an estimated moving -> fixed transform: fixed points are
    sent to the moving image by the truth and brought back by the estimate."""
    from .core.metrics import tre

    moving_points = truth.apply_inverse(fixed_points)
    return tre(estimated.apply(moving_points), fixed_points)
