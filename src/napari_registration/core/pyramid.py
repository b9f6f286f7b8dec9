"""Register coarse, apply fine: pyramids, a pixel budget and tile refinement.

A *pyramid* is a list of arrays from fine (level 0) to coarse, all showing the same
field of view (a napari multiscale layer's ``data``, OME-Zarr or pyramidal OME-TIFF
levels). Level ``k`` has spacing ``spacing0 * shape0 / shape_k`` (rounded to a whole
factor when within 2 %), and its pixel 0 sits at the centre of the level-0 block it
summarises: ``origin_k = origin0 + (factor - 1) / 2 * spacing0`` (block averaging, what
dask's ``coarsen``, ``skimage.transform.pyramid_reduce`` and slide scanners do).

:func:`register_pyramid` estimates the transform on the finest level that fits a pixel
budget (about ``pixel_budget`` x ``pixel_budget`` pixels), then refines it on a grid of
tiles at finer levels (each tile: the moving level warped by the current estimate, a
sub-pixel phase correlation against the fixed tile, and one least-squares fit of the
model to all tile displacements). The transform is in world units, so it applies to
every level; the warped result is lazy (dask) at every level.

Nothing here imports napari or Qt; dask is imported when a pyramid is used.
"""

from __future__ import annotations

from dataclasses import dataclass
import itertools
import time

import numpy as np

from .lazy import is_dask
from .resample import _geometry
from .transform import Transform

__all__ = ["Level", "as_levels", "choose_level", "register_pyramid", "DEFAULT_PIXEL_BUDGET"]

DEFAULT_PIXEL_BUDGET = 2048  # pixels a side of the estimation level (about 4 M pixels)
# register() options that belong to pyramids, with their defaults
# (named apart from every backend's options: `auto` has a `refine` of its own)
PYRAMID_OPTIONS = {"pixel_budget": None, "pyramid_refine": "tiles", "refine_tile": None,
                   "pyramid_deformable": None, "deformable_budget": None}
DEFAULT_DEFORMABLE_BUDGET = 512  # pixels a side of the B-spline refinement's level (2D)
FIELD_NODES = 129  # nodes a side of the stored deformable field (2D; 3D: 65)
_LINEAR = ("translation", "rigid", "similarity", "affine")


@dataclass
class Level:
    """One pyramid level: its array (numpy or dask), spacing and origin (world of pixel 0)."""

    data: object
    spacing: np.ndarray
    origin: np.ndarray
    factor: np.ndarray  # size of a pixel in level-0 pixels, per axis

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[: len(self.spacing)])


def is_pyramid(image) -> bool:
    """A sequence of arrays (fine -> coarse): a list, a tuple, or a napari multiscale
    layer's ``data`` (a ``MultiScaleData``, which is a Sequence but not an array)."""
    from collections.abc import Sequence

    if isinstance(image, (str, bytes)) or not isinstance(image, Sequence):
        return False  # numpy and dask arrays are not Sequences
    return len(image) > 0 and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in image)


def _spatial(a, rgb):
    return tuple(a.shape[:-1]) if rgb else tuple(a.shape)


def as_levels(image, *, spacing=None, origin=None, rgb: bool = False, name: str = "image",
              budget: int | None = None) -> list[Level]:
    """Levels of ``image``: the given pyramid, or lazily built ones (2x block averages
    with ``dask.array.coarsen``) down to the first that fits ``budget``."""
    import dask.array as da

    arrays = list(image) if is_pyramid(image) else [image]  # a napari MultiScaleData too
    base = arrays[0]
    shape0 = _spatial(base, rgb)
    ndim = len(shape0)
    sp0 = _geometry(spacing, ndim, 1.0, f"{name}_spacing")
    or0 = _geometry(origin, ndim, 0.0, f"{name}_origin")
    levels = []
    for k, a in enumerate(arrays):
        shape = _spatial(a, rgb)
        if len(shape) != ndim or a.ndim != base.ndim:
            raise ValueError(f"{name} pyramid level {k} has shape {a.shape} but level 0 has "
                             f"{base.shape}: every level needs the same axes (fine -> coarse)")
        ratio = np.array(shape0, float) / np.array(shape, float)
        if np.any(ratio < 1 - 1e-9) or (k > 0 and np.any(np.array(shape) > np.array(levels[-1].shape))):
            raise ValueError(f"{name} pyramid levels must go from fine to coarse; level {k} "
                             f"{shape} is larger than the level before it")
        rounded = np.round(ratio)
        factor = np.where(np.abs(ratio - rounded) <= 0.02 * rounded, rounded, ratio)
        levels.append(Level(a, sp0 * factor, or0 + (factor - 1) / 2 * sp0, factor))
    if budget is not None and not is_pyramid(image):
        # build coarser levels lazily until one fits the budget
        src = base if is_dask(base) else da.from_array(np.asarray(base), chunks=_auto_chunks(base, rgb))
        if not is_dask(base):
            levels[0] = Level(np.asarray(base), sp0, or0, np.ones(ndim))
        f = 1
        while not _fits(levels[-1].shape, budget) and min(levels[-1].shape) >= 8:
            f *= 2
            axes = {ax: f for ax in range(ndim)}
            coarse = da.coarsen(np.mean, src.astype(np.float32), axes, trim_excess=True)
            factor = np.full(ndim, float(f))
            levels.append(Level(coarse.astype(np.float32), sp0 * factor,
                                or0 + (factor - 1) / 2 * sp0, factor))
    return levels


def _auto_chunks(a, rgb):
    ndim = a.ndim - (1 if rgb else 0)
    side = 1024 if ndim <= 2 else 128
    return tuple(min(side, n) for n in a.shape[:ndim]) + ((a.shape[-1],) if rgb else ())


def _fits(shape, budget) -> bool:
    return max(shape) <= budget and float(np.prod(shape)) <= float(budget) ** 2


def choose_level(levels: list[Level], budget: int) -> int:
    """Index of the finest level within the budget (the coarsest one if none is)."""
    for k, lev in enumerate(levels):
        if _fits(lev.shape, budget):
            return k
    return len(levels) - 1


def _level_mask(mask, shape0, level: Level, name):
    """A level-0 (or level-shaped) mask, sampled at the level's pixel centres."""
    if mask is None:
        return None
    m = np.asarray(mask.compute() if is_dask(mask) else mask)
    if m.shape == level.shape:
        return m
    if m.shape != tuple(shape0):
        raise ValueError(f"{name} must have the shape of level 0 {tuple(shape0)} or of the "
                         f"estimation level {level.shape}; got {m.shape}")
    idx = [np.minimum(np.floor((np.arange(n) + 0.5) * f).astype(int), n0 - 1)
           for n, f, n0 in zip(level.shape, level.factor, shape0)]
    return m[np.ix_(*idx)]


def _compute(a) -> np.ndarray:
    return np.asarray(a.compute() if is_dask(a) else a)


def _grey(a, rgb):
    a = np.asarray(a, dtype=np.float32)
    if rgb:
        w = np.array([0.2125, 0.7154, 0.0721], np.float32)
        return a[..., :3] @ w
    return a


def register_pyramid(fixed, moving, *, method, transform, fixed_spacing=None, moving_spacing=None,
                     fixed_origin=None, moving_origin=None, progress=None, cancel=None,
                     pixel_budget=None, pyramid_refine="tiles", refine_tile=None,
                     pyramid_deformable=None, deformable_budget=None, **options):
    """:func:`~.register.register` for pyramids and large (dask) images: see the module
    docstring. Returns a :class:`~.register.RegistrationResult` whose ``warped`` is a
    lazy dask array (a list of them, one per fixed level, when ``fixed`` is a pyramid)."""
    from .lazy import lazy_resample
    from .register import RegistrationCancelled, RegistrationError, RegistrationResult, register

    t0 = time.perf_counter()
    budget = DEFAULT_PIXEL_BUDGET if pixel_budget is None else pixel_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 16:
        raise ValueError(f"pixel_budget (pixels a side of the level used for estimation) must "
                         f"be a whole number >= 16; got {pixel_budget!r}")
    if pyramid_refine not in (None, False, "tiles"):
        raise ValueError(f"pyramid_refine must be 'tiles' (refine on tiles of finer levels) or "
                         f"None; got {pyramid_refine!r}")
    if refine_tile is not None and (isinstance(refine_tile, bool) or not isinstance(
            refine_tile, (int, np.integer)) or refine_tile < 32):
        raise ValueError(f"refine_tile (tile side in pixels) must be a whole number >= 32; got {refine_tile!r}")
    if pyramid_deformable not in (None, False, True, "bspline"):
        raise ValueError(f"pyramid_deformable must be True (or 'bspline': a B-spline refinement "
                         f"on a middle level after the linear one) or None; got {pyramid_deformable!r}")
    if pyramid_deformable and transform not in _LINEAR:
        raise ValueError(f"pyramid_deformable refines a linear transform; use transform='rigid', "
                         f"'similarity' or 'affine' with it, not {transform!r}")
    if deformable_budget is not None and (isinstance(deformable_budget, bool) or not isinstance(
            deformable_budget, (int, np.integer)) or deformable_budget < 32):
        raise ValueError(f"deformable_budget (pixels a side of the level the B-spline refinement "
                         f"runs on) must be a whole number >= 32; got {deformable_budget!r}")
    for name, img in (("fixed", fixed), ("moving", moving)):
        first = img[0] if is_pyramid(img) else img
        if first is None or not hasattr(first, "shape"):
            raise ValueError(f"{name} must be an array, a dask array or a list of arrays (a "
                             f"pyramid, fine -> coarse); got {type(img).__name__}")
        if getattr(first, "dtype", np.dtype(float)).kind in "cOUSV":
            raise ValueError(f"{name} image has dtype {first.dtype}; pass a real-valued numeric array")
    rgb_opt = options.get("rgb")

    def guess_rgb(img):
        a = img[0] if is_pyramid(img) else img
        if rgb_opt is not None:
            return bool(rgb_opt)
        return a.ndim == 3 and a.shape[-1] in (3, 4) and min(a.shape[:2]) > 8

    f_rgb, m_rgb = guess_rgb(fixed), guess_rgb(moving)
    f_levels = as_levels(fixed, spacing=fixed_spacing, origin=fixed_origin, rgb=f_rgb, name="fixed",
                         budget=budget)
    m_levels = as_levels(moving, spacing=moving_spacing, origin=moving_origin, rgb=m_rgb,
                         name="moving", budget=budget)
    ndim = len(f_levels[0].shape)
    if refine_tile is None:
        refine_tile = 512 if ndim == 2 else 96
    if len(m_levels[0].shape) != ndim:
        raise ValueError(f"fixed is {ndim}D {f_levels[0].shape} but moving is "
                         f"{len(m_levels[0].shape)}D {m_levels[0].shape}: both need the same axes")
    kf, km = choose_level(f_levels, budget), choose_level(m_levels, budget)
    fl, ml = f_levels[kf], m_levels[km]

    def report(fraction, message):
        if progress is not None:
            progress(float(min(max(fraction, 0.0), 1.0)), str(message))

    def stop():
        if cancel is not None and cancel():
            raise RegistrationCancelled("registration cancelled")

    level_opts = dict(options)
    for key in ("fixed_mask", "moving_mask"):
        if level_opts.get(key) is not None:
            levels, lev = (f_levels, fl) if key.startswith("fixed") else (m_levels, ml)
            level_opts[key] = _level_mask(level_opts[key], levels[0].shape, lev, key)
    report(0.0, f"reading level {kf} {fl.shape} of fixed, {km} {ml.shape} of moving")
    stop()
    f_arr, m_arr = _compute(fl.data), _compute(ml.data)
    stop()

    def sub_progress(fraction, message):
        report(0.05 + 0.6 * fraction, message)

    coarse = register(f_arr, m_arr, method=method, transform=transform,
                      fixed_spacing=fl.spacing, moving_spacing=ml.spacing,
                      fixed_origin=fl.origin, moving_origin=ml.origin,
                      progress=sub_progress, cancel=cancel, **{**level_opts, "warp": False})
    del f_arr, m_arr
    tf = coarse.transform
    refinements = []
    if pyramid_refine and transform in _LINEAR and tf.is_linear and not tf.is_projective:
        # finer levels, ending at the finest fixed level, in steps as large as the tiles
        # allow: an estimate good to ~2 pixels of one level is within a tile's capture
        # range (a quarter of its side) on a level 2**step finer when 2 * 2**step <=
        # tile / 4 (2D 512 px tiles: 64x, straight to level 0 from a 1-2k px estimate;
        # 3D 96 voxels: 8x)
        step = max(1, int(np.floor(np.log2(max(int(refine_tile) / 8.0, 2.0)))))
        targets = [k for k in range(kf - 1, -1, -1)
                   if (kf - k) % step == 0 or k == 0]
        for i, k in enumerate(targets):
            stop()
            report(0.7 + 0.2 * i / max(len(targets), 1), f"refining on tiles of level {k}")
            tf, rinfo = _refine_on_tiles(f_levels, m_levels, k, tf, transform, f_rgb, m_rgb,
                                         tile=int(refine_tile), budget=budget, stop=stop)
            refinements.append(rinfo)

    deformable = None
    if pyramid_deformable:
        stop()
        report(0.9, "deformable (B-spline) refinement")
        dbudget = int(deformable_budget or (DEFAULT_DEFORMABLE_BUDGET if ndim == 2 else 128))
        tf, deformable = _refine_deformable(
            f_levels, m_levels, tf, f_rgb, m_rgb, budget=dbudget, options=options,
            cancel=cancel)

    report(0.92, "building the lazy warp")
    warped = None
    if options.get("warp", True):
        per_level = []
        for lev in (f_levels if is_pyramid(fixed) else f_levels[:1]):
            src = _source_level(m_levels, lev.spacing)
            per_level.append(lazy_resample(
                src.data, tf, lev.shape, output_spacing=lev.spacing, output_origin=lev.origin,
                input_spacing=src.spacing, input_origin=src.origin, rgb=m_rgb,
                order=min(int(options.get("order", 1)), 1), fast=bool(options.get("fast_warp"))))
        warped = per_level if is_pyramid(fixed) else per_level[0]
    info = dict(coarse.info)
    info.update({
        "pyramid": {
            "pixel_budget": int(budget),
            "fixed_level": kf, "moving_level": km,
            "fixed_levels": [list(lev.shape) for lev in f_levels],
            "moving_levels": [list(lev.shape) for lev in m_levels],
            "estimation_spacing": fl.spacing.tolist(),
            "coarse_transform": coarse.transform.to_dict(),
            "refinements": refinements,
            "deformable": deformable,
        },
        "seconds": time.perf_counter() - t0,
    })
    _ = RegistrationError  # the coarse register() raises it with its own advice
    return RegistrationResult(
        warped=warped, transform=tf, metrics=coarse.metrics, info=info, extras=coarse.extras,
        fixed_shape=f_levels[0].shape, fixed_spacing=tuple(float(v) for v in f_levels[0].spacing),
        fixed_origin=tuple(float(v) for v in f_levels[0].origin), moving_shape=m_levels[0].shape,
        moving_spacing=tuple(float(v) for v in m_levels[0].spacing),
        moving_origin=tuple(float(v) for v in m_levels[0].origin),
    )


def _source_level(levels: list[Level], spacing) -> Level:
    """The coarsest moving level still at least as fine as ``spacing`` on every axis."""
    best = levels[0]
    for lev in levels:
        if np.all(lev.spacing <= np.asarray(spacing) * (1 + 1e-6)):
            best = lev
    return best


def _refine_on_tiles(f_levels, m_levels, k, tf, transform, f_rgb, m_rgb, *, tile, budget, stop):
    """One coarse-to-fine step on fixed level ``k``: a grid of tiles, each the moving image
    warped by ``tf`` and phase-correlated with the fixed tile; a least-squares fit of
    ``transform`` to the tile displacements, composed onto ``tf``."""
    from ..backends.landmarks import fit_landmarks
    from .resample import resample

    lev = f_levels[k]
    shape = np.array(lev.shape)
    # at most 3/4 of an axis, so that tiles can sit where the moving image covers them
    side = np.minimum(np.maximum(shape * 3 // 4, np.minimum(shape, 16)), tile)
    ndim = len(shape)
    src = _source_level(m_levels, lev.spacing)
    # a 3x3 (3x3x3) grid of tiles, inset from the edges, where a motion moves the least
    # of the moving image out of view; the spread of the grid pins rotation and scale
    grids = [np.unique(np.linspace(0.1 * (n - s), 0.9 * (n - s), 3).round().astype(int))
             for n, s in zip(shape, side)]
    src_shape = np.array(src.data.shape[:ndim])
    f_bounds = _chunk_bounds(lev.data, ndim)
    m_bounds = _chunk_bounds(src.data, ndim)
    pairs_f, pairs_m, used, energy = [], [], [], []
    chunk_reads = 0
    for nominal in np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, ndim):
        stop()
        # where, near the grid position, the tile and the moving region it pulls back to
        # touch the fewest source chunks (each chunk read is a decode or a computation)
        corner = _place_tile(nominal, side, shape, tf, lev, src, f_bounds, m_bounds)
        if corner is None:
            continue  # the moving image does not cover a tile here
        origin = lev.origin + corner * lev.spacing
        box = np.array(list(itertools.product(*[(0, s - 1) for s in side])), float)
        back = (tf.apply_inverse(box * lev.spacing + origin) - src.origin) / src.spacing
        sl = tuple(slice(int(c), int(c + s)) for c, s in zip(corner, side))
        f_tile = _grey(_compute(lev.data[sl + ((slice(None),) if f_rgb else ())]), f_rgb)
        # the moving region the tile pulls back into (+ an interpolation margin), read
        # once, made grey, then warped: the same values as a lazy warp of the colour image
        lo = np.maximum(np.floor(back.min(axis=0)).astype(int) - 2, 0)
        hi = np.minimum(np.ceil(back.max(axis=0)).astype(int) + 3, src_shape)
        region = _grey(_compute(src.data[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
                                         + ((slice(None),) if m_rgb else ())]), m_rgb)
        w_tile = resample(region, tf, tuple(int(s) for s in side), output_spacing=lev.spacing,
                          output_origin=origin, input_spacing=src.spacing,
                          input_origin=src.origin + lo * src.spacing, preserve_dtype=False)
        if float(np.std(f_tile)) < 1e-6 or float(np.std(w_tile)) < 1e-6:
            continue  # no texture (e.g. background outside a head): nothing to measure
        shift = _tile_shift(f_tile, w_tile, lev.spacing, origin)
        if shift is None:
            continue
        if np.any(np.abs(shift / lev.spacing) > side / 4):
            continue  # a peak far from zero on a tile is a mismatch, not a correction
        centre = origin + (side - 1) / 2 * lev.spacing
        energy.append(float(np.mean(sum(g * g for g in np.gradient(f_tile)))))
        pairs_f.append(centre + shift)
        pairs_m.append(tf.apply_inverse(centre[None])[0])
        used.append([int(c) for c in corner])
        chunk_reads += _chunks_touched(corner, corner + side, f_bounds) + _chunks_touched(lo, hi, m_bounds)
    need = {"translation": 1, "rigid": ndim, "similarity": ndim, "affine": ndim + 1}[transform]
    info = {"level": k, "tile": [int(s) for s in side], "tiles_used": len(used),
            "chunk_reads": int(chunk_reads)}
    if len(used) < max(need, 2 if transform != "translation" else 1):
        info["skipped"] = f"only {len(used)} usable tiles"
        return tf, info
    # tiles with little texture (mostly background: a sliver of an edge) measure their
    # shift worst (~0.05 voxel off on the head volume, against ~0.01): drop those with
    # less than half the median tile's gradient energy
    strong = np.array(energy) >= np.median(energy) / 2
    if strong.sum() >= max(need, 2 if transform != "translation" else 1):
        info["weak_tiles"] = int((~strong).sum())
        pairs_f = [p for p, ok in zip(pairs_f, strong) if ok]
        pairs_m = [p for p, ok in zip(pairs_m, strong) if ok]
    fixed_pts, moving_pts = np.array(pairs_f), np.array(pairs_m)
    try:
        new, fit, keep = _consensus_fit(fixed_pts, moving_pts, transform, need, lev.spacing,
                                        fit_landmarks, tf)
        info["tiles_used"] = int(keep.sum())
    except ValueError as err:
        info["skipped"] = str(err)
        return tf, info
    info["residual_px_rms"] = float(fit["fre_rms"] / float(np.min(lev.spacing)))
    if info["residual_px_rms"] > MAX_TILE_RMS_PX:
        # the tiles disagree with one another (smooth or empty tiles, repeated patterns):
        # their fit is no better than the estimate it would replace
        info["skipped"] = (f"tiles disagree (rms {info['residual_px_rms']:.2f} px > "
                           f"{MAX_TILE_RMS_PX}): kept the previous estimate")
        return tf, info
    return new, info


MAX_TILE_RMS_PX = 0.5  # tile displacements must fit the model this well (level pixels)


def _chunk_bounds(array, ndim):
    """Chunk boundaries per spatial axis of a dask array (None for numpy: no chunks)."""
    if not is_dask(array):
        return None
    return [np.r_[0, np.cumsum(c)] for c in array.chunks[:ndim]]


def _chunks_touched(lo, hi, bounds) -> int:
    """Chunks of a grid (``bounds``) that the index box ``[lo, hi)`` touches (1 for numpy)."""
    if bounds is None:
        return 1
    n = 1
    for a, b, edges in zip(lo, hi, bounds):
        first = np.searchsorted(edges, a, side="right") - 1
        last = np.searchsorted(edges, max(int(b) - 1, int(a)), side="right") - 1
        n *= int(last - first + 1)
    return n


def _place_tile(nominal, side, shape, tf, lev, src, f_bounds, m_bounds):
    """A tile corner near ``nominal`` (within half a fixed chunk) whose tile and moving
    region touch the fewest chunks (ties: the closest to ``nominal``), among corners
    whose tile the moving image covers whole; None if none is covered."""
    ndim = len(shape)
    src_shape = np.array(src.data.shape[:ndim])
    if f_bounds is None and m_bounds is None:
        axes = [np.array([int(c)]) for c in nominal]
    else:
        axes = []
        for a in range(ndim):
            chunk = int(np.max(np.diff(f_bounds[a]))) if f_bounds is not None else int(side[a])
            reach = chunk // 2
            step = max(1, chunk // 32)
            cand = np.arange(int(nominal[a]) - reach, int(nominal[a]) + reach + 1, step)
            cand = np.unique(np.clip(np.r_[cand, int(nominal[a])], 0, shape[a] - side[a]))
            axes.append(cand)
    corners = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, ndim)
    box = np.array(list(itertools.product(*[(0, s - 1) for s in side])), float)
    pts = (corners[:, None, :] + box[None]) * lev.spacing + lev.origin
    back = (tf.apply_inverse(pts.reshape(-1, ndim)) - src.origin) / src.spacing
    back = back.reshape(len(corners), len(box), ndim)
    lo, hi = back.min(axis=1), back.max(axis=1)
    inside = np.all(lo >= 0, axis=1) & np.all(hi <= src_shape - 1, axis=1)
    if not inside.any():
        return None
    corners, lo, hi = corners[inside], lo[inside], hi[inside]
    cost = np.zeros(len(corners))
    for bounds, a, b in ((f_bounds, corners, corners + side),
                         (m_bounds, np.floor(lo) - 2, np.ceil(hi) + 3)):
        if bounds is None:
            continue
        n = np.ones(len(corners))
        for ax, edges in enumerate(bounds):
            first = np.searchsorted(edges, np.maximum(a[:, ax], 0), side="right") - 1
            last = np.searchsorted(edges, np.maximum(b[:, ax] - 1, a[:, ax]), side="right") - 1
            n *= last - first + 1
        cost += n
    dist = np.abs(corners - np.asarray(nominal)).sum(axis=1)
    best = np.lexsort((dist, cost))[0]
    return corners[best].astype(int)


def _refine_deformable(f_levels, m_levels, tf, f_rgb, m_rgb, *, budget, options, cancel):
    """B-spline (intensity) refinement of the linear ``tf`` on the finest levels within
    ``budget`` pixels a side. The result is ``tf`` followed by a displacement field in
    world units (resampled onto a grid of at most FIELD_NODES nodes a side spanning the
    level's field of view), so it applies to every level and warps block by block."""
    from .register import register
    from .transform import FieldStep

    t0 = time.perf_counter()
    kf, km = choose_level(f_levels, budget), choose_level(m_levels, budget)
    fl, ml = f_levels[kf], m_levels[km]
    f_arr = _grey(_compute(fl.data), f_rgb)
    m_arr = _grey(_compute(ml.data), m_rgb)
    extra = {k: options[k] for k in ("seed", "fixed_mask", "moving_mask") if options.get(k) is not None}
    for key, levels, lev in (("fixed_mask", f_levels, fl), ("moving_mask", m_levels, ml)):
        if key in extra:
            shape = tuple(np.shape(extra[key]))
            if shape in (tuple(levels[0].shape), tuple(lev.shape)):
                extra[key] = _level_mask(extra[key], levels[0].shape, lev, key)
            else:
                del extra[key]  # given at the estimation level's shape: not for this level
    r = register(f_arr, m_arr, method="intensity", transform="bspline", linear_stage="none",
                 init=tf, fixed_spacing=fl.spacing, moving_spacing=ml.spacing,
                 fixed_origin=fl.origin, moving_origin=ml.origin, cancel=cancel, warp=False,
                 score=False, rgb=False, **extra)
    del f_arr, m_arr
    steps = []
    for step in r.transform.steps:
        if isinstance(step, FieldStep):
            step = _coarser_field(step, FIELD_NODES if step.ndim == 2 else 65)
        steps.append(step)
    out = Transform(steps=steps)
    fields = [s for s in steps if isinstance(s, FieldStep)]
    info = {"level": kf, "moving_level": km, "shape": list(fl.shape),
            "spacing": fl.spacing.tolist(),
            "field_nodes": [list(s.field.shape[:-1]) for s in fields],
            "max_displacement": float(max((np.abs(s.field).max() for s in fields), default=0.0)),
            "jacobian_determinant": r.info.get("jacobian_determinant"),
            "iterations": r.info.get("iterations"), "stop_condition": r.info.get("stop_condition"),
            "seconds": time.perf_counter() - t0}
    return out, info


def _coarser_field(step, nodes: int):
    """The same displacement field sampled on at most ``nodes`` nodes a side over the
    same field of view (a B-spline of a few mesh cells varies slowly: linear
    interpolation between such nodes differs from it by far less than a pixel)."""
    from .transform import FieldStep

    shape = np.array(step.field.shape[:-1])
    if np.all(shape <= nodes):
        return step
    new = np.minimum(shape, nodes)
    spacing = step.spacing * (shape - 1) / np.maximum(new - 1, 1)
    axes = [np.arange(n) * sp + o for n, sp, o in zip(new, spacing, step.origin)]
    pts = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    field = step.displacement(pts).reshape(tuple(new) + (step.ndim,))
    return FieldStep(field, spacing, step.origin, step.direction)


def _consensus_fit(fixed_pts, moving_pts, transform, need, spacing, fit_landmarks, current):
    """Fit ``transform`` to the tile pairs that agree: a first consensus around the median
    of the tiles' corrections to the ``current`` estimate (robust to a cluster of bad
    tiles that agree with one another, which a first least-squares fit would absorb),
    then fits that keep the tiles within max(0.1 px, 3x the median residual), twice.
    Returns (transform, fit, kept mask)."""
    px = float(np.min(spacing))
    corrections = (fixed_pts - current.apply(moving_pts)) / px
    dev = np.linalg.norm(corrections - np.median(corrections, axis=0), axis=1)
    sigma = 1.4826 * float(np.median(dev))
    # an estimate good to ~1 pixel of a coarser level leaves corrections that differ
    # across the tiles by about that much: 1.5 px of this level is the least tolerance
    keep = dev <= max(1.5, 3 * sigma)
    if keep.sum() < need:
        keep = np.ones(len(fixed_pts), bool)
    new, fit = fit_landmarks(fixed_pts[keep], moving_pts[keep], transform, leave_one_out=False)
    for _ in range(2):
        res = np.linalg.norm(new.apply(moving_pts) - fixed_pts, axis=1) / px
        nxt = res <= max(0.1, 3 * float(np.median(res[keep])))
        if nxt.sum() < need or np.array_equal(nxt, keep):
            break
        keep = nxt
        new, fit = fit_landmarks(fixed_pts[keep], moving_pts[keep], transform, leave_one_out=False)
    return new, fit, keep


MIN_TILE_PEAK = 0.2  # phase-correlation peak a tile's last pass must reach to count


def _tile_shift(f_tile, w_tile, spacing, origin):
    """World shift that moves the warped moving tile onto the fixed tile (sub-pixel phase
    correlation), or None when the tile cannot be measured: also when the correlation
    peak is weak (a tile of background with a sliver of edge: its sub-pixel passes on the
    tile's centre saw nothing, and returned a shift of noise, measured ~2 voxels off on
    the 256x512x512 head volume)."""
    from .register import RegistrationError, register

    try:
        # a 1/20-pixel peak on the whole tile: the least-squares polish below does the rest
        r = register(f_tile, w_tile, method="fourier", transform="translation",
                     fixed_spacing=spacing, moving_spacing=spacing, fixed_origin=origin,
                     moving_origin=origin, warp=False, score=False, upsample=20, iterations=0)
    except (RegistrationError, ValueError):
        return None
    peak = r.info.get("peak")
    if peak is not None and np.isfinite(peak) and float(peak) < MIN_TILE_PEAK:
        return None
    shift = r.transform.matrix[:-1, -1]
    polished = _polish_shift(f_tile, w_tile, shift / np.asarray(spacing, float))
    return shift if polished is None else polished * np.asarray(spacing, float)


def _polish_shift(f_tile, w_tile, shift_px, iterations: int = 3):
    """Gauss-Newton (Lucas-Kanade) on the whole tile, from the phase-correlation shift
    (pixels, moving -> fixed): ``fixed(x) ~ a * moving(x - s) + b``. Phase correlation's
    sub-pixel passes see only the tile's centre (64^3 in 3D) and whiten the spectrum,
    which on smooth volumes leaves ~0.05 voxel of noise; least squares on every pixel of
    a smooth tile is what such tiles measure best. None when it does not converge."""
    from scipy import ndimage

    f = np.asarray(f_tile, np.float64)
    m = np.asarray(w_tile, np.float32)
    s = np.asarray(shift_px, float).copy()
    margin = int(np.ceil(np.max(np.abs(s)))) + 4
    if min(f.shape) <= 2 * margin + 8:
        return None
    inner = tuple(slice(margin, n - margin) for n in f.shape)
    fi = f[inner].ravel()
    coeffs = ndimage.spline_filter(m, order=3, output=np.float32)  # once, not per pass
    for _ in range(iterations):
        shifted = ndimage.shift(coeffs, s, order=3, mode="nearest", prefilter=False)
        grads = np.gradient(shifted)
        g = np.stack([gr[inner].ravel() for gr in grads], axis=1)
        w = shifted[inner].ravel().astype(np.float64)
        gtg = np.linalg.eigvalsh(g.T @ g)
        if gtg[0] <= 1e-3 * gtg[-1]:
            return None  # structure along one direction only (an edge): shift undefined
        # f = a * (w - g . d) + b  ->  unknowns (a*d, a, b), linear least squares
        a_mat = np.c_[-g, w, np.ones_like(w)]
        sol, *_ = np.linalg.lstsq(a_mat, fi, rcond=None)
        gain = sol[-2]
        if not np.isfinite(gain) or abs(gain) < 1e-6:
            return None
        d = sol[:-2] / gain
        if not np.all(np.isfinite(d)) or np.max(np.abs(d)) > 1.0:
            return None  # a polish moves by less than a pixel, or it is not converging
        s = s + d
        if np.max(np.abs(d)) < 2e-3:
            break
    return s


def level_warper(moving, transform: Transform, *, spacing=None, origin=None, rgb: bool = False,
                 labels: bool = False, chunks=None, fast: bool = False):
    """A function ``(shape, spacing, origin) -> lazy warp`` that warps ``moving`` (an
    array or a pyramid) onto any output grid, reading the moving level whose pixels are
    closest to (and not larger than) the output's: what ``io_big.write_ome_zarr(...,
    make_level=...)`` needs to write every level of a warped pyramid straight from the
    moving pyramid, without downsampling the warped level 0."""
    from .lazy import lazy_resample

    levels = as_levels(moving, spacing=spacing, origin=origin, rgb=rgb, name="moving",
                       budget=None if (is_pyramid(moving) or labels) else 512)

    def make(shape, out_spacing, out_origin):
        src = _source_level(levels, out_spacing)
        return lazy_resample(src.data, transform, shape, output_spacing=out_spacing,
                             output_origin=out_origin, input_spacing=src.spacing,
                             input_origin=src.origin, rgb=rgb, labels=labels, chunks=chunks,
                             fast=fast)

    return make
