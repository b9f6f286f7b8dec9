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


def _flatten(tx, depth: int = 0):
    sitk = _sitk()
    if depth > 8:
        raise ValueError("ITK composite transforms nested more than 8 deep are not supported")
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        out = []
        for i in range(comp.GetNumberOfTransforms()):
            out.extend(_flatten(comp.GetNthTransform(i), depth + 1))
        return out
    part = tx.Downcast()
    if part.GetName() == "CompositeTransform":  # Downcast did not know the type
        raise ValueError(f"unsupported ITK transform type {tx.GetName()!r}")
    return [part]


def from_sitk_transform(tx, ndim: int | None = None, reference=None) -> Transform:
    """An ITK transform (fixed physical -> moving physical) as our Transform (moving -> fixed).

    Linear parts become matrices; displacement fields become field steps; any other
    deformable transform (e.g. B-spline) is sampled to a displacement field on
    ``reference`` (a SimpleITK image giving the fixed grid) or on its own domain.
    """
    sitk = _sitk()
    parts = _flatten(tx)
    dims = {p.GetDimension() for p in parts} | {tx.GetDimension()} | ({ndim} if ndim else set())
    if len(dims) != 1:
        # e.g. a 2D composite wrapping a 3D affine: refused, never read as an identity
        raise ValueError(f"the ITK transform mixes parts of dimensions {sorted(dims)}; all parts "
                         "must have the same dimension")
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


# ------------------------------------------------------------- untrusted ITK files
# ITK's readers trust their input: a NaN or a missing parameter list segfaults them, an
# unknown type can recurse without end. Every file is checked here first, in Python.
MAX_ITK_FILE_BYTES = 256 * 1024 * 1024
MAX_ITK_TRANSFORMS = 64
MAX_BSPLINE_PARAMETERS = 30_000_000

# type name -> {dimension: (allowed parameter counts, allowed fixed-parameter counts)}
_ITK_TYPES = {
    "AffineTransform": {2: ({6}, {2}), 3: ({12}, {3})},
    "MatrixOffsetTransformBase": {2: ({6}, {2}), 3: ({12}, {3})},
    "TranslationTransform": {2: ({2}, {0}), 3: ({3}, {0})},
    "IdentityTransform": {2: ({0}, {0}), 3: ({0}, {0})},
    "ScaleTransform": {2: ({2}, {0, 2}), 3: ({3}, {0, 3})},
    "Euler2DTransform": {2: ({3}, {2})},
    "Similarity2DTransform": {2: ({4}, {2})},
    "Euler3DTransform": {3: ({6}, {3, 4})},
    "VersorTransform": {3: ({3}, {3})},
    "VersorRigid3DTransform": {3: ({6}, {3})},
    "Similarity3DTransform": {3: ({7}, {3})},
    "ScaleVersor3DTransform": {3: ({9}, {3})},
    "ScaleSkewVersor3DTransform": {3: ({15}, {3})},
    "BSplineTransform": {2: (None, {10}), 3: (None, {18})},
}
_VERSOR_TYPES = ("VersorTransform", "VersorRigid3DTransform", "ScaleVersor3DTransform",
                 "ScaleSkewVersor3DTransform")


def _numbers(text: str, what: str, path) -> list[float]:
    values = []
    for token in text.split():
        try:
            v = float(token)
        except ValueError:
            raise ValueError(f"{what} holds {token[:30]!r}, which is not a number") from None
        if not np.isfinite(v):
            raise ValueError(f"{what} holds {token[:30]!r}; a transform file must contain "
                             "only finite numbers")
        values.append(v)
    return values


def validate_itk_text(path, text: str) -> int:
    """Check an ITK text transform file (``.tfm`` / ``.txt``) before ITK reads it:
    known transform types only, one dimension (2 or 3) throughout, the parameter counts
    each type needs, finite numbers, sizes within the stated limits. Returns the
    dimension; raises ValueError saying what is wrong."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError("no '#Insight Transform File' header; expected an ITK .tfm/.txt "
                         "file, e.g. written by save_transform or 3D Slicer")
    blocks: list[dict] = []
    for ln in lines[1:]:
        if ln.startswith("#"):
            continue
        key, sep, value = ln.partition(":")
        key = key.strip()
        if not sep or key not in ("Transform", "Parameters", "FixedParameters"):
            raise ValueError(f"unexpected line "
                             f"{ln[:60]!r}")
        if key == "Transform":
            blocks.append({"name": value.strip()})
            if len(blocks) > MAX_ITK_TRANSFORMS:
                raise ValueError(f"the file holds more than {MAX_ITK_TRANSFORMS} transforms; "
                                 "that is the most this reader accepts")
        elif not blocks or key in blocks[-1]:
            raise ValueError(f"{key!r} without its own "
                             "'Transform:' line")
        else:
            blocks[-1][key] = value
    if not blocks:
        raise ValueError("it holds no 'Transform:' line")
    dims = set()
    for k, block in enumerate(blocks):
        dims.add(_check_itk_block(path, k, block, composite_ok=(k == 0 and len(blocks) > 1)))
    if len(dims) != 1:
        raise ValueError(f"the file mixes transforms of dimensions {sorted(dims)}; all parts of a "
                         "transform must have the same dimension")
    return dims.pop()


def _check_itk_block(path, k, block, composite_ok) -> int:
    import re

    name = block["name"]
    match = re.fullmatch(r"([A-Za-z0-9]+)_(double|float)_(\d+)_(\d+)", name)
    if not match:
        raise ValueError(f"transform {k} has the malformed type {name[:60]!r}")
    kind, _, din, dout = match.groups()
    if din != dout or int(din) not in (2, 3):
        raise ValueError(f"transform {k} ({name}) maps {din}D to {dout}D; only 2D->2D "
                         "and 3D->3D transforms are supported")
    d = int(din)
    if kind == "CompositeTransform":
        if not composite_ok:
            raise ValueError("a CompositeTransform may only come first, with parts "
                             "after it (nested or empty composites are not supported)")
        return d
    if kind not in _ITK_TYPES or d not in _ITK_TYPES[kind]:
        known = ", ".join(sorted(_ITK_TYPES))
        raise ValueError(f"transform {k} has type {name!r}, which this reader does not "
                         f"support; supported: {known} (2D or 3D as ITK defines them)")
    if "Parameters" not in block or "FixedParameters" not in block:
        raise ValueError(f"transform {k} ({name}) needs both a 'Parameters:' and a "
                         "'FixedParameters:' line")
    params = _numbers(block["Parameters"], f"transform {k} Parameters", path)
    fixed = _numbers(block["FixedParameters"], f"transform {k} FixedParameters", path)
    counts, fixed_counts = _ITK_TYPES[kind][d]
    if len(fixed) not in fixed_counts:
        raise ValueError(f"transform {k} ({name}) has {len(fixed)} fixed parameters; "
                         f"it needs {' or '.join(map(str, sorted(fixed_counts)))}")
    if kind == "BSplineTransform":
        size = fixed[:d]
        if not all(s >= 1 and float(s).is_integer() for s in size):
            raise ValueError(f"transform {k} (B-spline) has grid size {size}; it must be "
                             "positive whole numbers")
        spacing = fixed[2 * d:3 * d]
        if not all(s > 0 for s in spacing):
            raise ValueError(f"transform {k} (B-spline) has grid spacing {spacing}; it "
                             "must be positive")
        need = d * int(np.prod(size))
        if need > MAX_BSPLINE_PARAMETERS:
            raise ValueError(f"transform {k} (B-spline) has a {size} grid; at most "
                             f"{MAX_BSPLINE_PARAMETERS} parameters are accepted")
        counts = {need}
    if len(params) not in counts:
        raise ValueError(f"transform {k} ({name}) has {len(params)} parameters; it "
                         f"needs {' or '.join(map(str, sorted(counts)))}")
    if kind in _VERSOR_TYPES and float(np.sum(np.square(params[:3]))) > 1.0 + 1e-6:
        raise ValueError(f"transform {k} ({name}) has a versor of norm > 1 "
                         f"({params[:3]}); it is not a rotation")
    return d


_H5_CHECK = r"""
import sys, math
import SimpleITK as sitk
tx = sitk.ReadTransform(sys.argv[1])
dims = set()
def walk(t, depth=0):
    if depth > 4:
        raise SystemExit("nested too deep")
    if t.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(t)
        if c.GetNumberOfTransforms() > %d:
            raise SystemExit("too many transforms")
        for i in range(c.GetNumberOfTransforms()):
            walk(c.GetNthTransform(i), depth + 1)
        return
    dims.add(t.GetDimension())
    if not all(math.isfinite(v) for v in t.GetParameters() + t.GetFixedParameters()):
        raise SystemExit("non-finite numbers")
walk(tx)
dims.add(tx.GetDimension())
if len(dims) != 1:
    raise SystemExit("parts of different dimensions " + str(sorted(dims)))
""" % MAX_ITK_TRANSFORMS


def check_itk_file_in_subprocess(path, timeout: float = 60.0) -> None:
    """Binary ITK files (HDF5) cannot be checked in Python here, so ITK reads them once
    in a child process first: a crash or a hang there is a ValueError here."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _H5_CHECK, str(path)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"reading it took over {timeout:.0f} s; refused") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if proc.returncode < 0:
            why = f"it crashed ITK's reader (signal {-proc.returncode})"
        else:
            why = last or f"exit status {proc.returncode}"
        raise ValueError(why)


def read_itk_transform(path: Path) -> Transform:
    sitk = _sitk()
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_ITK_FILE_BYTES:
        raise ValueError(f"{path} is {size / 2**20:.0f} MB; ITK transform files of at most "
                         f"{MAX_ITK_FILE_BYTES // 2**20} MB are accepted")
    text = None
    if path.suffix.lower() in (".tfm", ".txt"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a transform ITK can read (not a text file); "
                             "expected an ITK .tfm/.txt file, e.g. written by save_transform "
                             "or 3D Slicer") from None
    try:
        if path.suffix.lower() in (".tfm", ".txt"):
            ndim = validate_itk_text(path, text)
        else:
            check_itk_file_in_subprocess(path)
            ndim = None
    except ValueError as err:
        raise ValueError(f"{path} is not a transform ITK can read safely: {err}") from None
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as err:
        msg = str(err).strip().splitlines()
        raise ValueError(
            f"{path} is not a transform ITK can read ({msg[-1] if msg else err}); "
            "expected an ITK .tfm/.txt/.h5 file, e.g. written by save_transform or 3D Slicer"
        ) from None
    return from_sitk_transform(tx, ndim)
