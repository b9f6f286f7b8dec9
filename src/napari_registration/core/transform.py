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
from typing import Any, Sequence

import numpy as np

from .files import write_atomic, write_text_atomic

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


# ---------------------------------------------------------- untrusted transform data
# Limits for transforms read from files or dicts; each refusal names the limit.
MAX_STEPS = 64
MAX_JSON_BYTES = 512 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_MATRIX_ABS = 1e12          # a larger matrix entry is corruption, not a coordinate
MAX_CONDITION = 1e12           # linear parts closer to singular than this are refused
MAX_TPS_POINTS = 5000
_STRING_FIELDS = ("kind", "direction")


def _number_tree(value, what: str, max_items: int = 10**8) -> np.ndarray:
    """``value`` (nested lists of numbers) as a float array; anything else (strings,
    dicts, booleans, ragged lists, non-finite or huge numbers) is a ValueError."""
    stack, count = [value], 0
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{what} must hold only numbers; found {str(v)[:40]!r}")
        count += 1
        if count > max_items:
            raise ValueError(f"{what} holds more than {max_items} numbers")
    try:
        arr = np.array(value, dtype=float)
    except (ValueError, OverflowError):
        raise ValueError(f"{what} must be a regular (rectangular) array of numbers") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must contain only finite numbers")
    return arr


def _check_matrix_values(m: np.ndarray, what: str = "a transform matrix") -> None:
    if m.ndim == 2 and m.size and np.max(np.abs(m)) > MAX_MATRIX_ABS:
        raise ValueError(f"{what} has an entry of {np.max(np.abs(m)):.3g}; entries must be at "
                         f"most {MAX_MATRIX_ABS:g} in size")
    if m.ndim == 2 and m.shape[0] == m.shape[1] and m.shape[0] >= 2:
        cond = np.linalg.cond(m[:-1, :-1])
        if not np.isfinite(cond) or cond > MAX_CONDITION:
            raise ValueError(f"{what} must be invertible, and not nearly singular: its linear "
                             f"part has condition number {cond:.3g}, above the limit "
                             f"{MAX_CONDITION:g}")


def _check_step_fields(kind: str, sd: dict) -> None:
    """Types and sizes of a step's fields, before the step's own constructor sees them."""
    for key in _STRING_FIELDS:
        if key in sd and not isinstance(sd[key], str):
            raise ValueError(f"'{key}' must be a string; got {type(sd[key]).__name__}")
    if kind == "matrix":
        m = _number_tree(sd["matrix"], "'matrix'", max_items=100)
        if m.ndim != 2 or m.shape[0] != m.shape[1] or not 2 <= m.shape[0] <= 6:
            raise ValueError(f"'matrix' must be a square (D+1, D+1) matrix, e.g. 3x3 (2D) or 4x4 "
                             f"(3D); got shape {m.shape}")
        _check_matrix_values(m)
    elif kind == "field":
        field = sd["field"]
        if not isinstance(field, dict):
            raise ValueError("'field' must be an encoded array (a dict with dtype, shape, data)")
        for key in ("dtype", "data"):
            if not isinstance(field.get(key), str):
                raise ValueError(f"'field.{key}' must be a string")
        if field["dtype"] not in ("<f4", "<f8", "|f4", "|f8", "float32", "float64"):
            raise ValueError(f"'field.dtype' must be a float type ('<f4' or '<f8'); got "
                             f"{field['dtype'][:20]!r}")
        shape = field.get("shape")
        if (not isinstance(shape, list) or not 3 <= len(shape) <= 4
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise ValueError(f"'field.shape' must be 3 or 4 positive whole numbers; got {str(shape)[:60]}")
        for key in ("spacing", "origin"):
            _number_tree(sd[key], f"'{key}'", max_items=4)
    elif kind == "tps":
        for key in ("source", "target"):
            if isinstance(sd[key], list) and len(sd[key]) > MAX_TPS_POINTS:
                raise ValueError(f"a thin-plate spline may have at most {MAX_TPS_POINTS} landmark "
                                 f"pairs; '{key}' has {len(sd[key])}")
        src = _number_tree(sd["source"], "'source'", max_items=3 * MAX_TPS_POINTS + 3)
        _number_tree(sd["target"], "'target'", max_items=3 * MAX_TPS_POINTS + 3)
        if src.ndim == 2 and len(src) > MAX_TPS_POINTS:
            raise ValueError(f"a thin-plate spline may have at most {MAX_TPS_POINTS} landmark "
                             f"pairs; this one has {len(src)}")
        if "regularization" in sd:
            _number_tree(sd["regularization"], "'regularization'", max_items=1)


def _check_header(data: dict) -> None:
    kind = data.get("type")
    if kind is not None and kind != "napari-registration transform":
        raise ValueError(f"not a napari-registration transform: 'type' is {str(kind)[:60]!r}")
    if "version" in data:
        v = data["version"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
            raise ValueError(f"unknown transform format version {json.dumps(v)[:20]}; this "
                             f"napari-registration reads version {FORMAT_VERSION} (upgrade it to "
                             "read newer files)")


def _check_visible_fields(data: dict, transform: "Transform") -> None:
    """The top-level fields a user sees and may edit must agree with the steps: an edit
    to one of them alone is refused, never silently ignored."""
    if "ndim" in data:
        nd = data["ndim"]
        if isinstance(nd, bool) or not isinstance(nd, int) or nd != transform.ndim:
            raise ValueError(f"'ndim' is {str(nd)[:20]} but the steps are {transform.ndim}D; "
                             "make them agree")
    if "kind" in data and data["kind"] != transform.kind:
        raise ValueError(f"'kind' is {str(data['kind'])[:40]!r} but the steps make a "
                         f"{transform.kind!r} transform; make them agree")
    if "matrix" in data:
        shown = data["matrix"]
        if shown is None:
            if transform.is_linear:
                raise ValueError("'matrix' is null but the steps are linear; give the matrix "
                                 "or remove the field")
            return
        if not transform.is_linear:
            raise ValueError(f"'matrix' is given but the steps make a {transform.kind!r} "
                             "transform, which has no matrix; set 'matrix' to null")
        m = _number_tree(shown, "'matrix'", max_items=100)
        if m.shape != transform.matrix.shape or not np.allclose(
                m, transform.matrix, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(m).max())):
            raise ValueError("the top-level 'matrix' disagrees with the matrix of 'steps': edit "
                             "both the same way, or remove 'steps' to use 'matrix' alone")


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { in JSON text, found without recursion (strings skipped)."""
    import re

    bare = re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', '""', text).encode("utf-8", "replace")
    b = np.frombuffer(bare, dtype=np.uint8)
    step = (np.isin(b, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(b, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(step).max(initial=0))


def parse_transform_json(text: str, source: str = "transform data") -> Any:
    """Parse untrusted JSON: size and nesting limits, finite numbers only; every
    problem is a ValueError naming ``source``."""
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"{source} is {len(text) / 2**20:.0f} MB; transform JSON of at most "
                         f"{MAX_JSON_BYTES // 2**20} MB is accepted")
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{source} is nested {depth} levels deep; transform JSON may nest at "
                         f"most {MAX_JSON_DEPTH} levels")

    def finite(token):
        value = float(token)
        if not np.isfinite(value):
            raise ValueError(f"{source} holds the number {token[:30]}...; a transform must "
                             "contain only finite numbers")
        return value

    def no_constant(token):
        raise ValueError(f"{source} holds {token}; a transform must contain only finite numbers")

    def integer(token):
        return int(token) if len(token) <= 18 else finite(token)

    try:
        return json.loads(text, parse_float=finite, parse_int=integer, parse_constant=no_constant)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err}); was it written by "
                         "save_transform?") from None
    except RecursionError:  # the depth check above should make this unreachable
        raise ValueError(f"{source} is nested too deeply") from None


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
        """A transform from :meth:`to_dict` output (or a file's parsed JSON). Untrusted
        input: every field is checked (types, finite numbers within limits, a known
        version) and the visible top-level ``ndim``, ``kind`` and ``matrix`` must agree
        with the steps; a dict with only a ``matrix`` is that linear transform."""
        if isinstance(data, dict) and "steps" not in data and data.get("matrix") is not None:
            data = {**data, "steps": [{"kind": "matrix", "matrix": data["matrix"]}]}
        if not isinstance(data, dict) or "steps" not in data:
            raise ValueError(
                "not a napari-registration transform: expected a dict with 'steps' (or a "
                "'matrix') as written by Transform.to_dict or save_transform"
            )
        _check_header(data)
        if not isinstance(data["steps"], (list, tuple)):
            raise ValueError("corrupt transform data: 'steps' must be a list of steps; got "
                             f"{type(data['steps']).__name__}")
        if len(data["steps"]) > MAX_STEPS:
            raise ValueError(f"a transform may have at most {MAX_STEPS} steps; this one has "
                             f"{len(data['steps'])}")
        steps = []
        for sd in data["steps"]:
            kind = sd.get("kind") if isinstance(sd, dict) else None
            if not isinstance(kind, str):
                raise ValueError("corrupt transform data: each step must be a dict with a 'kind' "
                                 f"string; got {str(sd)[:60]!r}")
            if kind not in _STEP_KINDS and kind in _LAZY_STEP_MODULES:
                import importlib

                importlib.import_module(_LAZY_STEP_MODULES[kind])
            if kind not in _STEP_KINDS:
                raise ValueError(
                    f"unknown transform step kind {kind!r}; known: {sorted(_STEP_KINDS)}"
                )
            try:
                _check_step_fields(kind, sd)
                steps.append(_STEP_KINDS[kind].from_dict(sd))
            except (KeyError, TypeError, IndexError, OverflowError) as err:
                raise ValueError(f"corrupt {kind!r} step in transform data: {err!r}") from None
            except ValueError as err:
                raise ValueError(f"corrupt {kind!r} step in transform data: {err}") from None
        transform = cls(steps=steps)
        _check_visible_fields(data, transform)
        return transform

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


def rescale_world(transform: Transform, k: float) -> Transform:
    """The same map in world units ``k`` times larger: ``p -> k * T(p / k)``. Used to
    run a library in units where pixel sizes are near 1 and convert back."""
    k = float(k)
    if k == 1.0:
        return transform
    steps = []
    for step in transform.steps:
        if isinstance(step, MatrixStep):
            d = step.ndim
            s = scale_matrix(np.full(d, k))
            steps.append(MatrixStep(s @ step.matrix @ np.linalg.inv(s)))
        elif isinstance(step, FieldStep):
            steps.append(FieldStep(step.field * np.float32(k), step.spacing * k, step.origin * k,
                                   step.direction))
        else:
            d = step.ndim
            steps += [MatrixStep(scale_matrix(np.full(d, 1.0 / k))), step,
                      MatrixStep(scale_matrix(np.full(d, k)))]
    return Transform(steps=steps)


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
    # written under a temp name in the same folder, then renamed into place: an
    # interrupted or failed write never leaves a truncated file under the real name
    if suffix == ".json":
        text = json.dumps(transform.to_dict(), indent=1)
        return write_text_atomic(path, text)
    if suffix in (".tfm", ".txt", ".h5", ".hdf5", ".mat"):
        from .itk import write_itk_transform

        return write_atomic(path, lambda tmp: write_itk_transform(transform, tmp))
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
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{path} is {size / 2**20:.0f} MB; transform JSON files of at most "
                             f"{MAX_JSON_BYTES // 2**20} MB are accepted")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); was it written by save_transform?") from None
        data = parse_transform_json(text, str(path))
        if isinstance(data, dict) and "transform" in data and "steps" not in data:
            data = data["transform"]  # a whole RegistrationResult.to_dict()
        return Transform.from_dict(data)
    if suffix in (".tfm", ".txt", ".h5", ".hdf5", ".mat"):
        from .itk import read_itk_transform

        return read_itk_transform(path)
    raise ValueError(f"unknown transform file type {suffix!r}: use .json, .tfm, .txt or .h5")
