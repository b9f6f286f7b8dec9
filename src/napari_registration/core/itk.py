"""The one place where napari's conventions meet ITK's.

napari: axis order (row, col) / (plane, row, col); transforms map moving -> fixed.
ITK:    physical points (x, y[, z]) = napari world coordinates in reverse order;
        registration transforms map *fixed* physical points to *moving* ones.

Everything SimpleITK-facing goes through these functions; SimpleITK is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .transform import FieldStep, MatrixStep, Transform


def _sitk():
    import SimpleITK as sitk

    return sitk


def reverse_matrix(matrix: np.ndarray) -> np.ndarray:
    """Reorder a homogeneous matrix between napari (row, col[, ...]) and ITK (x, y[, z])
    axis order. The operation is its own inverse."""
    d = matrix.shape[0] - 1
    perm = list(range(d))[::-1] + [d]
    return np.asarray(matrix)[np.ix_(perm, perm)]


def to_sitk_image(array: np.ndarray, spacing=None, origin=None, *, is_vector: bool = False):
    """numpy array (napari axis order) -> SimpleITK image with physical geometry."""
    sitk = _sitk()
    array = np.asarray(array)
    nd = array.ndim - (1 if is_vector else 0)
    img = sitk.GetImageFromArray(array, isVector=is_vector)
    spacing = np.ones(nd) if spacing is None else np.asarray(spacing, float)
    origin = np.zeros(nd) if origin is None else np.asarray(origin, float)
    img.SetSpacing([float(s) for s in spacing[::-1]])
    img.SetOrigin([float(o) for o in origin[::-1]])
    return img


def sitk_linear_transform(backward_matrix: np.ndarray):
    """An ITK AffineTransform (fixed physical -> moving physical) from a napari-order
    homogeneous matrix that maps fixed world -> moving world."""
    sitk = _sitk()
    m = reverse_matrix(np.asarray(backward_matrix, float))
    d = m.shape[0] - 1
    if not np.allclose(m[d, :d], 0):
        raise ValueError(
            "a projective (homography) transform cannot be written as an ITK transform; "
            "save it as .json instead"
        )
    tx = sitk.AffineTransform(d)
    tx.SetMatrix([float(v) for v in m[:d, :d].ravel()])
    tx.SetTranslation([float(v) for v in m[:d, d]])
    return tx


def to_sitk_transform(transform: Transform):
    """Our transform (moving -> fixed) as an ITK transform in ITK's direction (fixed -> moving)."""
    sitk = _sitk()
    parts = []
    for step in transform.steps:  # ITK composite: last added is applied first
        if isinstance(step, MatrixStep):
            parts.append(sitk_linear_transform(np.linalg.inv(step.matrix)))
        elif isinstance(step, FieldStep) and step.direction == "backward":
            img = to_sitk_image(step.field[..., ::-1].astype(np.float64), step.spacing,
                                step.origin, is_vector=True)
            parts.append(sitk.DisplacementFieldTransform(img))
        else:
            raise ValueError(
                f"a {step.kind!r} step ({getattr(step, 'direction', '')}) has no ITK "
                "equivalent here; save the transform as .json instead"
            )
    if len(parts) == 1:
        return parts[0]
    return sitk.CompositeTransform(parts)


def _flatten(tx):
    sitk = _sitk()
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        out = []
        for i in range(comp.GetNumberOfTransforms()):
            out.extend(_flatten(comp.GetNthTransform(i)))
        return out
    return [tx.Downcast()]


def from_sitk_transform(tx, ndim: int | None = None, reference=None) -> Transform:
    """An ITK transform (fixed physical -> moving physical) as our Transform (moving -> fixed).

    Linear parts become matrices; displacement fields become field steps; any other
    deformable transform (e.g. B-spline) is sampled to a displacement field on
    ``reference`` (a SimpleITK image giving the fixed grid) or on its own domain.
    """
    sitk = _sitk()
    parts = _flatten(tx)
    steps = []
    # ITK applies the last transform first to fixed points; our steps run moving -> fixed,
    # so the ITK list order is exactly our step order (each step inverted).
    for part in parts:
        name = part.GetName()
        d = part.GetDimension()
        if hasattr(part, "GetMatrix") and hasattr(part, "GetTranslation"):
            a = np.array(part.GetMatrix(), float).reshape(d, d)
            t = np.array(part.GetTranslation(), float)
            c = np.array(part.GetCenter(), float) if hasattr(part, "GetCenter") else np.zeros(d)
            m = np.eye(d + 1)
            m[:d, :d] = a
            m[:d, d] = t + c - a @ c
            steps.append(MatrixStep(np.linalg.inv(reverse_matrix(m))))
        elif name == "TranslationTransform":
            m = np.eye(d + 1)
            m[:d, d] = part.GetOffset()
            steps.append(MatrixStep(np.linalg.inv(reverse_matrix(m))))
        elif name == "IdentityTransform":
            continue
        elif name == "DisplacementFieldTransform":
            field_img = part.GetDisplacementField()
            steps.append(_field_step_from_image(field_img))
        else:
            ref = reference
            if ref is None and hasattr(part, "GetCoefficientImages"):
                coeff = part.GetCoefficientImages()[0]
                ref = sitk.Image(coeff.GetSize(), sitk.sitkFloat32)
                ref.CopyInformation(coeff)
            if ref is None:
                raise ValueError(f"cannot convert ITK transform {name!r}; give a reference grid")
            field_img = sitk.TransformToDisplacementField(
                part, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                ref.GetSpacing(), ref.GetDirection())
            steps.append(_field_step_from_image(field_img))
    if not steps:
        dim = ndim or tx.GetDimension()
        return Transform.identity(dim)
    return Transform(steps=steps)


def _field_step_from_image(field_img) -> FieldStep:
    sitk = _sitk()
    if not np.allclose(np.array(field_img.GetDirection()), np.eye(field_img.GetDimension()).ravel()):
        raise ValueError("displacement fields with a rotated grid (direction != identity) are not supported")
    arr = sitk.GetArrayFromImage(field_img)[..., ::-1]
    return FieldStep(arr, np.array(field_img.GetSpacing())[::-1], np.array(field_img.GetOrigin())[::-1],
                     direction="backward")


def write_itk_transform(transform: Transform, path: Path) -> None:
    sitk = _sitk()
    tx = to_sitk_transform(transform)
    try:
        sitk.WriteTransform(tx, str(path))
    except RuntimeError as err:
        raise ValueError(f"could not write ITK transform to {path}: {str(err).splitlines()[-1]}") from None


def read_itk_transform(path: Path) -> Transform:
    sitk = _sitk()
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as err:
        msg = str(err).strip().splitlines()
        raise ValueError(
            f"{path} is not a transform ITK can read ({msg[-1] if msg else err}); "
            "expected an ITK .tfm/.txt/.h5 file, e.g. written by save_transform or 3D Slicer"
        ) from None
    return from_sitk_transform(tx)
