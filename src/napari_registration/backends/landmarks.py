"""Landmarks backend: paired points -> least-squares transform or thin-plate spline.

Points are napari world coordinates in napari axis order, paired by index:
``moving_points[i]`` shows the same feature as ``fixed_points[i]``. The fitted
transform maps moving world -> fixed world. Image intensities are not used (the core
still warps the moving image and scores the result).

* ``translation``: mean offset (1 pair);
* ``rigid`` / ``similarity``: closed-form least squares (Umeyama 1991: SVD of the
  cross-covariance, with the reflection fix), 2 pairs in 2D, 3 non-collinear in 3D;
* ``affine``: linear least squares, D+1 pairs not all on one line (2D) / plane (3D);
* ``tps``: thin-plate spline (deformable, interpolates the landmarks), D+1 pairs.

Diagnostics in ``info``: per-pair residuals (fiducial registration error, FRE) and
leave-one-out errors (each pair predicted by the fit to all the others: an honest
estimate of the target registration error, TRE, between landmarks).
"""

from __future__ import annotations

import numpy as np

from ..core.register import BackendResult
from ..core.transform import Transform

TRANSFORMS = ("translation", "rigid", "similarity", "affine", "tps")
NDIMS = (2, 3)
DESCRIPTION = "Paired landmarks (Points layers): least-squares fit or thin-plate spline"

_LOO_MAX = 200  # leave-one-out errors are computed up to this many pairs


def min_points(transform: str, ndim: int) -> int:
    """Fewest landmark pairs that determine ``transform`` in ``ndim`` dimensions."""
    if transform == "translation":
        return 1
    if transform in ("rigid", "similarity"):
        return 2 if ndim == 2 else 3
    if transform in ("affine", "tps"):
        return ndim + 1
    raise ValueError(f"landmarks cannot fit transform {transform!r}; choose one of {list(TRANSFORMS)}")


def _validate(fixed_points, moving_points, transform):
    if fixed_points is None or moving_points is None:
        raise ValueError("landmarks needs fixed_points and moving_points: (N, D) arrays of paired "
                         "points in napari world coordinates (e.g. two Points layers' data "
                         "mapped to world)")
    pts = []
    for name, p in (("fixed_points", fixed_points), ("moving_points", moving_points)):
        try:
            a = np.array(p, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an (N, D) array of numbers") from None
        if a.ndim != 2 or a.shape[1] not in (2, 3):
            raise ValueError(f"{name} must have shape (N, 2) or (N, 3) in napari axis order; "
                             f"got {a.shape}")
        if not np.all(np.isfinite(a)):
            bad = np.flatnonzero(~np.all(np.isfinite(a), axis=1))
            raise ValueError(f"{name} has NaN/inf coordinates at pair(s) {bad.tolist()}; "
                             "delete or re-click those points")
        pts.append(a)
    fixed, moving = pts
    if fixed.shape[1] != moving.shape[1]:
        raise ValueError(f"fixed_points are {fixed.shape[1]}D but moving_points are "
                         f"{moving.shape[1]}D")
    if len(fixed) != len(moving):
        raise ValueError(f"landmarks are paired by index, but there are {len(fixed)} fixed and "
                         f"{len(moving)} moving points: add or delete points so both have the "
                         "same count")
    ndim = fixed.shape[1]
    need = min_points(transform, ndim)
    if len(fixed) < need:
        raise ValueError(f"a {ndim}D {transform} fit needs at least {need} landmark pairs; got "
                         f"{len(fixed)}. Add {need - len(fixed)} more pair(s)"
                         + (" or choose transform='translation'" if transform != "translation" else ""))
    _check_configuration(fixed, moving, transform)
    return fixed, moving


def _rank(points) -> int:
    """Dimension of the affine hull of the points (0 point, 1 line, 2 plane, 3 volume)."""
    centred = points - points.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv.size == 0 or sv[0] == 0:
        return 0
    return int(np.sum(sv > 1e-9 * sv[0] * max(1.0, np.sqrt(len(points)))))


def _check_configuration(fixed, moving, transform):
    ndim = fixed.shape[1]
    if transform == "translation":
        return
    shape_word = {1: "one line", 2: "one plane"}
    if transform in ("rigid", "similarity"):
        need = 1 if ndim == 2 else 2
        for name, p in (("moving", moving), ("fixed", fixed)):
            r = _rank(p)
            if r < need:
                where = "the same place" if r == 0 else shape_word[r]
                raise ValueError(f"the {name} landmarks are all at {where}, which leaves the "
                                 f"{transform} rotation undetermined: spread the points out "
                                 + ("(at least 2 distinct points)" if ndim == 2
                                    else "(at least 3 points not on one line)"))
        return
    # affine and tps need points spanning the space on both sides
    for name, p in (("moving", moving), ("fixed", fixed)):
        r = _rank(p)
        if r < ndim:
            where = "the same place" if r == 0 else shape_word[r]
            raise ValueError(
                f"the {name} landmarks lie on {where}: a {transform} fit needs points that "
                f"span {ndim}D (not all {'collinear' if ndim == 2 else 'coplanar'}); add a point "
                "off that " + ("line" if r == 1 else "plane") + " or choose transform='similarity'")
    if transform == "tps":
        for name, p in (("moving", moving), ("fixed", fixed)):
            d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)
            d[np.diag_indices(len(p))] = np.inf
            i, j = np.unravel_index(int(np.argmin(d)), d.shape)
            scale = np.ptp(p, axis=0).max()
            if d[i, j] <= 1e-9 * max(scale, 1.0):
                raise ValueError(f"{name} landmarks of pairs {min(i, j)} and {max(i, j)} are at "
                                 "the same position: a thin-plate spline cannot map one point to "
                                 "two places; delete one of them")


# --------------------------------------------------------------------------- fits
def umeyama(moving, fixed, *, with_scale: bool) -> np.ndarray:
    """Least-squares rigid (or similarity) matrix mapping ``moving`` onto ``fixed``.

    Closed form of Umeyama (1991): the rotation is ``U diag(1, .., det) V^T`` from the
    SVD of the cross-covariance; ``det`` excludes reflections."""
    n, d = moving.shape
    mu_m, mu_f = moving.mean(axis=0), fixed.mean(axis=0)
    xm, xf = moving - mu_m, fixed - mu_f
    cov = xf.T @ xm / n
    u, s, vt = np.linalg.svd(cov)
    sign = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    if with_scale:
        var_m = float((xm ** 2).sum() / n)
        scale = float((s * sign).sum() / var_m)
    else:
        scale = 1.0
    m = np.eye(d + 1)
    m[:d, :d] = scale * rot
    m[:d, d] = mu_f - scale * rot @ mu_m
    return m


def _affine(moving, fixed) -> np.ndarray:
    n, d = moving.shape
    design = np.hstack([moving, np.ones((n, 1))])
    sol, *_ = np.linalg.lstsq(design, fixed, rcond=None)
    m = np.eye(d + 1)
    m[:d, :] = sol.T
    return m


def _fit(fixed, moving, transform, regularization) -> Transform:
    d = fixed.shape[1]
    if transform == "translation":
        m = np.eye(d + 1)
        m[:d, d] = (fixed - moving).mean(axis=0)
        return Transform(m)
    if transform in ("rigid", "similarity"):
        return Transform(umeyama(moving, fixed, with_scale=transform == "similarity"))
    if transform == "affine":
        return Transform(_affine(moving, fixed))
    from ..core.tps import TpsStep

    return Transform(steps=[TpsStep(moving, fixed, regularization)])


def fit_landmarks(fixed_points, moving_points, transform: str = "affine", *,
                  regularization: float = 0.0, leave_one_out: bool = True) -> tuple[Transform, dict]:
    """Fit a moving world -> fixed world transform to paired points.

    Parameters
    ----------
    fixed_points, moving_points : (N, D) array_like
        Paired by index, napari world coordinates and axis order.
    transform : str
        "translation", "rigid", "similarity", "affine" or "tps".
    regularization : float
        Thin-plate spline smoothing (0 = interpolate the landmarks exactly).
    leave_one_out : bool
        Also predict each pair from the fit to all the others (TRE estimate).

    Returns
    -------
    (Transform, dict)
        The transform and diagnostics: ``residuals`` (per pair, world units),
        ``fre_rms``, ``fre_mean``, ``fre_max``, ``loo_errors`` and ``tre_loo_mean``
        (NaN where the remaining pairs cannot determine the fit).

    Raises
    ------
    ValueError
        Too few pairs for the model, counts that differ, NaNs, or a degenerate
        configuration (e.g. collinear points for an affine fit).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"landmarks cannot fit transform {transform!r}; choose one of {list(TRANSFORMS)}")
    if float(regularization) < 0:
        raise ValueError(f"regularization must be >= 0; got {regularization}")
    fixed, moving = _validate(fixed_points, moving_points, transform)
    try:
        tf = _fit(fixed, moving, transform, regularization)
    except ValueError as err:
        if "invertible" in str(err):
            raise ValueError(f"the {transform} fit to these landmarks is not invertible (points "
                             "nearly collinear/coplanar, or mirrored): add better spread points "
                             "or choose transform='similarity'") from None
        raise
    residuals = np.linalg.norm(tf.apply(moving) - fixed, axis=1)
    n = len(fixed)
    loo = np.full(n, np.nan)
    if leave_one_out and n <= _LOO_MAX:
        for i in range(n):
            keep = np.arange(n) != i
            try:
                others = _validate(fixed[keep], moving[keep], transform)
                t_i = _fit(*others, transform, regularization)
            except ValueError:
                continue
            loo[i] = float(np.linalg.norm(t_i.apply(moving[i:i + 1])[0] - fixed[i]))
    info = {
        "transform": transform,
        "n_points": int(n),
        "residuals": residuals.tolist(),
        "fre_rms": float(np.sqrt(np.mean(residuals ** 2))),
        "fre_mean": float(residuals.mean()),
        "fre_max": float(residuals.max()),
        "loo_errors": loo.tolist(),
        "tre_loo_mean": float(np.nanmean(loo)) if np.isfinite(loo).any() else float("nan"),
    }
    return tf, info


# --------------------------------------------------------------------------- backend
def register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress, cancel,
             fixed_mask=None, moving_mask=None, fixed_points=None, moving_points=None,
             regularization: float = 0.0) -> BackendResult:
    """Fit ``transform`` to paired landmarks; the images are not used.

    Options
    -------
    fixed_points, moving_points : (N, D) arrays
        Paired landmarks in napari world coordinates (``layer.data`` of a Points layer
        mapped to world, i.e. ``layer.data * layer.scale + layer.translate`` for a
        layer without rotation/shear).
    regularization : float
        Thin-plate spline smoothing; 0 interpolates the landmarks exactly.
    """
    progress(0.1, f"fitting {transform} to landmarks")
    tf, info = fit_landmarks(fixed_points, moving_points, transform, regularization=regularization)
    fixed_pts = np.asarray(fixed_points, float)
    moving_pts = np.asarray(moving_points, float)
    extras = {
        "fixed_points": fixed_pts,
        "moving_points": moving_pts,
        "fixed_mapped_points": tf.apply(moving_pts),  # moving landmarks sent to the fixed world
    }
    progress(1.0, "done")
    return BackendResult(tf, info, extras)
