"""Warp images onto a grid and map points, in world coordinates.

Every function takes the *moving -> fixed* :class:`~.transform.Transform` and pulls
each output (fixed) grid point back into the input (moving) image through
``transform.apply_inverse``. Images use linear interpolation by default; labels use
nearest neighbour and keep their dtype.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .parallel import n_workers
from .transform import Transform, scale_matrix, translation_matrix


def _geometry(values, ndim, default, name):
    if values is None:
        return np.full(ndim, default, dtype=float)
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {ndim} numbers (one per axis, napari order) or one "
                         f"number; got {values!r}") from None
    if arr.size == 1 and ndim > 1:
        arr = np.full(ndim, float(arr[0]))
    if arr.size != ndim:
        raise ValueError(f"{name} must have {ndim} values (one per axis, napari order); got {list(arr)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {list(arr)}")
    if name.endswith("spacing") and np.any(arr <= 0):
        raise ValueError(f"{name} must be positive (napari layer.scale); got {list(arr)}")
    return arr


def index_to_world(spacing, origin) -> np.ndarray:
    """Homogeneous matrix: array index -> world (napari: index * scale + translate)."""
    return translation_matrix(origin) @ scale_matrix(spacing)


def world_to_index(spacing, origin) -> np.ndarray:
    return np.linalg.inv(index_to_world(spacing, origin))


def index_map(transform: Transform, out_sp, out_or, in_sp, in_or) -> np.ndarray:
    """Homogeneous matrix of a linear ``transform``'s pull-back on the grids: output
    (fixed) index -> output world -> input (moving) world -> input index."""
    return world_to_index(in_sp, in_or) @ np.linalg.inv(transform.matrix) @ index_to_world(out_sp, out_or)


SLAB_VOXELS = 65_536  # output voxels per scipy call (~2-5 ms each)


def _run_slabs(slab, n_rows: int, per_row: int, threads: int) -> None:
    """Call ``slab(start, stop)`` on consecutive row ranges of at most SLAB_VOXELS
    voxels, spread over threads (contiguous runs of slabs per thread). The slab layout
    depends only on the output shape, never on the thread count, so the result is the
    same on every machine."""
    from .parallel import run_all, split

    rows = max(1, SLAB_VOXELS // max(per_row, 1))
    slabs = [(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]
    workers = min(n_workers(threads), len(slabs))

    def run(group):
        for a, b in group:
            slab(a, b)

    run_all([lambda g=slabs[a:b]: run(g) for a, b in split(len(slabs), workers)])


def resample(
    image,
    transform: Transform,
    output_shape: Sequence[int],
    *,
    output_spacing=None,
    output_origin=None,
    input_spacing=None,
    input_origin=None,
    labels: bool = False,
    order: int | None = None,
    cval: float = 0.0,
    rgb: bool = False,
    preserve_dtype: bool = True,
    fast: bool = False,
    threads: int = 0,
) -> np.ndarray:
    """Resample ``image`` (moving grid) onto the output (fixed) grid through ``transform``.

    Parameters
    ----------
    image : array
        The moving image (or labels). With ``rgb=True`` the last axis holds colour
        channels and is carried through.
    transform : Transform
        Maps moving world -> fixed world.
    output_shape, output_spacing, output_origin :
        The fixed grid (napari ``layer.data.shape``, ``layer.scale``, ``layer.translate``).
    input_spacing, input_origin :
        The moving grid's ``scale`` and ``translate``.
    labels : bool
        Nearest-neighbour interpolation, dtype kept, 0 outside.
    order : int
        Spline order (default 1; 0 for labels).
    fast : bool
        2D linear (affine or projective) warps of order 0/1 use OpenCV's warpAffine /
        warpPerspective: ~4x faster than the exact warp (ITK's, see Notes) on 512^2
        and ~10x faster than scipy's, but OpenCV interpolates with 1/32-pixel
        fixed-point weights (differences up to ~0.006 on a [0, 1] image), so the result
        no longer matches ITK's resampling of a saved ``.tfm`` exactly. Other cases
        ignore it.
    threads : int
        Warp slabs of the output on this many threads at once (0 = one per core; 1 = in
        the calling thread only). scipy releases the GIL while it interpolates; the slabs
        are the same whatever the thread count, so the values do not depend on it.

    Notes
    -----
    Linear interpolation (order 1) of a 2D or 3D image through an affine transform (up
    to :data:`ITK_MAX_VOXELS` input voxels) runs in ITK's resampler: the same exact
    bilinear/trilinear interpolation as scipy's, to the last bit of float rounding, in
    1.3-2.4x less CPU time on 512^2-704^2 images and 2.4-2.9x less on 3D volumes (wall
    time with the default threads: 1.3-1.75x and 2.3-2.6x less; docs/benchmarks.md,
    "Exact linear warp through ITK"), with the GIL released. Its threads split the
    output by rows, so the values do not depend on ``threads`` either. Every other case
    (orders 0 and 2-5, labels, projective and deformable transforms, larger inputs) runs
    in scipy.ndimage.
    """
    from scipy import ndimage

    image = np.asarray(image)
    if rgb:
        channels = [
            resample(image[..., c], transform, output_shape, output_spacing=output_spacing,
                     output_origin=output_origin, input_spacing=input_spacing,
                     input_origin=input_origin, labels=labels, order=order, cval=cval,
                     preserve_dtype=preserve_dtype, fast=fast, threads=threads)
            for c in range(image.shape[-1])
        ]
        return np.stack(channels, axis=-1)
    ndim = image.ndim
    if transform.ndim != ndim:
        raise ValueError(f"a {transform.ndim}D transform cannot be applied to a {ndim}D image")
    output_shape = tuple(int(s) for s in output_shape)
    if len(output_shape) != ndim:
        raise ValueError(f"output_shape must have {ndim} values; got {output_shape}")
    out_sp = _geometry(output_spacing, ndim, 1.0, "output_spacing")
    out_or = _geometry(output_origin, ndim, 0.0, "output_origin")
    in_sp = _geometry(input_spacing, ndim, 1.0, "input_spacing")
    in_or = _geometry(input_origin, ndim, 0.0, "input_origin")
    if order is None:
        order = 0 if labels else 1
    if labels:
        order = 0
    if image.dtype == bool:
        work = image.astype(np.uint8)
    elif image.dtype.kind == "f" and image.dtype not in (np.float32, np.float64):
        # float16 / long double: scipy.ndimage has no kernels for them
        work = image.astype(np.float32 if image.dtype.itemsize < 4 else np.float64)
    elif labels or image.dtype in (np.float32, np.float64):
        work = image
    else:
        work = image.astype(np.float32)
    out_dtype = work.dtype
    # every linear branch below pulls the output grid back through this one matrix
    m = index_map(transform, out_sp, out_or, in_sp, in_or) if transform.is_linear else None

    if (fast and ndim == 2 and transform.is_linear and order <= 1
            and work.dtype in (np.float32, np.uint8) and max(output_shape) < 32767
            and max(work.shape) < 32767):
        out = _cv2_warp(work, m, output_shape, order, cval)
    elif (order == 1 and ndim in (2, 3) and transform.is_linear and not transform.is_projective
          and work.dtype in (np.float32, np.float64) and work.size <= ITK_MAX_VOXELS):
        # the same exact interpolation in ITK's resampler, in less time than scipy's
        out = _itk_linear(work, m, output_shape, cval, n_workers(threads))
    elif transform.is_linear and not transform.is_projective:
        if order > 1:
            work = ndimage.spline_filter(work, order=order, output=np.float64)
        out = np.empty(output_shape, dtype=out_dtype)
        # slabs along the first axis, bounded in size (one call on a large volume froze
        # napari's GUI thread for its full duration, ~0.2 s seen) and spread over threads
        per_row = int(np.prod(output_shape[1:])) if ndim > 1 else 1

        def slab(start, stop):
            offset = m[:ndim, ndim] + m[:ndim, 0] * start
            ndimage.affine_transform(
                work, m[:ndim, :ndim], offset=offset, output_shape=(stop - start,) + output_shape[1:],
                order=order, mode="constant", cval=cval, prefilter=False, output=out[start:stop],
            )

        _run_slabs(slab, output_shape[0], per_row, threads)
    else:
        out = np.empty(output_shape, dtype=out_dtype)
        # pull back chunk by chunk along the first axis to bound memory
        per_plane = int(np.prod(output_shape[1:])) if ndim > 1 else 1
        grids = [np.arange(n) for n in output_shape[1:]]
        if order > 1:
            work = ndimage.spline_filter(work, order=order, output=np.float64)

        def chunk(start, stop):
            rows = np.arange(start, stop)
            mesh = np.meshgrid(rows, *grids, indexing="ij")
            idx = np.stack([g.ravel() for g in mesh], axis=1).astype(float)
            world = idx * out_sp + out_or
            src = (transform.apply_inverse(world) - in_or) / in_sp
            vals = ndimage.map_coordinates(work, src.T, order=order, mode="constant", cval=cval,
                                           prefilter=False, output=out_dtype)
            out[start:stop] = vals.reshape((stop - start,) + output_shape[1:])

        if transform.is_linear:
            # a projective matrix: output index -> input index is one (D+1)x(D+1) matrix
            # followed by the perspective divide, evaluated by broadcasting over the grid
            # (no (N, D) point list through the world), spread over threads

            def projective_chunk(start, stop):
                axes = [np.arange(start, stop, dtype=float)] + [g.astype(float) for g in grids]
                axes = [a.reshape([-1 if i == k else 1 for i in range(ndim)]) for k, a in enumerate(axes)]
                w = m[ndim, ndim] + sum(m[ndim, k] * axes[k] for k in range(ndim))
                coords = np.empty((ndim, stop - start) + output_shape[1:])
                for d in range(ndim):
                    coords[d] = (m[d, ndim] + sum(m[d, k] * axes[k] for k in range(ndim))) / w
                ndimage.map_coordinates(work, coords, order=order, mode="constant", cval=cval,
                                        prefilter=False, output=out[start:stop])

            _run_slabs(projective_chunk, output_shape[0], per_plane, threads)
        else:
            step = max(1, 2_000_000 // max(per_plane, 1))
            for start in range(0, output_shape[0], step):
                chunk(start, min(start + step, output_shape[0]))
    if bool(image.dtype == bool):
        return out.astype(bool)
    if labels and out.dtype != image.dtype:
        return out.astype(image.dtype)
    if preserve_dtype and not labels and np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out


# largest input (voxels) warped through ITK: it needs its own copy of the input, so
# bigger images (where memory counts more than time: 256^3 is 2^24) keep scipy's slabs,
# which need none
ITK_MAX_VOXELS = 2 ** 23
# how far (pixels) outside the first/last pixel centre a source point still counts as
# inside: above the rounding of coordinates in double precision (~1e-11 px at 1e5 px),
# below any estimated shift (so a frame shifted by 2.0000003 px loses its edge row, as
# on scipy's path); `stack_refine.translate_linear` uses the same rule
INSIDE_TOL = 1e-9


def _itk_linear(work, m, output_shape, cval, n_threads) -> np.ndarray:
    """Order-1 (bi/trilinear) warp of a float32/float64 image through ITK's resampler,
    with scipy's border rule. ``m`` is the homogeneous map output index -> input index.

    ITK interpolates exactly as ``ndimage.affine_transform(order=1, mode="constant",
    prefilter=False)`` does (weights in double precision; the two differ by rounding of
    the last bit, ~3e-8 on a [0, 1] float32 image, tested), and it releases the GIL and
    spreads the rows over ``n_threads`` threads. Only the border differs: ITK also
    samples points within half a pixel outside the image (its pixels are squares around
    their centres), scipy none outside ``0 <= coordinate <= n - 1``. The outside points
    are set to ``cval`` here, row by row (:func:`_inside_runs`, within
    :data:`INSIDE_TOL`): the footprint is scipy's, except that maps sending pixels
    exactly onto pixels (90-degree rotations from cos/sin) keep the edge rows that
    scipy's rounded coordinates dropped."""
    import SimpleITK as sitk

    ndim = work.ndim
    img = sitk.GetImageFromArray(np.ascontiguousarray(work))
    tx = sitk.AffineTransform(ndim)
    rev = np.eye(ndim)[::-1]  # ITK orders axes (x, y[, z]), numpy the other way round
    tx.SetMatrix([float(v) for v in (rev @ m[:ndim, :ndim] @ rev).ravel()])
    tx.SetTranslation([float(v) for v in m[:ndim, ndim][::-1]])
    rf = sitk.ResampleImageFilter()
    rf.SetSize([int(v) for v in output_shape[::-1]])
    rf.SetOutputSpacing([1.0] * ndim)
    rf.SetOutputOrigin([0.0] * ndim)
    rf.SetOutputDirection(np.eye(ndim).ravel().tolist())
    rf.SetTransform(tx)
    rf.SetInterpolator(sitk.sitkLinear)
    rf.SetDefaultPixelValue(float(cval))
    rf.SetOutputPixelType(sitk.sitkFloat32 if work.dtype == np.float32 else sitk.sitkFloat64)
    rf.SetNumberOfThreads(int(n_threads))
    result = rf.Execute(img)
    del img  # ITK's copy of the input
    out = _ItkPixels(result).array()  # the output's pixels, not a copy of them
    outside = _outside(*_inside_runs(m, work.shape, output_shape), output_shape[-1])
    np.copyto(out, out.dtype.type(cval), where=outside)
    return out


def _outside(lo, hi, width) -> np.ndarray:
    """Boolean mask, True outside each row's run of columns ``lo..hi``."""
    small = np.int16 if width < 2 ** 15 - 1 else np.int64  # cheaper compares
    cols = np.arange(width, dtype=small)
    outside = cols < lo.astype(small)[..., None]
    outside |= cols > hi.astype(small)[..., None]
    return outside


class _ItkPixels:
    """A numpy array on an ITK image's pixel buffer that keeps the image alive (numpy's
    ``base`` is this object): no copy of the output, which on a volume is the size of
    the output. SimpleITK's own view keeps nothing alive."""

    def __init__(self, image):
        import SimpleITK as sitk

        self._image = image
        view = sitk.GetArrayViewFromImage(image)
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # ours to write: writable
        self.__array_interface__ = interface

    def array(self) -> np.ndarray:
        return np.asarray(self)


def _inside_runs(m, input_shape, output_shape, tol: float = INSIDE_TOL):
    """For every output row (an array over all axes but the last), the first and last
    column whose source point lies inside the input: within ``tol`` pixels of
    ``0 <= coordinate <= n - 1`` on every input axis (``lo > hi`` when none does).

    Along a row the source point moves on a line, so on each axis the inside columns
    form one run, solved from the line's equation (``m`` maps output index -> input
    index, homogeneous)."""
    ndim = len(output_shape)
    width = int(output_shape[-1])
    lead_shape = tuple(int(v) for v in output_shape[:-1])
    lo = np.zeros(lead_shape, dtype=np.int64)
    hi = np.full(lead_shape, width - 1, dtype=np.int64)
    # each leading axis as a broadcastable column of indices
    axes = [np.arange(n, dtype=np.float64).reshape([-1 if i == k else 1 for i in range(ndim - 1)])
            for k, n in enumerate(lead_shape)]
    for h in range(ndim):
        at0 = m[h, ndim] + sum(m[h, k] * axes[k] for k in range(ndim - 1))  # source at column 0
        at0 = np.broadcast_to(at0, lead_shape)
        step = float(m[h, ndim - 1])
        low, high = -tol, float(input_shape[h] - 1) + tol
        if step == 0.0:
            hi = np.where((at0 >= low) & (at0 <= high), hi, -1)
            continue
        with np.errstate(over="ignore"):  # a tiny step: the run covers all or nothing
            a, b = (low - at0) / step, (high - at0) / step
        first, last = np.minimum(a, b), np.maximum(a, b)
        lo = np.maximum(lo, np.clip(np.ceil(first), -1, width).astype(np.int64))
        hi = np.minimum(hi, np.clip(np.floor(last), -1, width).astype(np.int64))
    return lo, hi


def _cv2_warp(image, m_index, output_shape, order, cval):
    """OpenCV pull-back warp: ``m_index`` maps output (row, col) to input (row, col)."""
    import cv2

    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    m_xy = swap @ m_index @ swap  # the same map in OpenCV's (x, y)
    flags = (cv2.INTER_NEAREST if order == 0 else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    size = (int(output_shape[1]), int(output_shape[0]))
    src = np.ascontiguousarray(image)
    if np.allclose(m_xy[2, :2], 0.0):
        return cv2.warpAffine(src, m_xy[:2] / m_xy[2, 2], size, flags=flags,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=float(cval))
    return cv2.warpPerspective(src, m_xy, size, flags=flags, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=float(cval))


def overlap_mask(input_shape, transform, output_shape, **geometry) -> np.ndarray:
    """Boolean mask of the output grid points that fall inside the input image.

    For an affine transform in 2D/3D it is solved row by row (:func:`_inside_runs`, the
    rule of the linear warp: ``0 <= coordinate <= n - 1`` within 1e-9 px) instead of
    warping an image of ones (a whole nearest-neighbour warp)."""
    input_shape = tuple(int(v) for v in input_shape)
    output_shape = tuple(int(v) for v in output_shape)
    ndim = len(input_shape)
    if (ndim in (2, 3) and len(output_shape) == ndim and transform.ndim == ndim
            and transform.is_linear and not transform.is_projective
            and set(geometry) <= {"output_spacing", "output_origin", "input_spacing", "input_origin"}):
        out_sp = _geometry(geometry.get("output_spacing"), ndim, 1.0, "output_spacing")
        out_or = _geometry(geometry.get("output_origin"), ndim, 0.0, "output_origin")
        in_sp = _geometry(geometry.get("input_spacing"), ndim, 1.0, "input_spacing")
        in_or = _geometry(geometry.get("input_origin"), ndim, 0.0, "input_origin")
        m = index_map(transform, out_sp, out_or, in_sp, in_or)
        return ~_outside(*_inside_runs(m, input_shape, output_shape), output_shape[-1])
    ones = np.ones(input_shape, dtype=np.uint8)
    return resample(ones, transform, output_shape, labels=True, **geometry).astype(bool)


def map_points(points, transform: Transform) -> np.ndarray:
    """Map (N, D) moving world points to fixed world points (napari Points data in world
    units, i.e. data * scale + translate)."""
    return transform.apply(points)


def map_shapes(shapes: Sequence[np.ndarray], transform: Transform) -> list[np.ndarray]:
    """Map each shape's (K, D) vertices from moving world to fixed world."""
    return [transform.apply(np.asarray(s, float)) for s in shapes]
