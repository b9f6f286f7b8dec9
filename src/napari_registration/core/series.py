"""Per-frame transforms of a stack, reusable: save and load them as one JSON file, and
apply them to other data of the same series (another channel, a labels movie, tracked
points with a time column, shapes).

Conventions are those of :class:`~napari_registration.core.stack.StackResult`:
``transforms[i]`` maps frame ``i``'s world coordinates to the reference frame's world
coordinates, in the napari axis order of one frame, with world = index * spacing (no
origin). Applying them resamples every frame onto its own grid (images: linear, labels:
nearest neighbour, dtype kept) or moves every point by the transform of its frame.

```python
from napari_registration import register_stack, save_transforms, load_transforms
from napari_registration import apply_stack_transforms

stack = register_stack(green, method="fourier", transform="rigid")
save_transforms("drift.json", stack.transforms, frame_axis=0, spacing=(0.5, 0.5))
series = load_transforms("drift.json")                   # a TransformSeries
red_aligned = apply_stack_transforms(red, series.transforms, spacing=series.spacing)
labels_aligned = apply_stack_transforms(labels, series.transforms, labels=True)
tracks_aligned = map_stack_points(tracks, series.transforms)   # (N, 1 + D): frame, row, col
```

This module imports neither napari nor Qt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .files import write_text_atomic
from .transform import Transform

__all__ = ["TransformSeries", "save_transforms", "load_transforms", "apply_stack_transforms",
           "map_stack_points", "map_stack_shapes", "SERIES_TYPE"]

SERIES_TYPE = "napari-registration transform series"
SERIES_VERSION = 1
MAX_FILE_BYTES = 512 * 1024 * 1024  # a series file larger than this is refused unread


@dataclass(frozen=True)
class TransformSeries:
    """Per-frame transforms with the axis they run along.

    Attributes
    ----------
    transforms : tuple of Transform
        ``transforms[i]`` maps frame ``i`` world -> reference frame world.
    frame_axis : int
        The time (or z) axis of the stack they were measured on.
    spacing : tuple of float or None
        World units per pixel of one frame's spatial axes (napari ``scale`` without the
        frame axis), when known.
    """

    transforms: tuple
    frame_axis: int = 0
    spacing: tuple | None = None

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i):
        return self.transforms[i]

    @property
    def ndim(self) -> int:
        """Spatial dimensions of one frame."""
        return self.transforms[0].ndim

    def to_dict(self) -> dict:
        return {
            "type": SERIES_TYPE,
            "version": SERIES_VERSION,
            "convention": "transforms[i] maps frame i world -> reference frame world; napari "
                          "axis order of one frame; world = index * spacing",
            "frame_axis": int(self.frame_axis),
            "spacing": None if self.spacing is None else [float(v) for v in self.spacing],
            "n_frames": len(self.transforms),
            "transforms": [t.to_dict() for t in self.transforms],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "TransformSeries":
        """Read :meth:`to_dict` output, or a stack result's ``to_dict()`` (a stack layer's
        ``metadata["registration"]``). Raises ValueError on anything else."""
        if not isinstance(data, dict):
            raise ValueError("not a transform series: expected a JSON object written by "
                             "save_transforms (or a stack result's to_dict())")
        kind = data.get("type")
        if kind == SERIES_TYPE:
            axis_key = "frame_axis"
        elif kind == "napari-registration stack result":
            axis_key = "axis"
        else:
            raise ValueError(f"not a transform series (type {str(kind)[:60]!r}): use a file "
                             "written by save_transforms or the stack dock's 'Save transforms'")
        items = data.get("transforms")
        if not isinstance(items, list) or not items:
            raise ValueError("corrupt transform series: 'transforms' must be a non-empty list "
                             "of per-frame transforms")
        transforms = []
        for i, item in enumerate(items):
            try:
                transforms.append(Transform.from_dict(item))
            except ValueError as err:
                raise ValueError(f"corrupt transform series: frame {i}: {err}") from None
        return cls(transforms=_check_transforms(transforms),
                   frame_axis=_check_axis(data.get(axis_key, 0), "frame_axis"),
                   spacing=_check_spacing(data.get("spacing"), transforms[0].ndim))


def _check_axis(axis, name) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis < 0:
        raise ValueError(f"{name} must be a non-negative whole number (an axis index); "
                         f"got {axis!r}")
    return int(axis)


def _check_spacing(spacing, ndim) -> tuple | None:
    if spacing is None:
        return None
    try:
        sp = tuple(float(v) for v in np.ravel(np.asarray(spacing, dtype=float)))
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be {ndim} positive numbers; got {spacing!r}") from None
    if len(sp) == 1:
        sp = sp * ndim
    if len(sp) != ndim or not all(np.isfinite(v) and v > 0 for v in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per spatial axis of a "
                         f"frame, napari order); got {list(sp)}")
    return sp


def _check_transforms(transforms) -> tuple:
    out = []
    for i, t in enumerate(transforms):
        if isinstance(t, dict):
            try:
                t = Transform.from_dict(t)
            except ValueError as err:
                raise ValueError(f"transform of frame {i}: {err}") from None
        if isinstance(t, np.ndarray):
            t = Transform(t)
        if not isinstance(t, Transform):
            raise ValueError(f"transform of frame {i} is a {type(t).__name__}; pass Transform "
                             "objects (e.g. StackResult.transforms)")
        out.append(t)
    if not out:
        raise ValueError("no transforms given: pass one per frame (e.g. StackResult.transforms)")
    dims = {t.ndim for t in out}
    if len(dims) > 1:
        raise ValueError(f"the per-frame transforms mix dimensions {sorted(dims)}; they must "
                         "all belong to one stack")
    return tuple(out)


def _as_series(transforms, frame_axis=None, spacing=None) -> TransformSeries:
    if isinstance(transforms, TransformSeries):
        return TransformSeries(
            transforms.transforms,
            transforms.frame_axis if frame_axis is None else _check_axis(frame_axis, "frame_axis"),
            transforms.spacing if spacing is None else _check_spacing(spacing, transforms.ndim))
    if hasattr(transforms, "transforms") and hasattr(transforms, "axis"):  # a StackResult
        spacing = transforms.spacing if spacing is None else spacing
        frame_axis = transforms.axis if frame_axis is None else frame_axis
        transforms = transforms.transforms
    ts = _check_transforms(list(transforms))
    return TransformSeries(ts, _check_axis(0 if frame_axis is None else frame_axis, "frame_axis"),
                           _check_spacing(spacing, ts[0].ndim))


# ---------------------------------------------------------------------------------- I/O
def save_transforms(path: str | Path, transforms, frame_axis: int | None = None, *,
                    spacing: Sequence[float] | None = None) -> Path:
    """Write per-frame transforms to one JSON file (atomically: a temporary file in the
    same folder, then renamed into place).

    Parameters
    ----------
    path : str or Path
        Ends in ``.json``.
    transforms : sequence of Transform, a StackResult or a TransformSeries
        ``transforms[i]`` maps frame ``i`` world -> reference world.
    frame_axis : int, optional
        The stack's time (or z) axis (default: the StackResult's axis, else 0).
    spacing : sequence of float, optional
        World units per pixel of a frame (default: the StackResult's spacing).
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ValueError(f"per-frame transforms are saved as JSON: give a name ending in .json "
                         f"(got {str(path)!r})")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file name ending in .json")
    series = _as_series(transforms, frame_axis, spacing)
    text = json.dumps(series.to_dict(), indent=1)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist: create it first")
    write_text_atomic(path, text)
    return path


def load_transforms(path: str | Path) -> TransformSeries:
    """Read per-frame transforms written by :func:`save_transforms` (or a stack result's
    JSON). Returns a :class:`TransformSeries`; anything else raises ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"transform series file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the .json file written by save_transforms")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MB: not a transform "
                         "series written by save_transforms")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); was it written by "
                         "save_transforms?") from None
    return TransformSeries.from_dict(data)


# -------------------------------------------------------------------------------- apply
def apply_stack_transforms(data, transforms, *, frame_axis: int | None = None,
                           spacing: Sequence[float] | None = None, labels: bool = False,
                           channel_axis: int | None = None, rgb: bool = False) -> np.ndarray:
    """Resample every frame of ``data`` through its transform, onto its own grid.

    Parameters
    ----------
    data : array (numpy or dask)
        A stack with the same number of frames as there are transforms, e.g. the other
        channel of the registered series, or a labels movie. Not modified.
    transforms : sequence of Transform, a StackResult or a TransformSeries
    frame_axis : int, optional
        The frame axis of ``data`` (default: the series' own, else 0).
    spacing : sequence of float, optional
        World units per pixel of one frame (default: the series' spacing, else 1). Give
        the spacing of the stack the transforms were measured on.
    labels : bool
        Nearest-neighbour resampling, dtype kept (label images).
    channel_axis : int, optional
        An axis of ``data`` holding channels; each channel follows its frame's transform.
    rgb : bool
        The last axis holds colour (napari ``rgb=True``).

    Returns
    -------
    ndarray of ``data``'s shape and dtype.
    """
    from .resample import resample

    series = _as_series(transforms, frame_axis, spacing)
    shape = tuple(np.shape(data))
    ndim = len(shape)
    axis = series.frame_axis
    if not 0 <= axis < ndim:
        raise ValueError(f"frame_axis {axis} does not exist in data of shape {shape}")
    drop = {axis}
    if channel_axis is not None:
        channel_axis = _check_axis(channel_axis, "channel_axis")
        if channel_axis >= ndim or channel_axis == axis:
            raise ValueError(f"channel_axis {channel_axis} must be another axis of data of "
                             f"shape {shape} than the frame axis {axis}")
        drop.add(channel_axis)
    if rgb:
        drop.add(ndim - 1)
    spatial = [k for k in range(ndim) if k not in drop]
    if len(spatial) != series.ndim:
        raise ValueError(f"the transforms are {series.ndim}D but data of shape {shape} has "
                         f"{len(spatial)} spatial axes (frame axis {axis}"
                         + (f", channel axis {channel_axis}" if channel_axis is not None else "")
                         + "): set frame_axis/channel_axis/rgb to match the data")
    if shape[axis] != len(series):
        raise ValueError(f"data has {shape[axis]} frames along axis {axis} but there are "
                         f"{len(series)} transforms: apply them to a stack of the same length")
    dtype = np.dtype(getattr(data, "dtype", np.asarray(data).dtype))
    if dtype.kind not in "biuf":
        raise ValueError(f"data has dtype {dtype}; pass a numeric image or labels array")
    sp = series.spacing if series.spacing is not None else (1.0,) * series.ndim
    # frame (and channel) axes first, spatial axes in order, colour last
    lead = [axis] + ([channel_axis] if channel_axis is not None else [])
    order = lead + spatial + ([ndim - 1] if rgb else [])
    out = np.empty(tuple(shape[k] for k in order), dtype)
    for i, t in enumerate(series.transforms):
        frame = np.asarray(np.take(data, i, axis=axis))  # one frame in memory at a time
        if channel_axis is not None:
            frame = np.moveaxis(frame, channel_axis - (channel_axis > axis), 0)
            channels = list(frame)
        else:
            channels = [frame]
        for c, image in enumerate(channels):
            warped = resample(image, t, image.shape[:-1] if rgb else image.shape,
                              output_spacing=sp, input_spacing=sp, labels=labels, rgb=rgb)
            out[(i, c) if channel_axis is not None else i] = warped
    return np.moveaxis(out, range(ndim), order) if order != list(range(ndim)) else out


def map_stack_points(points, transforms, *, frame_axis: int | None = None,
                     spacing: Sequence[float] | None = None) -> np.ndarray:
    """Move points of a series (e.g. tracked points) by the transform of their frame.

    ``points`` is (N, 1 + D) in the stack's index (data) coordinates, the frame index in
    column ``frame_axis`` (napari Points data of a layer with the stack's scale); the
    frame column is kept, the others are mapped. Returns a new array.
    """
    series = _as_series(transforms, frame_axis, spacing)
    pts = np.array(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != series.ndim + 1:
        raise ValueError(f"points must be (N, {series.ndim + 1}): a frame column and "
                         f"{series.ndim} spatial columns; got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points contain NaN or infinite coordinates")
    axis = series.frame_axis
    if axis > series.ndim:
        raise ValueError(f"frame_axis {axis} is not a column of ({len(pts)}, "
                         f"{series.ndim + 1}) points")
    frames = np.rint(pts[:, axis]).astype(int)
    bad = (frames < 0) | (frames >= len(series))
    if np.any(bad):
        raise ValueError(f"{int(bad.sum())} point(s) lie on frames outside 0..{len(series) - 1} "
                         "(e.g. frame " f"{int(frames[bad][0])}): the points must belong to "
                         "the stack the transforms were measured on")
    sp = np.asarray(series.spacing if series.spacing is not None else (1.0,) * series.ndim)
    cols = [k for k in range(series.ndim + 1) if k != axis]
    out = pts.copy()
    for f in np.unique(frames):
        rows = frames == f
        world = pts[np.ix_(rows, cols)] * sp
        out[np.ix_(rows, cols)] = series.transforms[f].apply(world) / sp
    return out


def map_stack_shapes(shapes, transforms, *, frame_axis: int | None = None,
                     spacing: Sequence[float] | None = None) -> list:
    """:func:`map_stack_points` for each shape's vertices (napari Shapes data)."""
    return [map_stack_points(np.asarray(s, float), transforms, frame_axis=frame_axis,
                             spacing=spacing) for s in shapes]
