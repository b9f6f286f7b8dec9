"""The transform model.

A :class:`Transform` maps **moving world coordinates to fixed world coordinates**, in
napari's axis order ((row, col) or (plane, row, col)), where world = index * spacing +
origin. It is the same direction as napari's ``layer.affine``: showing the moving layer
with ``transform.matrix @ moving_layer.affine.affine_matrix`` lines it up with the fixed
layer without resampling.

A transform is a chain of *steps* applied in order to moving points. Each step knows
both directions:

* ``forward(points)``: moving side -> fixed side (what :meth:`Transform.apply` does);
* ``backward(points)``: fixed side -> moving side (what resampling needs: for every
  fixed grid point, where to sample the moving image).

Linear steps are homogeneous matrices; deformable steps (a displacement field, a
thin-plate spline) store whichever direction their algorithm produced and compute the
other one iteratively. New step kinds register themselves with :func:`register_step`,
which keeps JSON round-trips working for them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "Transform",
    "Step",
    "MatrixStep",
    "FieldStep",
    "register_step",
    "save_transform",
    "load_transform",
]

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- helpers
def _as_points(points: Any, ndim: int) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    single = pts.ndim == 1
    if single:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != ndim:
        raise ValueError(
            f"points must have shape (N, {ndim}) in napari axis order for a {ndim}D "
            f"transform; got shape {np.shape(points)}"
        )
    return pts


def encode_array(array: np.ndarray) -> dict:
    """JSON-safe encoding of an array (base64 of little-endian bytes)."""
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<")
    return {
        "dtype": dtype.str,
        "shape": list(array.shape),
        "data": base64.b64encode(array.astype(dtype, copy=False).tobytes()).decode("ascii"),
    }


def decode_array(obj: dict) -> np.ndarray:
    try:
        raw = base64.b64decode(obj["data"])
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"corrupt array in transform data: {err}") from None


def translation_matrix(offset: Sequence[float]) -> np.ndarray:
    offset = np.asarray(offset, dtype=float)
    m = np.eye(offset.size + 1)
    m[:-1, -1] = offset
    return m


def scale_matrix(scale: Sequence[float]) -> np.ndarray:
    scale = np.asarray(scale, dtype=float)
    return np.diag(np.append(scale, 1.0))


# ----------------------------------------------------------------------------- steps
class Step:
    """One stage of a transform chain. Subclasses implement both directions."""

    kind: str = "abstract"
    ndim: int
    linear: bool = False

    def forward(self, points: np.ndarray) -> np.ndarray:  # moving side -> fixed side
        raise NotImplementedError

    def backward(self, points: np.ndarray) -> np.ndarray:  # fixed side -> moving side
        raise NotImplementedError

    def inverse(self) -> "Step":
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        raise NotImplementedError


_STEP_KINDS: dict[str, type[Step]] = {}
# step kinds defined in modules of their own, imported when a transform needs them
_LAZY_STEP_MODULES = {"tps": "napari_registration.core.tps"}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step kind known to :meth:`Transform.from_dict`."""
    _STEP_KINDS[cls.kind] = cls
    return cls


@register_step
class MatrixStep(Step):
    """A linear (affine or projective) step: a homogeneous (D+1, D+1) matrix."""

    kind = "matrix"
    linear = True

    def __init__(self, matrix: Any):
        try:
            m = np.array(matrix, dtype=float)
        except (TypeError, ValueError):
            raise ValueError("a transform matrix must be a square (D+1, D+1) array of numbers; "
                             f"got {str(matrix)[:80]!r}") from None
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
            raise ValueError(f"a transform matrix must be square (D+1, D+1); got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("a transform matrix must contain only finite numbers")
        if abs(m[-1, -1]) < 1e-300:
            raise ValueError("a transform matrix must have a non-zero bottom-right element")
        m = m / m[-1, -1]
        if abs(np.linalg.det(m)) < 1e-12:
            raise ValueError("a transform matrix must be invertible (its determinant is ~0)")
        m.setflags(write=False)
        self.matrix = m
        self.ndim = m.shape[0] - 1

    @property
    def projective(self) -> bool:
        return not np.allclose(self.matrix[-1, :-1], 0.0)

    @staticmethod
    def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
        out = pts @ m[:-1, :-1].T + m[:-1, -1]
        # any perspective term counts: allclose() dropped terms below 1e-8, so a product
        # of two such matrices (above it) mapped points differently from the two in turn
        if np.any(m[-1, :-1] != 0.0):
            w = pts @ m[-1, :-1] + m[-1, -1]
            out = out / w[:, None]
        return out

    def forward(self, points):
        return self._apply(self.matrix, points)

    def backward(self, points):
        return self._apply(np.linalg.inv(self.matrix), points)

    def inverse(self):
        return MatrixStep(np.linalg.inv(self.matrix))

    def to_dict(self):
        return {"kind": self.kind, "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, data):
        return cls(data["matrix"])


@register_step
class FieldStep(Step):
    """A dense displacement field sampled on a regular world grid.

    ``field[..., k]`` is the world displacement along axis ``k`` at the grid point
    ``index * spacing + origin``. With ``direction="backward"`` (the default, and what
    intensity registration produces) the field maps a fixed-side point ``p`` to the
    moving-side point ``p + u(p)``; with ``direction="forward"`` it maps a moving-side
    point ``q`` to ``q + u(q)``. The other direction is found by fixed-point iteration,
    which converges for the smooth, fold-free fields registration produces.
    """

    kind = "field"

    def __init__(self, field, spacing=None, origin=None, direction="backward"):
        field = np.asarray(field, dtype=np.float32)
        if field.ndim < 3 or field.shape[-1] != field.ndim - 1:
            raise ValueError(
                "a displacement field must have shape (*grid, D) with D the number of grid "
                f"axes; got {field.shape}"
            )
        if direction not in ("backward", "forward"):
            raise ValueError("direction must be 'backward' or 'forward'")
        self.ndim = field.ndim - 1
        self.field = field
        self.spacing = np.ones(self.ndim) if spacing is None else np.asarray(spacing, float).ravel()
        self.origin = np.zeros(self.ndim) if origin is None else np.asarray(origin, float).ravel()
        if (self.spacing.size != self.ndim or self.origin.size != self.ndim
                or not np.all(np.isfinite(self.spacing)) or not np.all(self.spacing > 0)
                or not np.all(np.isfinite(self.origin))):
            raise ValueError(f"a {self.ndim}D displacement field needs {self.ndim} positive "
                             f"spacings and {self.ndim} finite origin values; got spacing "
                             f"{self.spacing.tolist()}, origin {self.origin.tolist()}")
        if not np.all(np.isfinite(field)):
            raise ValueError("a displacement field must contain only finite numbers")
        self.direction = direction

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """The field's displacement at world points (linear interpolation, edge-clamped)."""
        from scipy import ndimage

        idx = ((points - self.origin) / self.spacing).T
        out = np.empty_like(points)
        for k in range(self.ndim):
            out[:, k] = ndimage.map_coordinates(
                self.field[..., k], idx, order=1, mode="nearest"
            )
        return out

    def _direct(self, pts):
        return pts + self.displacement(pts)

    def _inverted(self, pts, iterations=50, tol=1e-4):
        # solve x + u(x) = p  by  x <- p - u(x)
        x = pts - self.displacement(pts)
        for _ in range(iterations):
            x_new = pts - self.displacement(x)
            if np.max(np.abs(x_new - x), initial=0.0) < tol * float(np.min(self.spacing)):
                return x_new
            x = x_new
        return x

    def forward(self, points):
        return self._direct(points) if self.direction == "forward" else self._inverted(points)

    def backward(self, points):
        return self._direct(points) if self.direction == "backward" else self._inverted(points)

    def inverse(self):
        other = "forward" if self.direction == "backward" else "backward"
        return FieldStep(self.field, self.spacing, self.origin, other)

    def jacobian_determinant(self) -> np.ndarray:
        """det(I + grad u) on the grid: <= 0 marks folding."""
        grads = [np.gradient(self.field[..., k], *self.spacing) for k in range(self.ndim)]
        if self.ndim == 1:
            grads = [[g] for g in grads]
        jac = np.empty(self.field.shape[:-1] + (self.ndim, self.ndim), np.float64)
        for i in range(self.ndim):
            for j in range(self.ndim):
                jac[..., i, j] = grads[i][j] + (1.0 if i == j else 0.0)
        return np.linalg.det(jac)

    def to_dict(self):
        return {
            "kind": self.kind,
            "direction": self.direction,
            "spacing": self.spacing.tolist(),
            "origin": self.origin.tolist(),
            "field": encode_array(self.field),
        }

    @classmethod
    def from_dict(cls, data):
        return cls(decode_array(data["field"]), data["spacing"], data["origin"], data["direction"])


# ------------------------------------------------------------------------- transform
class Transform:
    """A map from moving world coordinates to fixed world coordinates.

    ``Transform(matrix)`` makes a linear transform from a homogeneous (D+1, D+1) matrix
    in napari axis order; ``Transform(steps=[...])`` chains steps (applied to moving
    points in order). Transforms are immutable.

    Examples
    --------
    >>> t = Transform.from_translation([0.0, 3.0])      # moves points 3 columns right
    >>> t.apply([[10.0, 10.0]])
    array([[10., 13.]])
    """

    def __init__(self, matrix: Any = None, *, steps: Sequence[Step] | None = None):
        if (matrix is None) == (steps is None):
            raise ValueError("give either a matrix or a list of steps")
        if matrix is not None:
            steps = [matrix if isinstance(matrix, Step) else MatrixStep(matrix)]
        steps = list(steps)
        if not steps:
            raise ValueError("a transform needs at least one step")
        ndims = {s.ndim for s in steps}
        if len(ndims) != 1:
            raise ValueError(f"all steps of a transform must have the same dimension; got {ndims}")
        self._steps = tuple(self._merge(steps))

    @staticmethod
    def _merge(steps):
        merged: list[Step] = []
        for step in steps:
            if merged and merged[-1].linear and step.linear:
                merged[-1] = MatrixStep(step.matrix @ merged[-1].matrix)
            else:
                merged.append(step)
        return merged

    # ---- construction
    @classmethod
    def identity(cls, ndim: int) -> "Transform":
        return cls(np.eye(ndim + 1))

    @classmethod
    def from_translation(cls, offset: Sequence[float]) -> "Transform":
        """Transform that adds ``offset`` (napari axis order) to every moving point."""
        return cls(translation_matrix(offset))

    @classmethod
    def from_scale(cls, scale: Sequence[float]) -> "Transform":
        return cls(scale_matrix(scale))

    @classmethod
    def from_linear(cls, linear, center=None, shift=None) -> "Transform":
        """Apply the (D, D) matrix ``linear`` about ``center`` (world, default the
        origin), then add ``shift``: p -> linear @ (p - center) + center + shift."""
        lin = np.asarray(linear, float)
        d = lin.shape[0]
        center = np.zeros(d) if center is None else np.asarray(center, float)
        shift = np.zeros(d) if shift is None else np.asarray(shift, float)
        m = np.eye(d + 1)
        m[:d, :d] = lin
        m[:d, d] = center - lin @ center + shift
        return cls(m)

    @classmethod
    def from_rotation(cls, angle_deg: float, center=(0.0, 0.0), scale: float = 1.0,
                      shift=(0.0, 0.0)) -> "Transform":
        """2D similarity: rotate by ``angle_deg`` (counter-clockwise as displayed, i.e.
        from +col towards -row) and scale about ``center``, then shift."""
        a = np.deg2rad(angle_deg)
        c, s = np.cos(a) * scale, np.sin(a) * scale
        # (row, col): display y points down, so counter-clockwise on screen is
        # row' = c*row - s*col, col' = s*row + c*col
        return cls.from_linear([[c, -s], [s, c]], center, shift)

    # ---- properties
    @property
    def steps(self) -> tuple[Step, ...]:
        return self._steps

    @property
    def ndim(self) -> int:
        return self._steps[0].ndim

    @property
    def is_linear(self) -> bool:
        return len(self._steps) == 1 and self._steps[0].linear

    @property
    def matrix(self) -> np.ndarray | None:
        """(D+1, D+1) homogeneous matrix for a linear transform, ``None`` otherwise."""
        return self._steps[0].matrix if self.is_linear else None

    @property
    def is_projective(self) -> bool:
        return self.is_linear and self._steps[0].projective

    @property
    def kind(self) -> str:
        if self.is_linear:
            return "projective" if self.is_projective else "affine"
        return "+".join(s.kind for s in self._steps)

    # ---- mapping
    def apply(self, points: Any) -> np.ndarray:
        """Map (N, D) moving world points to fixed world points."""
        pts = _as_points(points, self.ndim)
        for step in self._steps:
            pts = step.forward(pts)
        return pts

    __call__ = apply

    def apply_inverse(self, points: Any) -> np.ndarray:
        """Map (N, D) fixed world points to moving world points."""
        pts = _as_points(points, self.ndim)
        for step in reversed(self._steps):
            pts = step.backward(pts)
        return pts

    def inverse(self) -> "Transform":
        """The transform mapping fixed world -> moving world."""
        return Transform(steps=[s.inverse() for s in reversed(self._steps)])

    def then(self, other: "Transform") -> "Transform":
        """``self`` followed by ``other``: ``a.then(b).apply(p) == b.apply(a.apply(p))``."""
        if other.ndim != self.ndim:
            raise ValueError(f"cannot chain a {self.ndim}D and a {other.ndim}D transform")
        return Transform(steps=[*self._steps, *other._steps])

    def __matmul__(self, other: "Transform") -> "Transform":
        """Matrix-style composition: ``(a @ b).apply(p) == a.apply(b.apply(p))``."""
        return other.then(self)

    # ---- serialisation
    def to_dict(self) -> dict:
        return {
            "type": "napari-registration transform",
            "version": FORMAT_VERSION,
            "convention": "maps moving world -> fixed world; napari axis order; world = index*scale + translate",
            "ndim": self.ndim,
            "kind": self.kind,
            "matrix": None if self.matrix is None else self.matrix.tolist(),
            "steps": [s.to_dict() for s in self._steps],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Transform":
        if not isinstance(data, dict) or "steps" not in data:
            raise ValueError(
                "not a napari-registration transform: expected a dict with 'steps' "
                "(as written by Transform.to_dict or save_transform)"
            )
        if not isinstance(data["steps"], (list, tuple)):
            raise ValueError("corrupt transform data: 'steps' must be a list of steps; got "
                             f"{type(data['steps']).__name__}")
        steps = []
        for sd in data["steps"]:
            kind = sd.get("kind") if isinstance(sd, dict) else None
            if kind not in _STEP_KINDS and kind in _LAZY_STEP_MODULES:
                import importlib

                importlib.import_module(_LAZY_STEP_MODULES[kind])
            if kind not in _STEP_KINDS:
                raise ValueError(
                    f"unknown transform step kind {kind!r}; known: {sorted(_STEP_KINDS)}"
                )
            try:
                steps.append(_STEP_KINDS[kind].from_dict(sd))
            except (KeyError, TypeError, IndexError) as err:
                raise ValueError(f"corrupt {kind!r} step in transform data: {err!r}") from None
            except ValueError as err:
                raise ValueError(f"corrupt {kind!r} step in transform data: {err}") from None
        return cls(steps=steps)

    def __eq__(self, other):
        if not isinstance(other, Transform):
            return NotImplemented
        return json.dumps(self.to_dict(), sort_keys=True) == json.dumps(other.to_dict(), sort_keys=True)

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self):
        if self.is_linear:
            body = np.array2string(self.matrix, precision=4, suppress_small=True)
            return f"Transform({self.ndim}D {self.kind}, matrix=\n{body})"
        return f"Transform({self.ndim}D {self.kind})"


# -------------------------------------------------------------------------------- I/O
def save_transform(transform: Transform, path: str | Path) -> Path:
    """Write a transform to ``.json`` (any kind) or ITK ``.tfm`` / ``.txt`` / ``.h5`` (linear).

    The ITK file follows ITK's resampling convention: it maps *fixed* physical points
    (x, y[, z]) to *moving* physical points, so
    ``sitk.Resample(moving, fixed, sitk.ReadTransform(path))`` reproduces our warped image.
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"save_transform needs a Transform, got {type(transform).__name__}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(transform.to_dict(), indent=1))
        return path
    if suffix in (".tfm", ".txt", ".h5", ".hdf5", ".mat"):
        from .itk import write_itk_transform

        write_itk_transform(transform, path)
        return path
    raise ValueError(f"unknown transform file type {suffix!r}: use .json, .tfm, .txt or .h5")


def load_transform(path: str | Path) -> Transform:
    """Read a transform written by :func:`save_transform` (JSON) or by ITK/3D Slicer."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"transform file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the transform file inside it (e.g. "
                         f"{path / 'transform.json'})")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); was it written by save_transform?") from None
        if isinstance(data, dict) and "transform" in data and "steps" not in data:
            data = data["transform"]  # a whole RegistrationResult.to_dict()
        return Transform.from_dict(data)
    if suffix in (".tfm", ".txt", ".h5", ".hdf5", ".mat"):
        from .itk import read_itk_transform

        return read_itk_transform(path)
    raise ValueError(f"unknown transform file type {suffix!r}: use .json, .tfm, .txt or .h5")
