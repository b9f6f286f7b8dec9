"""Cases for the accuracy-and-speed report: real images shipped inside PyPI packages
(scikit-image photos, the MNI152 brain templates bundled with nilearn, scikit-image's
stereo pair with its ground-truth disparity) and controlled synthetic changes, each with
a known ground-truth transform.

Every case carries ``truth``: a :class:`napari_registration.Transform` mapping MOVING
world -> FIXED world (napari axis order), and ``points``: world points of the fixed
image (a regular grid inside the overlap, 15 % margin) where the TRE is measured.
A stack case carries ``frames`` and one truth per frame (frame k -> frame 0).

Moving images are made by pulling the fixed image through the truth with cubic
interpolation: ``moving(q) = fixed(truth(q))``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from napari_registration import Transform
from napari_registration.core.resample import resample
from napari_registration.core.transform import FieldStep
from napari_registration.data import grid_points


@dataclass
class Case:
    name: str
    title: str
    source: str                 # where the image comes from
    model: str                  # translation | rigid | similarity | affine | homography | deformable
    modality: str = "mono"      # mono | multi
    fixed: np.ndarray | None = None
    moving: np.ndarray | None = None
    truth: Transform | None = None
    spacing: tuple = (1.0, 1.0)
    points: np.ndarray | None = None
    frames: np.ndarray | None = None      # stack cases: (T, *frame)
    truths: list = field(default_factory=list)
    note: str = ""

    @property
    def ndim(self) -> int:
        return (self.frames.ndim - 1) if self.frames is not None else self.fixed.ndim

    @property
    def is_stack(self) -> bool:
        return self.frames is not None

    @property
    def shape(self) -> tuple:
        return tuple(self.frames.shape[1:]) if self.is_stack else tuple(self.fixed.shape)

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "source": self.source,
                "model": self.model, "modality": self.modality, "ndim": self.ndim,
                "shape": list(self.shape), "spacing": list(self.spacing),
                "frames": int(self.frames.shape[0]) if self.is_stack else None,
                "n_points": int(len(self.points)), "note": self.note}


# ---------------------------------------------------------------------------- helpers
def _unit(a) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return ((a - a.min()) / np.ptp(a)).astype(np.float32)


def _moving_from(fixed, truth, spacing=None):
    sp = None if spacing is None else tuple(spacing)
    out = resample(fixed, truth.inverse(), fixed.shape, order=3, output_spacing=sp, input_spacing=sp)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _centre(shape, spacing=None) -> np.ndarray:
    sp = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    return (np.array(shape) - 1) / 2 * sp


def _affine_about(linear, centre, shift) -> Transform:
    d = len(centre)
    m = np.eye(d + 1)
    m[:d, :d] = linear
    m[:d, d] = centre - linear @ centre + np.asarray(shift, float)
    return Transform(m)


def _rot3(ax_deg) -> np.ndarray:
    """Rotation from three angles (degrees) about axes 0, 1, 2 (napari order)."""
    out = np.eye(3)
    for axis, deg in enumerate(ax_deg):
        a = np.deg2rad(deg)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _grey(rgb) -> np.ndarray:
    from skimage import color

    return _unit(color.rgb2gray(rgb))


def _downscale(a, factor) -> np.ndarray:
    from skimage.transform import downscale_local_mean

    return _unit(downscale_local_mean(np.asarray(a, np.float32), factor))


def mni_template(kind: str = "t1") -> np.ndarray | None:
    """The MNI152 (2009a) template that nilearn ships as package data (197x233x189,
    1 mm), or None when nilearn is not installed."""
    try:
        import nibabel as nib
        import nilearn
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")
    hits = glob.glob(os.path.join(folder, f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii*"))
    if not hits:
        return None
    vol = np.asarray(nib.load(hits[0]).dataobj, dtype=np.float32)
    # nibabel gives (x, y, z) = (R->L, P->A, I->S); make it (plane=z, row=y, col=x)
    return np.ascontiguousarray(np.transpose(vol, (2, 1, 0))[::-1, ::-1, :])


# ------------------------------------------------------------------------------ 2D
def camera_translation(size: int = 512) -> Case:
    from skimage import data

    fixed = _unit(data.camera())
    if size != fixed.shape[0]:
        fixed = _downscale(fixed, (fixed.shape[0] // size,) * 2)
    truth = Transform.from_translation(np.array([7.3, -11.6]) * size / 512)
    return Case("camera_translation", "camera, sub-pixel shift", "skimage.data.camera",
                "translation", fixed=fixed, moving=_moving_from(fixed, truth), truth=truth)


def coins_rigid() -> Case:
    from skimage import data

    fixed = _unit(data.coins())
    truth = Transform.from_rotation(10.0, center=_centre(fixed.shape), shift=(4.2, -6.5))
    return Case("coins_rigid", "coins, 10 deg rotation + shift", "skimage.data.coins",
                "rigid", fixed=fixed, moving=_moving_from(fixed, truth), truth=truth)


def moon_similarity() -> Case:
    from skimage import data

    fixed = _unit(data.moon())
    truth = Transform.from_rotation(7.0, center=_centre(fixed.shape), scale=1.08, shift=(-5.0, 8.5))
    return Case("moon_similarity", "moon, 7 deg + 8 % zoom + shift", "skimage.data.moon",
                "similarity", fixed=fixed, moving=_moving_from(fixed, truth), truth=truth)


def retina_affine() -> Case:
    from skimage import data

    fixed = _downscale(data.retina()[:1408, :1408, 1], (2, 2))  # green channel, 704 px
    lin = np.array([[1.04, 0.06], [-0.05, 0.96]])
    truth = _affine_about(lin, _centre(fixed.shape), (6.0, -9.0))
    return Case("retina_affine", "retina (green), affine with shear", "skimage.data.retina",
                "affine", fixed=fixed, moving=_moving_from(fixed, truth), truth=truth)


def retina_affine_acquired() -> Case:
    """The retina affine case as two acquisitions: the motion is applied at twice the
    resolution and both images are 2x block means of it, so the moving image is not an
    exact spline interpolation of the fixed one (which favours methods that interpolate
    the fixed image onto the moving grid)."""
    from skimage import data

    hi = _unit(data.retina()[:1408, :1408, 1])
    fixed = _downscale(hi, (2, 2))
    lin = np.array([[1.04, 0.06], [-0.05, 0.96]])
    truth = _affine_about(lin, _centre(fixed.shape), (6.0, -9.0))
    # low-res pixel i covers high-res pixels 2i, 2i+1: high = 2 * low + 0.5
    s = np.diag([2.0, 2.0, 1.0])
    s[:2, 2] = 0.5
    truth_hi = Transform(s @ truth.matrix @ np.linalg.inv(s))
    moving = _downscale(_moving_from(hi, truth_hi), (2, 2))
    return Case("retina_affine_acquired", "retina (green), affine with shear, both images "
                "2x block means of a finer image (held out)", "skimage.data.retina", "affine",
                fixed=fixed, moving=moving, truth=truth)


def astronaut_homography() -> Case:
    from napari_registration.data import photo_pair

    fixed, moving, truth = photo_pair()
    return Case("astronaut_homography", "astronaut, perspective view",
                "skimage.data.astronaut (napari_registration.data.photo_pair)", "homography",
                fixed=_unit(fixed), moving=np.clip(moving, 0, 1).astype(np.float32), truth=truth)


def ihc_multimodal() -> Case:
    """Hematoxylin (nuclei) channel of the IHC slide vs the slide's grey luminance, in
    which nuclei are dark and the brown DAB stain shows too: different contrast."""
    from skimage import color, data

    rgb = data.immunohistochemistry()
    fixed = _unit(color.rgb2hed(rgb)[..., 0])
    grey = _grey(rgb)
    truth = Transform.from_rotation(6.0, center=_centre(fixed.shape), shift=(5.5, -7.25))
    moving = _moving_from(grey, truth)
    return Case("ihc_multimodal", "IHC: hematoxylin channel vs RGB luminance, rigid",
                "skimage.data.immunohistochemistry + skimage.color.rgb2hed", "rigid", "multi",
                fixed=fixed, moving=moving, truth=truth)


def brain_multimodal_2d() -> Case | None:
    """An axial slice of the MNI152 T1 template vs the same slice of the grey-matter
    probability map, rigidly moved: a real multi-modal pair."""
    t1, gm = mni_template("t1"), mni_template("gm")
    if t1 is None or gm is None:
        return None
    z = 80
    fixed = _unit(t1[z])
    grey = _unit(gm[z])
    truth = Transform.from_rotation(-8.0, center=_centre(fixed.shape), shift=(-6.0, 4.5))
    return Case("brain_t1_vs_gm_2d", "MNI152 T1 slice vs grey-matter map slice, rigid",
                "nilearn MNI152 2009a templates (package data)", "rigid", "multi",
                fixed=fixed, moving=_moving_from(grey, truth), truth=truth)


def camera_noise_gamma() -> Case:
    """Rigid motion plus a non-linear intensity change (gamma 0.5, inverted) and
    Gaussian noise (sigma 0.08 of the range) on the moving image."""
    from skimage import data

    fixed = _unit(data.camera())
    truth = Transform.from_rotation(5.0, center=_centre(fixed.shape), shift=(-3.7, 6.2))
    moving = _moving_from(fixed, truth)
    rng = np.random.default_rng(7)
    moving = 1.0 - np.sqrt(moving) + rng.normal(0, 0.08, moving.shape)
    return Case("camera_noise_gamma", "camera, rigid + inverted gamma + noise",
                "skimage.data.camera", "rigid", "multi",
                fixed=fixed, moving=_unit(moving), truth=truth,
                note="moving = 1 - sqrt(I) + N(0, 0.08)")


def camera_deformable(size: int = 256) -> Case:
    """A smooth random deformation (up to ~7 px, 6x6 control grid, cubic) of the
    camera photo."""
    from scipy import ndimage
    from skimage import data

    fixed = _downscale(data.camera(), (512 // size,) * 2)
    rng = np.random.default_rng(3)
    coarse = rng.normal(0, 2.0, (6, 6, 2))
    zoom = [size / 6, size / 6, 1]
    field_ = ndimage.zoom(coarse, zoom, order=3)[:size, :size].astype(np.float32)
    # forward field: a moving point q lands on fixed point q + u(q)
    truth = Transform(steps=[FieldStep(field_, direction="forward")])
    idx = np.indices(fixed.shape).astype(np.float32)
    moving = ndimage.map_coordinates(fixed, idx + np.moveaxis(field_, -1, 0), order=3, mode="nearest")
    return Case("camera_deformable", "camera, smooth random deformation (up to ~7 px)",
                "skimage.data.camera", "deformable", fixed=fixed,
                moving=np.clip(moving, 0, 1).astype(np.float32), truth=truth,
                note=f"max displacement {float(np.abs(field_).max()):.1f} px")


def stereo_motorcycle() -> Case:
    """scikit-image's Middlebury motorcycle stereo pair (a third of its size) with its ground-truth
    disparity: the left view is fixed; a left pixel (r, c) is seen at (r, c - d) in the
    right view. Occluded pixels (no disparity) are filled from their nearest neighbour
    and excluded from the TRE points. Depth edges make the true mapping discontinuous,
    which no smooth transform can follow everywhere."""
    from scipy import ndimage
    from skimage import data

    from skimage.transform import downscale_local_mean

    left, right, disp = data.stereo_motorcycle()
    f = 3
    h, w = (np.array(disp.shape) // f) * f
    fixed = _downscale(_grey(left)[:h, :w], (f, f))
    moving = _downscale(_grey(right)[:h, :w], (f, f))
    d = np.asarray(disp, np.float64)[:h, :w]
    valid = np.isfinite(d)
    idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    d = downscale_local_mean(d[tuple(idx)], (f, f)) / f
    valid = downscale_local_mean(valid.astype(np.float32), (f, f)) > 0.999
    field_ = np.zeros(fixed.shape + (2,), np.float32)
    field_[..., 1] = -d
    # backward field: a fixed point p is seen at p + u(p) in the moving image
    truth = Transform(steps=[FieldStep(field_, direction="backward")])
    pts = grid_points(fixed.shape, n=9)
    keep = valid[tuple(np.round(pts).astype(int).T)]
    return Case("stereo_motorcycle", "stereo pair (left vs right view), true disparity",
                "skimage.data.stereo_motorcycle", "deformable",
                fixed=fixed, moving=moving, truth=truth, points=pts[keep],
                note=f"disparity {d.min():.0f}-{d.max():.0f} px at 1/{f} size")


# ------------------------------------------------------------------------------ 3D
def _brain_anisotropic():
    t1 = mni_template("t1")
    if t1 is None:
        return None, None
    # 3 mm slices, 2 mm in plane: (63, 117, 99) voxels
    vol = _downscale(t1, (3, 2, 2))
    return vol, (3.0, 2.0, 2.0)


def brain_rigid_3d() -> Case | None:
    fixed, spacing = _brain_anisotropic()
    if fixed is None:
        return None
    truth = _affine_about(_rot3((6.0, -4.0, 3.0)), _centre(fixed.shape, spacing), (4.0, -5.0, 3.5))
    return Case("brain_rigid_3d", "MNI152 T1, 3x2x2 mm voxels, rigid (6/-4/3 deg)",
                "nilearn MNI152 2009a T1 template (package data)", "rigid",
                fixed=fixed, moving=_moving_from(fixed, truth, spacing), truth=truth, spacing=spacing)


def brain_affine_3d() -> Case | None:
    fixed, spacing = _brain_anisotropic()
    if fixed is None:
        return None
    lin = _rot3((3.0, 2.0, -4.0)) @ np.array([[1.05, 0.03, 0.0], [0.0, 0.95, 0.04], [-0.02, 0.0, 1.03]])
    truth = _affine_about(lin, _centre(fixed.shape, spacing), (-3.0, 4.0, -2.5))
    return Case("brain_affine_3d", "MNI152 T1, 3x2x2 mm voxels, affine (scale + shear)",
                "nilearn MNI152 2009a T1 template (package data)", "affine",
                fixed=fixed, moving=_moving_from(fixed, truth, spacing), truth=truth, spacing=spacing)


def _brain_deformed(name, title, seed, amplitude, cells=5) -> Case | None:
    """MNI152 T1 at 3x2x2 mm under a smooth random forward field (``cells``^3 control
    values drawn with sd ``amplitude`` mm, cubic)."""
    from scipy import ndimage

    fixed, spacing = _brain_anisotropic()
    if fixed is None:
        return None
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, amplitude, (cells, cells, cells, 3))
    zoom = [n / cells for n in fixed.shape]
    # per component (a 4D zoom with factor 1 on the last axis gives the same field at
    # ~8x the time)
    field_mm = np.stack([ndimage.zoom(coarse[..., k], zoom, order=3) for k in range(3)], axis=-1)
    field_mm = field_mm[:fixed.shape[0], :fixed.shape[1], :fixed.shape[2]]
    truth = Transform(steps=[FieldStep(field_mm.astype(np.float32), spacing=spacing,
                                       direction="forward")])
    return Case(name, title, "nilearn MNI152 2009a T1 template (package data)", "deformable",
                fixed=fixed, moving=_moving_from(fixed, truth, spacing), truth=truth,
                spacing=spacing, note=f"max displacement {float(np.abs(field_mm).max()):.1f} mm")


def brain_deformable_3d() -> Case | None:
    """MNI152 T1 at 3x2x2 mm under a smooth random field (5^3 control values, sd 2.5 mm,
    up to ~6 mm)."""
    return _brain_deformed("brain_deformable_3d", "MNI152 T1, 3x2x2 mm, smooth random deformation",
                           seed=5, amplitude=2.5)


def blobs_rigid_3d() -> Case:
    from napari_registration.data import volume_pair

    fixed, moving, truth, spacing = volume_pair()
    return Case("blobs_rigid_3d", "synthetic blobs, 2x1x1 voxels, rigid (5 deg)",
                "napari_registration.data.volume_pair (generated)", "rigid",
                fixed=fixed, moving=np.clip(moving, 0, 1).astype(np.float32), truth=truth,
                spacing=spacing)


# ------------------------------------------------- held out (never tuned on; issue #15)
def astronaut_rigid() -> Case:
    """Held out while tuning: a photo with texture and flat areas, rigid."""
    from skimage import data

    fixed = _grey(data.astronaut())
    truth = Transform.from_rotation(12.0, center=_centre(fixed.shape), shift=(-7.4, 5.8))
    return Case("astronaut_rigid", "astronaut, 12 deg rotation + shift (held out)",
                "skimage.data.astronaut", "rigid", fixed=fixed,
                moving=_moving_from(fixed, truth), truth=truth)


def chelsea_similarity() -> Case:
    """Held out while tuning: the cat photo, rotated and shrunk."""
    from skimage import data

    fixed = _grey(data.chelsea())
    truth = Transform.from_rotation(-5.0, center=_centre(fixed.shape), scale=0.94, shift=(4.1, 6.3))
    return Case("chelsea_similarity", "chelsea (cat), -5 deg + 6 % shrink + shift (held out)",
                "skimage.data.chelsea", "similarity", fixed=fixed,
                moving=_moving_from(fixed, truth), truth=truth)


def brain_rigid_2mm() -> Case | None:
    """Held out while tuning: the MNI152 T1 at 2 mm isotropic voxels (the issue's 3D
    same-contrast rigid case), a different rotation than brain_rigid_3d."""
    t1 = mni_template("t1")
    if t1 is None:
        return None
    spacing = (2.0, 2.0, 2.0)
    fixed = _downscale(t1, (2, 2, 2))
    truth = _affine_about(_rot3((-5.0, 7.0, 4.0)), _centre(fixed.shape, spacing), (-3.0, 4.5, 5.0))
    return Case("brain_rigid_2mm", "MNI152 T1, 2 mm voxels, rigid (-5/7/4 deg) (held out)",
                "nilearn MNI152 2009a T1 template (package data)", "rigid",
                fixed=fixed, moving=_moving_from(fixed, truth, spacing), truth=truth, spacing=spacing)


def brain_t1_vs_gm_3d() -> Case | None:
    """Held out while tuning: 3D multi-modal rigid, T1 (fixed) vs grey-matter map."""
    t1, gm = mni_template("t1"), mni_template("gm")
    if t1 is None or gm is None:
        return None
    fixed = _downscale(t1, (3, 2, 2))
    grey = _downscale(gm, (3, 2, 2))
    spacing = (3.0, 2.0, 2.0)
    truth = _affine_about(_rot3((4.0, 6.0, -5.0)), _centre(fixed.shape, spacing), (3.0, -4.0, 5.5))
    return Case("brain_t1_vs_gm_3d", "MNI152 T1 vs grey-matter map, 3x2x2 mm, rigid (held out)",
                "nilearn MNI152 2009a templates (package data)", "rigid", "multi",
                fixed=fixed, moving=_moving_from(grey, truth, spacing), truth=truth, spacing=spacing)


def cell_deformable() -> Case:
    """A smooth random deformation (up to ~6 px, 5x5 control grid, cubic) of scikit-image's
    phase-contrast cell image at half size: microscopy, not a photo, and a field drawn
    with another seed than camera_deformable's (held out)."""
    from scipy import ndimage
    from skimage import data

    fixed = _downscale(data.cell(), (2, 2))
    shape = fixed.shape
    rng = np.random.default_rng(19)
    coarse = rng.normal(0, 2.8, (5, 5, 2))
    field_ = ndimage.zoom(coarse, [shape[0] / 5, shape[1] / 5, 1], order=3)
    field_ = field_[:shape[0], :shape[1]].astype(np.float32)
    # forward field: a moving point q lands on fixed point q + u(q)
    truth = Transform(steps=[FieldStep(field_, direction="forward")])
    idx = np.indices(shape).astype(np.float32)
    moving = ndimage.map_coordinates(fixed, idx + np.moveaxis(field_, -1, 0), order=3, mode="nearest")
    return Case("cell_deformable", "cells (phase contrast), smooth random deformation (held out)",
                "skimage.data.cell", "deformable", fixed=fixed,
                moving=np.clip(moving, 0, 1).astype(np.float32), truth=truth,
                note=f"max displacement {float(np.abs(field_).max()):.1f} px")


def brain_deformable_3d_b() -> Case | None:
    """Another smooth random field on the 3x2x2 mm MNI152 T1: other seed, 6^3 control
    values, sd 3 mm (held out)."""
    return _brain_deformed("brain_deformable_3d_b",
                           "MNI152 T1, 3x2x2 mm, another smooth random deformation (held out)",
                           seed=23, amplitude=3.0, cells=6)


def camera_rotation_150() -> Case:
    """A large rotation (150 degrees) of a real photo, with its background: what a
    local optimiser does not reach unless its start search covers it."""
    from skimage import data

    fixed = _downscale(data.camera(), (2, 2))  # 256 x 256
    truth = Transform.from_rotation(150.0, center=_centre(fixed.shape), shift=(3.5, -2.5))
    return Case("camera_rotation_150", "camera, 150 deg rotation + shift", "skimage.data.camera",
                "rigid", fixed=fixed, moving=_moving_from(fixed, truth), truth=truth)


HELD_OUT = ("astronaut_rigid", "chelsea_similarity", "brain_rigid_2mm", "brain_t1_vs_gm_3d",
            "retina_affine_acquired", "cell_deformable", "brain_deformable_3d_b")


# ---------------------------------------------------------------------------- stack
def moon_stack(n_frames: int = 12, size: int = 256) -> Case:
    """A drifting time-lapse: frames cut from the moon photo along a random walk
    (sub-pixel steps), each with its own noise. Frame 0 is the reference."""
    from skimage import data

    base = _unit(data.moon())
    rng = np.random.default_rng(11)
    steps = rng.normal(0, 1.5, (n_frames, 2))
    steps[0] = 0
    drift = np.cumsum(steps, axis=0)
    y0 = (base.shape[0] - size) / 2
    frames, truths = [], []
    for k in range(n_frames):
        # frame k shows base at (index + y0 + drift_k); frame 0 at (index + y0)
        # => a frame-k point q is frame-0 point q + drift_k
        truth = Transform.from_translation(drift[k])
        frame = resample(base, Transform.from_translation(-(y0 + drift[k])), (size, size), order=3)
        frame = frame + rng.normal(0, 0.03, frame.shape)
        frames.append(frame.astype(np.float32))
        truths.append(truth)
    frames = np.stack(frames)
    return Case("moon_stack", f"time-lapse of {n_frames} frames drifting (random walk) + noise",
                "skimage.data.moon", "translation", frames=frames, truths=truths,
                points=grid_points((size, size)),
                note=f"max drift {float(np.abs(drift).max()):.1f} px")


# ---------------------------------------------------------------------------- lists
ALL = [camera_translation, coins_rigid, moon_similarity, retina_affine, astronaut_homography,
       ihc_multimodal, brain_multimodal_2d, camera_noise_gamma, camera_deformable,
       stereo_motorcycle, brain_rigid_3d, brain_affine_3d, moon_stack,
       camera_rotation_150, astronaut_rigid, chelsea_similarity, brain_rigid_2mm,
       brain_t1_vs_gm_3d, retina_affine_acquired, cell_deformable, brain_deformable_3d,
       brain_deformable_3d_b]
# blobs_rigid_3d is in QUICK only: it needs no neuroimaging package, and brain_rigid_3d
# covers 3D rigid with real anatomy in the full report
QUICK = [camera_translation, coins_rigid, ihc_multimodal, blobs_rigid_3d, moon_stack]


# builders whose case carries another name (both are accepted by report.py --cases)
CASE_NAMES = {"brain_multimodal_2d": "brain_t1_vs_gm_2d"}


def build(builders) -> tuple[list[Case], list[str]]:
    """Build cases; return them and the names of builders that were skipped (their data
    package is not installed)."""
    cases, skipped = [], []
    for b in builders:
        case = b()
        if case is None:
            skipped.append(b.__name__)
            continue
        if case.points is None:
            case.points = grid_points(case.shape, case.spacing)
        cases.append(case)
    return cases, skipped
