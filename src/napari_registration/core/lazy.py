"""Lazy, block-wise warping of large (dask) images.

:func:`lazy_resample` returns a dask array on the output (fixed) grid. Each output block
is one task that reads only the region of the input (moving) image its pixels pull back
into (plus a one-pixel margin for interpolation), and warps it with the same
:func:`~.resample.resample` the eager path uses, so values are those of
``resample(image.compute(), ...)``: identical for nearest (labels) warps, and for linear
(order 1) ones up to the last bit of float rounding (ITK's resampler steps along each
output row from its first pixel, and a block's rows start elsewhere).

Nothing here imports napari or Qt; dask is imported when a lazy warp is asked for.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .resample import _geometry, index_map, resample
from .transform import Transform

__all__ = ["lazy_resample", "is_dask", "default_chunks", "warp_levels"]

# output block side when neither the caller nor the input says: 1024^2 (2D) or 128^3 (3D)
_BLOCK_PIXELS = {1: 1 << 20, 2: 1024, 3: 128}


def is_dask(array) -> bool:
    """True for a dask array (duck-typed: no dask import needed to ask)."""
    return hasattr(array, "dask") and hasattr(array, "chunks") and hasattr(array, "compute")


def default_chunks(ndim: int, image=None, rgb: bool = False) -> tuple:
    """Output block shape: the input's chunk shape when it is a dask array, otherwise
    1024 px a side (2D) / 128 (3D)."""
    if image is not None and is_dask(image):
        size = image.chunksize[:-1] if rgb else image.chunksize
        if len(size) == ndim:
            return tuple(max(int(s), 64) for s in size)
    return (_BLOCK_PIXELS.get(ndim, 64),) * ndim


def _pullback_bounds(transform, out_sp, out_or, in_sp, in_or, start, stop):
    """(lo, hi) input index bounds (float) of the output block ``[start, stop)``: exact
    for linear maps (the corners), sampled on a grid for projective/deformable ones."""
    ndim = len(start)
    if transform.is_linear and not transform.is_projective:
        m = index_map(transform, out_sp, out_or, in_sp, in_or)
        corners = np.array(list(itertools.product(*[(a, b - 1) for a, b in zip(start, stop)])), float)
        src = corners @ m[:ndim, :ndim].T + m[:ndim, ndim]
        return src.min(axis=0), src.max(axis=0), 0
    # projective: a box maps into the hull of its corners' images as long as the
    # denominator keeps its sign; deformable: a smooth field, sampled every <=32 px
    axes = [np.unique(np.r_[np.arange(a, b, 32), b - 1]).astype(float) for a, b in zip(start, stop)]
    grid = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    src = (transform.apply_inverse(grid * out_sp + out_or) - in_or) / in_sp
    src = src[np.all(np.isfinite(src), axis=1)]
    if len(src) == 0:
        return None, None, 0
    margin = 0 if transform.is_linear else 4
    return src.min(axis=0), src.max(axis=0), margin


def _warp_block(region, transform, shape, out_sp, out_or_block, in_sp, in_or_region, kwargs):
    return resample(np.asarray(region), transform, shape, output_spacing=out_sp,
                    output_origin=out_or_block, input_spacing=in_sp,
                    input_origin=in_or_region, **kwargs)


def lazy_resample(
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
    chunks=None,
    fast: bool = False,
):
    """Like :func:`~.resample.resample`, but returns a lazy dask array.

    Parameters
    ----------
    image : numpy or dask array
        The moving image (``rgb=True``: last axis holds colour channels).
    transform : Transform
        Maps moving world -> fixed world.
    output_shape, output_spacing, output_origin, input_spacing, input_origin :
        As for :func:`~.resample.resample` (napari ``shape``, ``scale``, ``translate``).
    labels : bool
        Nearest neighbour, dtype kept.
    order : int
        0 or 1 (a higher spline order needs the whole image for its prefilter).
    chunks : tuple of int, optional
        Output block shape (spatial axes); default: the input's chunks, or 1024 px (2D)
        / 128 (3D) a side.
    fast : bool
        2D: warp each block with OpenCV (releases the GIL, so blocks run in parallel on
        threads; 1/32-pixel interpolation weights), as ``resample(..., fast=True)``. Not
        bit-identical to the eager fast warp: a block's offset can round a source
        coordinate into the neighbouring 1/32 bin.

    Returns
    -------
    dask.array.Array
        Output blocks are computed on demand (``.compute()``, slicing, napari, ``to_zarr``),
        on whatever dask scheduler is active (a ``dask.distributed.Client`` included).
    """
    import dask
    import dask.array as da

    if order is None:
        order = 0 if labels else 1
    if labels:
        order = 0
    if int(order) > 1:
        raise ValueError(f"a lazy (block-wise) warp supports order 0 or 1, not {order}: a spline "
                         "of order > 1 needs the whole image; compute the image first "
                         "(np.asarray(image)) or use order=1")
    ndim = transform.ndim
    spatial = tuple(image.shape[:-1]) if rgb else tuple(image.shape)
    if len(spatial) != ndim:
        raise ValueError(f"a {ndim}D transform cannot be applied to an image of shape {image.shape}"
                         + (" (rgb=True: last axis = colour)" if rgb else ""))
    output_shape = tuple(int(s) for s in output_shape)
    if len(output_shape) != ndim or min(output_shape) < 1:
        raise ValueError(f"output_shape must be {ndim} positive whole numbers; got {output_shape}")
    out_sp = _geometry(output_spacing, ndim, 1.0, "output_spacing")
    out_or = _geometry(output_origin, ndim, 0.0, "output_origin")
    in_sp = _geometry(input_spacing, ndim, 1.0, "input_spacing")
    in_or = _geometry(input_origin, ndim, 0.0, "input_origin")

    if chunks is None:
        chunks = default_chunks(ndim, image, rgb)
    try:
        block = tuple(int(c) for c in np.broadcast_to(np.asarray(chunks).ravel(), (ndim,)))
    except (TypeError, ValueError):
        raise ValueError(f"chunks must be {ndim} positive whole numbers (output block shape); "
                         f"got {chunks!r}") from None
    if min(block) < 1:
        raise ValueError(f"chunks must be positive; got {chunks!r}")
    out_chunks = da.core.normalize_chunks(block, output_shape)

    if not is_dask(image):
        image = np.asarray(image)
        src = da.from_array(image, chunks=tuple(min(b, s) for b, s in zip(block, spatial))
                            + ((image.shape[-1],) if rgb else ()))
    else:
        src = image
    kwargs = dict(labels=labels, order=int(order), cval=float(cval), rgb=rgb, fast=bool(fast))
    # the output dtype, exactly as the eager path makes it
    probe = np.zeros((2,) * ndim + ((image.shape[-1],) if rgb else ()), dtype=image.dtype)
    out_dtype = resample(probe, Transform.identity(ndim), (1,) * ndim, **kwargs).dtype
    channel = (image.shape[-1],) if rgb else ()

    if rgb and len(src.chunks[-1]) > 1:
        src = src.rechunk(src.chunks[:-1] + (src.shape[-1],))
    token = dask.base.tokenize(src.name, transform.to_dict(), output_shape, out_sp, out_or,
                               in_sp, in_or, kwargs, block)
    name = f"warp-{token}"
    # one task per output block, reading the source's own chunk keys: no per-block dask
    # array (slicing one per block let dask fuse, and so recompute, shared source chunks)
    in_bounds = [np.r_[0, np.cumsum(c)] for c in src.chunks[:ndim]]
    starts = [np.r_[0, np.cumsum(c)[:-1]] for c in out_chunks]
    grid = [len(c) for c in out_chunks]
    dsk = {}
    for idx in np.ndindex(*grid):
        start = np.array([starts[a][i] for a, i in enumerate(idx)])
        size = np.array([out_chunks[a][i] for a, i in enumerate(idx)])
        stop = start + size
        lo_f, hi_f, margin = _pullback_bounds(transform, out_sp, out_or, in_sp, in_or, start, stop)
        if lo_f is None:
            lo = np.zeros(ndim, int)
            hi = np.ones(ndim, int)
        else:
            # floor-1 .. ceil+1 inclusive: every interpolation neighbour is inside; clipped
            # to the image, where the region's edge is the image's real edge
            lo = np.floor(lo_f).astype(int) - 1 - margin
            hi = np.ceil(hi_f).astype(int) + 2 + margin
            n = np.array(spatial)
            lo = np.clip(lo, 0, n - 1)
            hi = np.clip(hi, lo + 1, n)
        # the source chunks the region touches, and the region inside their union
        first = [int(np.searchsorted(b, v, side="right") - 1) for b, v in zip(in_bounds, lo)]
        last = [int(np.searchsorted(b, v - 1, side="right") - 1) for b, v in zip(in_bounds, hi)]
        keys = _nested_keys(src.name, first, last, rgb)
        offset = tuple(int(v - b[f]) for v, b, f in zip(lo, in_bounds, first))
        dsk[(name, *idx) + ((0,) if rgb else ())] = (
            _warp_chunks, keys, offset, tuple(int(v) for v in hi - lo), transform,
            tuple(int(v) for v in size), out_sp, out_or + start * out_sp, in_sp,
            in_or + lo * in_sp, kwargs)
    from dask.highlevelgraph import HighLevelGraph

    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[src])
    return da.Array(graph, name, chunks=out_chunks + ((channel[0],),) if rgb else out_chunks,
                    dtype=out_dtype, meta=np.empty((0,) * (ndim + len(channel)), out_dtype))


def _nested_keys(name, first, last, rgb, prefix=()):
    axis = len(prefix)
    if axis == len(first):
        # rgb: one more level of nesting, so that np.block joins colour chunks last
        return [(name, *prefix, 0)] if rgb else (name, *prefix)
    return [_nested_keys(name, first, last, rgb, prefix + (i,))
            for i in range(first[axis], last[axis] + 1)]


def _warp_chunks(chunks, offset, extent, transform, shape, out_sp, out_or, in_sp, in_or, kwargs):
    """Assemble the input region from its chunks (nested lists, one level per axis) and
    warp it onto one output block."""
    union = np.block(chunks) if isinstance(chunks, list) else chunks
    region = union[tuple(slice(o, o + e) for o, e in zip(offset, extent))]
    return _warp_block(region, transform, shape, out_sp, out_or, in_sp, in_or, kwargs)


def _wrap_leaves(nested, depth):
    if depth == 0:
        return [nested]
    return [_wrap_leaves(n, depth - 1) for n in nested]


def warp_levels(moving_levels, transform: Transform, output_shapes, *, output_spacings,
                output_origin=None, moving_spacings, moving_origin=None, rgb: bool = False,
                labels: bool = False, chunks=None, fast: bool = False, eager_pixels: int = 0,
                dtype=None, known=None):
    """The moving pyramid warped onto every level of an output (fixed) pyramid.

    Level ``j`` of the output is warped from moving level ``min(j, n_moving - 1)`` with
    :func:`lazy_resample` (blocks of ``chunks`` pixels, ``fast``: OpenCV per block).
    Levels with at most ``eager_pixels`` pixels (spatial) are computed now and returned
    as numpy arrays: the coarse levels a viewer shows when zoomed out are then ready
    instead of being computed while the user browses. ``known`` maps a level index to an
    array already warped onto exactly that level (used as is). ``dtype`` casts every
    level (default: the warp's own dtype). Returns a list, fine -> coarse.
    """
    known = dict(known or {})
    n_moving = len(moving_levels)
    if n_moving == 0 or len(output_shapes) == 0:
        raise ValueError("warp_levels needs at least one moving level and one output level")
    if len(output_spacings) != len(output_shapes) or len(moving_spacings) != n_moving:
        raise ValueError("give one spacing per level (output_spacings for output_shapes, "
                         "moving_spacings for moving_levels)")
    out = []
    for j, shape in enumerate(output_shapes):
        shape = tuple(int(s) for s in shape)
        if j in known:
            level = known[j]
        else:
            mj = min(j, n_moving - 1)
            level = lazy_resample(moving_levels[mj], transform, shape,
                                  output_spacing=output_spacings[j], output_origin=output_origin,
                                  input_spacing=moving_spacings[mj], input_origin=moving_origin,
                                  rgb=rgb, labels=labels, chunks=chunks, fast=fast)
        if dtype is not None and level.dtype != np.dtype(dtype):
            level = level.astype(dtype, copy=False)
        if is_dask(level) and eager_pixels and int(np.prod(shape)) <= eager_pixels:
            level = np.asarray(level.compute())
        out.append(level)
    return out
