"""Fast, precise final stage for linear transforms: inverse-compositional Gauss-Newton
on a cubic-spline image pyramid (the approach of TurboReg / pystackreg and of Baker &
Matthews' Lucas-Kanade framework), in 2D and 3D.

Given a start close to the answer (within a few pixels of the coarsest level used), it
minimises the sum of squared differences between the fixed image and the moving image
sampled through the transform, allowing a linear intensity change (gain and offset,
fitted in closed form at every iteration, so an inverted but otherwise linear contrast
works too). The moving image is interpolated with cubic B-splines
(``scipy.ndimage.spline_filter`` once per level, then ``map_coordinates`` with
``prefilter=False``); the Jacobian comes from the fixed image's gradient, computed once
per level, so the Gauss-Newton matrix is cheap and each iteration costs one spline
interpolation at the sampled fixed pixels.

This is a same-modality method: when the fixed and the warped moving image are not
linearly related (|NCC| below ``min_ncc`` at the start), it declines and returns the
start unchanged, saying why in the returned info.

Convention: ``transform`` maps moving world -> fixed world (as everywhere in this
package); internally the warp maps fixed world points to moving world points.
"""

from __future__ import annotations

import time

import numpy as np

from .transform import Transform

MODELS = ("translation", "rigid", "similarity", "affine")


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^D blocks (the array cropped to whole blocks)."""
    if factor == 1:
        return np.asarray(image, np.float32)
    a = np.asarray(image, np.float32)
    crop = tuple(slice(0, (n // factor) * factor) for n in a.shape)
    a = a[crop]
    if a.ndim == 2 and factor in (2, 4):
        # the same float32 sums in the same order as the mean below (each block row
        # left to right, then the rows top to bottom; bit-identical, checked in
        # tests/test_refine_speed_paths.py), from strided views: ~10x faster at 704^2
        rows = []
        for i in range(factor):
            r = a[i::factor, 0::factor].copy()
            for j in range(1, factor):
                r += a[i::factor, j::factor]
            rows.append(r)
        out = rows[0]
        for r in rows[1:]:
            out += r
        out /= np.float32(factor * factor)
        return out
    shape = []
    for n in a.shape:
        shape += [n // factor, factor]
    return a.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)), dtype=np.float32)


def _generators(model: str, ndim: int) -> list[np.ndarray]:
    """Infinitesimal generators of the linear part, per parameter (centred coordinates)."""
    gens: list[np.ndarray] = []
    if model in ("rigid", "similarity"):
        for i in range(ndim):
            for j in range(i + 1, ndim):
                g = np.zeros((ndim, ndim))
                g[i, j], g[j, i] = -1.0, 1.0
                gens.append(g)
        if model == "similarity":
            gens.append(np.eye(ndim))
    elif model == "affine":
        for i in range(ndim):
            for j in range(ndim):
                g = np.zeros((ndim, ndim))
                g[i, j] = 1.0
                gens.append(g)
    return gens


def _delta_matrix(dp: np.ndarray, gens, ndim: int, model: str) -> np.ndarray:
    """Homogeneous (centred) matrix of a parameter update: linear part exp(sum dp_k G_k)
    for rigid/similarity (stays exactly a rotation / scaled rotation), I + sum for affine."""
    lin = np.zeros((ndim, ndim))
    for k, g in enumerate(gens):
        lin += dp[k] * g
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] = _exp(lin) if model in ("rigid", "similarity") else np.eye(ndim) + lin
    out[:ndim, ndim] = dp[len(gens):]
    return out


def _exp(lin: np.ndarray) -> np.ndarray:
    """exp(skew + s I) in closed form (Rodrigues): an exact (scaled) rotation. (scipy's
    expm is exact too but costs milliseconds per call through BLAS on a busy machine.)"""
    n = lin.shape[0]
    s = float(np.trace(lin)) / n
    w = lin - s * np.eye(n)
    w = 0.5 * (w - w.T)
    if n == 2:
        a = w[1, 0]
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    else:
        v = np.array([w[2, 1], w[0, 2], w[1, 0]])
        theta = float(np.sqrt(v @ v))
        if theta < 1e-12:
            rot = np.eye(3) + w
        else:
            rot = (np.eye(3) + np.sin(theta) / theta * w
                   + (1 - np.cos(theta)) / theta ** 2 * (w @ w))
    return np.exp(s) * rot


def _dot(a, b) -> float:
    """Dot product without BLAS: on a shared machine OpenBLAS's thread wake-up made a
    100k-element dot cost 15-20 ms instead of 0.1 ms."""
    return float(np.einsum("i,i->", a, b))


def _spline_gradient(image: np.ndarray) -> list[np.ndarray]:
    """Exact gradient, at the pixels, of the image's cubic B-spline interpolant (the
    model the moving image is sampled with): on the coefficients, the derivative kernel
    (-1/2, 0, 1/2) along one axis and the value kernel (1/6, 2/3, 1/6) along the others.
    Central differences of the pixels are a blurred derivative; with them every
    Gauss-Newton step fell a few percent short and the finest level needed 5-6 steps."""
    from scipy import ndimage

    c = ndimage.spline_filter(np.asarray(image, np.float64), order=3, mode="mirror")
    return spline_gradient_from_coefficients(c)


def _spline_gradient_at(image: np.ndarray, idx: np.ndarray, coeffs=None) -> np.ndarray:
    """(N, 2) values of :func:`_spline_gradient` of a 2D ``image`` at the flat indices
    ``idx``: the same numbers (to rounding). Interior pixels (the refinement's samples)
    take the separable 3x3 kernel from the spline coefficients at their six neighbours
    that it weights: no image-size passes beyond the coefficients themselves (the four
    full-image correlations cost ~40 ms at 704^2, the gathers ~3 ms for 131k samples).
    ``coeffs``: the image's cubic-spline coefficients (float64, mirror) when made
    already."""
    from scipy import ndimage

    image = np.asarray(image)
    c = (ndimage.spline_filter(np.asarray(image, np.float64), order=3, mode="mirror")
         if coeffs is None else coeffs)
    rows, cols = image.shape
    idx = np.asarray(idx, np.int64)
    r, k = np.divmod(idx, cols)
    if idx.size and (r.min() < 1 or r.max() > rows - 2 or k.min() < 1 or k.max() > cols - 2):
        # a border pixel: the mirror boundary applies; full-image passes
        scratch = np.empty_like(c)
        g = np.empty_like(c)
        out = np.empty((idx.size, 2))
        for axis in range(2):
            ndimage.correlate1d(c, [-0.5, 0.0, 0.5], axis=axis, mode="mirror", output=scratch)
            ndimage.correlate1d(scratch, [1 / 6, 2 / 3, 1 / 6], axis=1 - axis, mode="mirror",
                                output=g)
            out[:, axis] = g.ravel()[idx]
        return out
    del r, k
    # the eight neighbours, each gathered once (np.take on a shifted view of the
    # coefficients with one shifted index array: no index arithmetic per neighbour)
    flat = c.ravel()
    base = idx - (cols + 1)                   # >= 0: the samples are interior
    nb = {}
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                start = (di + 1) * cols + (dj + 1)
                nb[di, dj] = np.take(flat[start:], base)
    del base
    out = np.empty((idx.size, 2))
    tmp = np.empty(idx.size)
    for axis in range(2):
        # derivative (-1/2, 0, 1/2) along the axis at the three positions across it,
        # then the value kernel (1/6, 2/3, 1/6) across them (the order of the filters)
        acc = out[:, axis]
        for t, weight in ((-1, 1 / 6), (0, 2 / 3), (1, 1 / 6)):
            hi, lo = ((1, t), (-1, t)) if axis == 0 else ((t, 1), (t, -1))
            np.subtract(nb[hi], nb[lo], out=tmp)
            tmp *= 0.5 * weight
            if t == -1:
                acc[...] = tmp
            else:
                acc += tmp
    return out


def _generator_column(xc: np.ndarray, g: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Jacobian column of one generator: sum over (e, d) of g[e, d] * xc[:, d] *
    grad[:, e], from the generator's non-zero entries (one or two products for the
    models here; the three-operand einsum took ~8 ms per column at 131k samples)."""
    col = np.zeros(len(xc))
    tmp = np.empty(len(xc))
    for e, d in zip(*np.nonzero(g)):
        np.multiply(xc[:, d], grad[:, e], out=tmp)
        if g[e, d] != 1.0:
            tmp *= g[e, d]
        col += tmp
    return col


def spline_gradient_from_coefficients(c) -> list[np.ndarray]:
    """Per axis, the derivative of the cubic spline with coefficients ``c`` at the grid
    points (mirror boundary): (-1/2, 0, 1/2) along that axis, (1/6, 2/3, 1/6) along the
    others."""
    from scipy import ndimage

    out = []
    scratch = np.empty_like(c) if c.ndim == 2 else None
    for axis in range(c.ndim):
        if scratch is not None:  # 2D: one scratch array, one output per axis
            ndimage.correlate1d(c, [-0.5, 0.0, 0.5], axis=axis, mode="mirror", output=scratch)
            g = ndimage.correlate1d(scratch, [1 / 6, 2 / 3, 1 / 6], axis=1 - axis, mode="mirror")
            out.append(g)
            continue
        g = ndimage.correlate1d(c, [-0.5, 0.0, 0.5], axis=axis, mode="mirror")
        for other in range(c.ndim):
            if other != axis:
                g = ndimage.correlate1d(g, [1 / 6, 2 / 3, 1 / 6], axis=other, mode="mirror")
        out.append(g)
    return out


def auto_levels(shape, start_error_px: float = 2.0, min_side: int = 48, max_factor: int = 8) -> list[int]:
    """Pyramid factors, coarse to fine: enough for a start ``start_error_px`` away
    (each level's capture range is about one or two of its pixels), while the coarsest
    level keeps at least ``min_side`` pixels per axis."""
    factors = [1]
    f = 1
    while (f * 2 <= max_factor and min(shape) / (f * 2) >= min_side
           and f < max(1.0, start_error_px)):
        f *= 2
        factors.insert(0, f)
    return factors


def refine_linear(fixed, moving, transform: Transform, *, model: str,
                  fixed_spacing=None, moving_spacing=None, fixed_mask=None, moving_mask=None,
                  levels=None, start_error_px: float = 2.0, iterations: int = 40,
                  max_samples: int | None = None, tolerance: float = 1e-4,
                  min_ncc: float = 0.5, robust: float | None | str = "auto",
                  cancel=None, robust_gate: float | None = None,
                  samples: str = "strong",
                  smooth: float | None | str = "auto") -> tuple[Transform, dict]:
    """Refine a linear ``transform`` (moving world -> fixed world) of kind ``model``.

    Parameters
    ----------
    fixed, moving : ndarray
        2D or 3D images (any float range; compared up to gain and offset).
    transform : Transform
        Start, linear (not projective); e.g. from phase correlation or SimpleITK.
    model : {"translation", "rigid", "similarity", "affine"}
        Parameters that are refined (a rigid start stays rigid, etc.).
    levels : sequence of int or None
        Pyramid factors, coarse to fine (block means); None: from ``start_error_px``.
    iterations : int
        At most this many Gauss-Newton iterations per level.
    max_samples : int or None
        At most this many fixed pixels per level (None: 2**17 in 2D, 2**15 in 3D),
        chosen as ``samples`` says.
    samples : {"strong", "random"}
        Which pixels when there are more than ``max_samples`` (interior pixels with a
        non-zero gradient; the fixed mask applies): "strong", the stronger-gradient half,
        evenly spread in raster order (deterministic; flat areas carry little signal);
        "random", a seeded random subset of all of them (deterministic too). The strong
        half alone biased a 12-parameter 3D fit (MNI T1 3x2x2 mm affine: 0.076 mm with
        any number of its pixels, 0.033 with every pixel); 2**16 random pixels of all
        reached 0.033-0.036 at a quarter of the cost of every pixel.
    tolerance : float
        Stop a level when an update moves no pixel of the fixed grid by more than this
        many pixels (of the finest level).
    min_ncc : float
        Decline (return the start) when |NCC| of the start is below this: the images are
        not related by a linear intensity change, so least squares does not apply.
    robust : float, None or "auto"
        After the least-squares levels, a last pass on the finest level with Tukey's
        biweight of this cutoff (in robust standard deviations of the residual): samples
        that do not fit (parts of one image missing from the other, e.g. a zero-filled
        border, an occlusion) stop pulling the fit (retina affine 2.4e-3 -> 0.8e-3 px).
        It is kept when it lowers the biweight loss. None: least squares only; "auto":
        4.685 in 2D, None in 3D (not measured there).
    robust_gate : float or None
        Skip the biweight pass when its first step, computed from the least-squares
        result's residual (gain and offset reweighted, one weighted solve: no
        interpolation), would move no pixel of the fixed grid by this many finest
        pixels. None: ``tolerance``, where the pass itself would stop at that first
        step with the least-squares result, so skipping changes nothing but the time.
        0: always run the pass.
    smooth : float, None or "auto"
        The biweight pass runs on copies of both images smoothed by a Gaussian of this
        sigma (finest fixed pixels; the moving copy's sigma is divided by the
        least-squares result's scale, so that both blurs are the same in the fixed
        frame). The residual left at the true alignment is mostly interpolation error of
        the finest detail (near the sampling limit), and it is correlated with the
        image gradient, so it biases the fit; a light blur removes most of that detail
        and little of the alignment signal. Measured from ~1 px off on 60 synthetic
        pairs of five photos (both preprocessed copies): geometric-mean TRE 9.2e-4 ->
        5.8e-4 px; the report's retina_affine 6.4e-4 -> 6.9e-5 (docs/benchmarks.md,
        "2D linear precision, round 4"). Only with ``robust``.
        The least-squares levels stay on the unsmoothed images (a blur widens
        zero-filled borders, which pulled a plain least-squares fit 0.02 px off; the
        biweight drops them), and ``robust_gate`` is not used (the probe is of the
        unsmoothed pass). None or 0: the pass on the images as given; "auto": 0.6 in
        2D, None in 3D (not measured there).

    Returns
    -------
    (Transform, info) : the refined transform (or the start, when declined or when the
        refinement did not lower the residual) and a record: ``accepted``, ``reason``,
        per-level iterations, residual RMS and |NCC| before and after on the finest level.
    """
    if robust == "auto":
        robust = 4.685 if np.ndim(fixed) == 2 else None
    if samples not in ("strong", "random"):
        raise ValueError(f"refine_linear: samples must be 'strong' or 'random'; got {samples!r}")
    if isinstance(smooth, str) and smooth == "auto":
        smooth = 0.6 if np.ndim(fixed) == 2 else None
    if smooth is not None:
        try:
            sigma = float(smooth)
        except (TypeError, ValueError):
            sigma = float("nan")
        if not (np.isfinite(sigma) and sigma >= 0):
            raise ValueError("refine_linear: smooth must be None, 'auto' or a Gaussian sigma "
                             f">= 0 (finest fixed pixels); got {smooth!r}")
        smooth = sigma or None
    common = dict(model=model, fixed_spacing=fixed_spacing, moving_spacing=moving_spacing,
                  fixed_mask=fixed_mask, moving_mask=moving_mask, iterations=iterations,
                  max_samples=max_samples, tolerance=tolerance, cancel=cancel, samples=samples)
    # the biweight pass works on the finest level the least-squares pass sampled: the
    # level's samples, spline coefficients and Jacobian are made once for both
    common["level_cache"] = {}
    if levels is None:
        levels = auto_levels(tuple(min(a, b) for a, b in zip(np.shape(fixed), np.shape(moving))),
                             start_error_px)
    levels = [int(v) for v in levels]
    # with the smoothed biweight pass to follow, the least-squares levels only hand it a
    # start: the finest stops at 1e-3 px (one interpolation fewer on most pairs, same
    # result after the pass), and the gate's probe (of an unsmoothed pass) is not needed
    follow = bool(robust and smooth)
    out, info = _refine_linear(fixed, moving, transform, levels=levels,
                               start_error_px=start_error_px, min_ncc=min_ncc, robust=None,
                               biweight_probe=float(robust) if robust and not follow else None,
                               start_only=follow, **common)
    step = info.get("biweight_step_px")
    gate = tolerance if robust_gate is None else robust_gate
    if robust and not smooth and gate and step is not None and step < gate:
        # the biweight pass's first step would move no pixel by the tolerance: the pass
        # would stop there, at the least-squares result; skip its set-up and fits
        info["robust"] = {"accepted": False, "skipped": True,
                          "reason": f"a biweight step would move {step:.1e} px < {gate:g}"}
        robust = None
    if robust and info.get("reason") not in ("cancelled",) and "declined" not in str(info.get("reason")):
        finest = [int(info["levels"][-1])] if info.get("levels") else None
        f_in, m_in = fixed, moving
        if smooth:
            f_in, m_in = _smoothed_pair(fixed, moving, out, smooth, fixed_spacing, moving_spacing)
            common["level_cache"] = {}  # other images: their own samples and coefficients
        out2, info2 = _refine_linear(f_in, m_in, out, levels=finest, min_ncc=0.0,
                                     robust=float(robust), **common)
        info["robust"] = {k: info2.get(k) for k in ("accepted", "reason", "iterations",
                                                    "rms_start", "rms", "seconds")}
        info["robust"]["smooth"] = smooth
        if info2.get("accepted"):
            out = out2
            info["accepted"] = True
            info["reason"] = "converged (biweight pass)"
            info["seconds"] = info.get("seconds", 0.0) + info2.get("seconds", 0.0)
    return out, info


def _smoothed_pair(fixed, moving, transform: Transform, sigma: float, fixed_spacing=None,
                   moving_spacing=None):
    """New float32 copies of ``fixed`` and ``moving`` smoothed by a Gaussian of ``sigma``
    finest fixed pixels, the same blur in the fixed frame for both: the moving copy's
    sigma (world) is divided by the scale of ``transform`` (moving -> fixed),
    |det|^(1/D) of its linear part, then converted per axis by each image's spacing."""
    from scipy import ndimage

    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    ndim = fixed.ndim
    f_sp = np.ones(ndim) if fixed_spacing is None else np.asarray(fixed_spacing, float)
    m_sp = np.ones(ndim) if moving_spacing is None else np.asarray(moving_spacing, float)
    world = sigma * float(f_sp.min())
    scale = abs(float(np.linalg.det(np.asarray(transform.matrix)[:ndim, :ndim]))) ** (1.0 / ndim)
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    from .parallel import run_all

    tasks = [lambda: ndimage.gaussian_filter(fixed, world / f_sp),
             lambda: ndimage.gaussian_filter(moving, world / scale / m_sp)]
    return tuple(run_all(tasks) if _spare_cores() else [t() for t in tasks])


def _refine_linear(fixed, moving, transform: Transform, *, model: str, fixed_spacing=None,
                   moving_spacing=None, fixed_mask=None, moving_mask=None, levels=None,
                   start_error_px: float = 2.0, iterations: int = 40,
                   max_samples: int | None = None, tolerance: float = 1e-4,
                   min_ncc: float = 0.5, robust: float | None = None,
                   cancel=None, level_cache: dict | None = None,
                   biweight_probe: float | None = None,
                   samples: str = "strong",
                   start_only: bool = False) -> tuple[Transform, dict]:
    """refine_linear's passes: least squares (``robust=None``) or Tukey's biweight.
    ``level_cache`` (factor -> sampled level) lets a second pass on the same images reuse
    the first one's levels. ``biweight_probe`` (a cutoff): record in
    ``info["biweight_step_px"]`` how far one biweight step would move the result
    (:func:`_biweight_step`, finest pixels). ``start_only``: another pass follows, so the
    finest level stops at 1e-3 px (or ``tolerance``, if larger)."""
    if model not in MODELS:
        raise ValueError(f"refine_linear: model must be one of {list(MODELS)}; got {model!r}")
    if not transform.is_linear or transform.is_projective:
        raise ValueError("refine_linear needs a linear (affine, non-projective) start transform")
    t0 = time.perf_counter()
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    ndim = fixed.ndim
    if ndim not in (2, 3) or moving.ndim != ndim:
        raise ValueError("refine_linear works on two 2D or two 3D images")
    f_sp = np.ones(ndim) if fixed_spacing is None else np.asarray(fixed_spacing, float)
    m_sp = np.ones(ndim) if moving_spacing is None else np.asarray(moving_spacing, float)
    if max_samples is None:
        max_samples = 2 ** 17 if ndim == 2 else 2 ** 15
    if levels is None:
        levels = auto_levels(tuple(min(a, b) for a, b in zip(fixed.shape, moving.shape)),
                             start_error_px)
    levels = [int(v) for v in levels]
    gens = _generators(model, ndim)
    n_par = len(gens) + ndim
    # warp: fixed world -> moving world (homogeneous)
    warp = np.linalg.inv(transform.matrix)
    start_warp = warp.copy()
    centre = (np.array(fixed.shape) - 1) / 2 * f_sp
    to_c = np.eye(ndim + 1)
    to_c[:ndim, ndim] = -centre
    from_c = np.linalg.inv(to_c)
    info: dict = {"model": model, "levels": levels, "iterations": [], "accepted": False}

    def sample_level(factor):
        if level_cache is not None:
            key = (factor, factor == levels[-1])  # the sample cap differs on the finest
            if key not in level_cache:
                level_cache[key] = _sample_level(factor)
            return level_cache[key]
        return _sample_level(factor)

    def _sample_level(factor):
        from scipy import ndimage

        f_l = _block_mean(fixed, factor)
        m_l = _block_mean(moving, factor)
        # world of level index i: (i * factor + (factor - 1) / 2) * spacing
        f_off = (factor - 1) / 2 * f_sp
        m_off = (factor - 1) / 2 * m_sp
        f_coeffs = None
        if ndim == 2:
            # both images' spline coefficients (the fixed one's for the exact gradient
            # below), on two cores at once when there are (the prefilter releases the GIL)
            coeffs, f_coeffs = _prefilter_pair(m_l, f_l)
        else:
            coeffs = ndimage.spline_filter(m_l, order=3, mode="mirror", output=np.float64)
        # samples: interior pixels (one pixel margin for the central differences),
        # ranked by the squared central-difference gradient (np.gradient's values, in
        # float64, computed on the interior in one scratch array: no full-size gradients)
        mag = np.full(f_l.shape, -1.0)
        inner = tuple(slice(1, n - 1) for n in f_l.shape)
        mag_in = mag[inner]
        mag_in[...] = 0.0
        diff = np.empty(mag_in.shape)
        for axis in range(ndim):
            hi = tuple(slice(2, None) if a == axis else s_ for a, s_ in enumerate(inner))
            lo = tuple(slice(None, -2) if a == axis else s_ for a, s_ in enumerate(inner))
            np.subtract(f_l[hi], f_l[lo], out=diff, dtype=np.float64)
            diff /= 2.0
            np.multiply(diff, diff, out=diff)
            mag_in += diff
        del diff
        if fixed_mask is not None:
            fm = _block_mean(np.asarray(fixed_mask, np.float32), factor) > 0.5
            mag[~fm[tuple(slice(0, n) for n in f_l.shape)]] = -1.0
        idx = np.flatnonzero(mag > 0)
        # coarse levels only steer: fewer samples; the finest sets the precision
        cap = max_samples if factor == levels[-1] else min(max_samples, 2 ** 14)
        if samples == "random" and idx.size > cap:
            pick = np.random.default_rng(0).choice(idx.size, cap, replace=False)
            pick.sort()  # raster order: the interpolation then reads memory in order
            idx = idx[pick]
        elif idx.size > cap:
            # the stronger-gradient half (flat areas carry no alignment signal), then an
            # evenly spread subset of it: deterministic, and not only the sharpest edges
            # (the strongest-gradient pixels alone conditioned 3D affine poorly)
            sel = mag.ravel()[idx]
            strong = idx[sel >= _median(sel)]
            del sel
            if strong.size > cap:
                strong = strong[np.linspace(0, strong.size - 1, cap).astype(np.int64)]
            idx = strong
        del mag
        coords = np.unravel_index(idx, f_l.shape)
        pts_t = np.empty((ndim, idx.size))                             # (D, N) fixed world
        for d in range(ndim):
            np.multiply(coords[d], factor * f_sp[d], out=pts_t[d])
            pts_t[d] += f_off[d]
        del coords
        pts = pts_t.T
        values = f_l.ravel()[idx].astype(np.float64)
        if ndim == 2:
            # the Jacobian from the exact gradient of the spline model (samples above were
            # chosen on the central differences: either ranks edges alike). 2D only: in
            # 3D it is 12 passes over the volume, not measured against the steps it saves
            grad_w = _spline_gradient_at(f_l, idx, coeffs=f_coeffs)
        else:
            # np.gradient's interior central differences, taken at the samples only (they
            # are interior pixels): the same float64 values without three full-volume
            # gradient arrays
            flat = f_l.ravel()
            strides = np.cumprod((f_l.shape[1:] + (1,))[::-1])[::-1]
            grad_w = np.empty((idx.size, ndim))
            for d in range(ndim):
                hi = flat[idx + strides[d]].astype(np.float64)
                hi -= flat[idx - strides[d]]
                hi /= 2.0
                grad_w[:, d] = hi
        grad_w /= factor * f_sp
        xc = pts - centre
        cols = [_generator_column(xc, g, grad_w) for g in gens]
        cols += [grad_w[:, k] for k in range(ndim)]
        # (P, N): per-parameter rows; einsum contracts over N about 4x faster in this
        # layout than over (N, P) (measured: the weighted normal matrix of 131k samples
        # 5.3 ms -> 1.1 ms)
        sd = np.stack(cols, axis=0)
        mmask = None
        if moving_mask is not None:
            mmask = _block_mean(np.asarray(moving_mask, np.float32), factor) > 0.5
        return dict(pts=pts, pts_t=pts_t, values=values, sd=sd,
                    coeffs=coeffs, m_off=m_off, m_scale=factor * m_sp,
                    m_shape=np.array(m_l.shape), mmask=mmask)

    n_eval = [0]

    def warped_values(lv, w):
        from scipy import ndimage

        n_eval[0] += 1

        # moving-level index of every sample, (D, N), in one array: this runs a few
        # dozen times per registration on up to 2**17 samples, and every temporary of
        # that size is fresh memory when the allocator hands big blocks back (the
        # report's setting: the page faults of such temporaries doubled the time)
        # (the index array is the level's own, reused: nothing keeps it past this call)
        if "idx_buf" not in lv:
            lv["idx_buf"] = np.empty_like(lv["pts_t"])
        idx = np.einsum("de,en->dn", w[:ndim, :ndim] / lv["m_scale"][:, None], lv["pts_t"],
                        out=lv["idx_buf"])
        idx += ((w[:ndim, ndim] - lv["m_off"]) / lv["m_scale"])[:, None]
        ok = idx[0] >= 0
        for d in range(ndim):
            if d:
                ok &= idx[d] >= 0
            ok &= idx[d] <= lv["m_shape"][d] - 1
        if lv["mmask"] is not None:
            near = np.clip(np.round(idx.T).astype(int), 0, lv["m_shape"] - 1)
            ok &= lv["mmask"][tuple(near.T)]
        if not ok.all():
            # samples outside: clamped and interpolated like the others, then zeroed
            # (no compacted copies of the indices; they are masked out downstream)
            for d in range(ndim):
                np.clip(idx[d], 0, lv["m_shape"][d] - 1, out=idx[d])
        vals = _interpolate(lv["coeffs"], idx)
        if not ok.all():
            vals[~ok] = 0.0
        return vals, ok

    def tukey(res, cutoff=None, out=None, loss=True):
        """Biweight weights and mean loss (as an RMS-like number) of residuals (one
        array of their size is made for the weights, or ``out`` is used; ``loss``
        False: the weights only, the loss None)."""
        return _tukey(res, cutoff or robust, out, loss)

    def fit(lv, vals, ok, cutoff=None):
        """Gain/offset fit, residual (gain * moving + offset - fixed), |ncc|, loss
        (RMS of the residual; with ``robust`` (or ``cutoff``), the biweight loss on the
        same scale) and the biweight weights of that residual (None without a cutoff)."""
        cutoff = cutoff or robust
        if ok.all():
            t, m = lv["values"], vals
        else:
            t, m = lv["values"][ok], vals[ok]
        n = t.size
        if n < 8 * n_par:
            return None
        # sums instead of centred copies (values are O(1): no cancellation to speak of)
        sm, st = float(m.sum()), float(t.sum())
        vm = _dot(m, m) - sm * sm / n
        vt = _dot(t, t) - st * st / n
        cross = _dot(m, t) - sm * st / n
        if vm <= 0 or vt <= 0:
            return None
        gain = cross / vm
        ncc = cross / np.sqrt(vm * vt)
        res = _gain_residual(m, t, gain, (st - gain * sm) / n)
        if cutoff:
            # gain and offset by the same biweight (an occluder biases a plain fit of them,
            # and then every residual with it): a few reweighted rounds
            # (the rounds reuse two arrays: the weights, and the residual, rewritten in
            # place once its weights are known)
            w = None
            for _ in range(3):
                w = tukey(res, cutoff, out=w, loss=False)[0]
                sw = float(w.sum())
                if sw <= 0:
                    break
                mw, tw = _dot(w, m) / sw, _dot(w, t) / sw
                vmw = float(np.einsum("i,i,i->", w, m, m)) - sw * mw * mw
                if vmw <= 0:
                    break
                g = (float(np.einsum("i,i,i->", w, m, t)) - sw * mw * tw) / vmw
                res = _gain_residual(m, t, g, tw - g * mw, out=res)
            w, loss = tukey(res, cutoff, out=w)
            return res, abs(ncc), loss, w  # the weights: the next step's, as they are
        return res, abs(ncc), float(np.sqrt(_dot(res, res) / res.size)), None

    fine_px = float(f_sp.min())  # world size of one finest pixel (smallest axis)
    corners = np.array(np.meshgrid(*[[0.0, (n - 1) * s] for n, s in zip(fixed.shape, f_sp)],
                                   indexing="ij")).reshape(ndim, -1).T - centre
    lv = last = ok = None
    at_start = {}  # factor -> the fit at the start warp (a level reached before any update)
    for factor in levels:
        if cancel is not None and cancel():
            info["reason"] = "cancelled"
            break
        lv = sample_level(factor)
        if len(lv["pts"]) < 8 * n_par:
            info["iterations"].append(0)
            last = None
            continue
        seen = level_cache.get("last_eval") if level_cache is not None else None
        if (seen is not None and seen[0] == factor
                and np.allclose(seen[1], warp, rtol=1e-13, atol=1e-10 * fine_px)):
            vals, ok = seen[2], seen[3]  # the previous pass ended here: no new interpolation
            info["reused_start_samples"] = True
        else:
            vals, ok = warped_values(lv, warp)
        cur = fit(lv, vals, ok)
        if cur is None:
            info["reason"] = "too little overlap"
            break
        if np.array_equal(warp, start_warp):
            at_start[factor] = cur
        if factor == levels[0] and cur[1] < min_ncc:
            info.update(reason=f"declined: |NCC| {cur[1]:.2f} < {min_ncc} at the start (the "
                               "images are not linearly related in intensity)", ncc_start=cur[1])
            break
        n_it = 0
        # a coarse level only has to hand the next one a start well inside its capture
        # range: 1/100 of its own pixel is plenty (the finest level sets the precision)
        if factor != levels[-1]:
            tol_world = max(tolerance, 0.01 * factor) * fine_px
        else:  # the finest level: the tolerance, or 1e-3 px when another pass follows
            tol_world = max(tolerance, 1e-3 if start_only else 0.0) * fine_px
        # the Gauss-Newton matrix over all samples, once per level (inverse compositional:
        # it does not change with the warp); an iteration subtracts the few samples that
        # fall outside the moving image instead of rebuilding it from (N, P) copies
        sd_all = lv["sd"]
        # (the biweight steps use their own weighted matrix: no plain one for them)
        h_all = None if robust else np.einsum("pn,qn->pq", sd_all, sd_all)
        h_irls = None
        for n_it in range(1, int(iterations) + 1):
            if cancel is not None and cancel():
                break
            res, _, rms, w_fit = cur
            n_out = len(ok) - int(np.count_nonzero(ok))
            if robust:  # iteratively reweighted: the matrix changes with the weights
                # the fit's own biweight weights of this residual (same cutoff)
                w = w_fit if w_fit is not None else tukey(res)[0]
                if n_out:  # weight 0 outside: no (N, P) copies of the Jacobian
                    w_all, res_all = np.zeros(len(ok)), np.zeros(len(ok))
                    w_all[ok], res_all[ok] = w, res
                    w, res = w_all, res_all
                if h_irls is None:
                    # the weighted matrix of the level's first weights, kept: the weights
                    # set the fixed point through b (now the current ones); the matrix
                    # only scales the steps (same results and step counts measured, and
                    # the (P, P, N) contraction cost ~8 ms per step at 131k samples)
                    h_irls = np.einsum("pn,n,qn->pq", sd_all, w, sd_all)
                h = h_irls
                b = np.einsum("pn,n,n->p", sd_all, w, res)
            elif n_out == 0:
                h = h_all
                b = np.einsum("pn,n->p", sd_all, res)
            else:
                out_sd = sd_all[:, ~ok]
                h = (h_all - np.einsum("pn,qn->pq", out_sd, out_sd) if n_out < len(ok) // 2
                     else np.einsum("pn,qn->pq", sd_all[:, ok], sd_all[:, ok]))
                res_all = np.zeros(len(ok))
                res_all[ok] = res
                b = np.einsum("pn,n->p", sd_all, res_all)
            try:
                dp = np.linalg.solve(h + 1e-9 * np.trace(h) / n_par * np.eye(n_par), b)
            except np.linalg.LinAlgError:
                break
            d = _delta_matrix(dp, gens, ndim, model)
            moved = np.einsum("nd,ed->ne", corners, d[:ndim, :ndim] - np.eye(ndim)) + d[:ndim, ndim]
            full_move = float(np.abs(moved).max())
            if full_move < tol_world:
                # converged: the update would move no pixel by more than the tolerance,
                # so it is not worth an interpolation (nor, at the noise floor, the four
                # rejected halvings that used to end every level)
                break
            step = 1.0
            accepted = False
            for _ in range(4):  # backtracking: halve the step while the residual grows
                d = _delta_matrix(step * dp, gens, ndim, model)
                new = warp @ from_c @ np.linalg.inv(d) @ to_c
                vals_n, ok_n = warped_values(lv, new)
                nxt = fit(lv, vals_n, ok_n)
                if nxt is not None and nxt[2] <= rms * (1 + 1e-9):
                    accepted = True
                    break
                if full_move < 0.05 * factor * fine_px:
                    # a step of a few hundredths of this level's pixel that does not lower
                    # the residual: the noise floor, not an overshoot; halving it is futile
                    break
                step *= 0.5
            if not accepted:
                break
            moved = np.einsum("nd,ed->ne", corners, d[:ndim, :ndim] - np.eye(ndim)) + d[:ndim, ndim]
            warp, ok, cur, vals = new, ok_n, nxt, vals_n
            if float(np.abs(moved).max()) < tol_world:
                break
        info["iterations"].append(n_it)
        last = cur
    if "reason" not in info and lv is not None:
        # compare the start and the result on the finest level's samples: same footing
        # (the result's fit on them is the last one the iterations computed)
        a = at_start.get(factor) or fit(lv, *warped_values(lv, start_warp))
        b = last if factor == levels[-1] and last is not None else fit(lv, *warped_values(lv, warp))
        if a is not None and b is not None:
            info.update(rms_start=a[2], rms=b[2], ncc_start=a[1], ncc=b[1])
            if biweight_probe and b is last and ok is not None:
                # the biweight pass's first step from here, computed as that pass would
                # (gain and offset reweighted, then one weighted Gauss-Newton solve)
                rb = fit(lv, vals, ok, cutoff=biweight_probe)
                if rb is not None:
                    info["biweight_step_px"] = _biweight_step(
                        rb[0], rb[3],
                        lv["sd"] if ok.all() else lv["sd"][:, ok], gens, ndim,
                        model, corners) / fine_px
                if level_cache is not None:
                    level_cache["last_eval"] = (factor, warp.copy(), vals, ok)
            if b[2] <= a[2]:
                info.update(accepted=True, reason="converged")
            else:
                info["reason"] = "the residual did not drop; start kept"
        else:
            info["reason"] = "too little overlap"
    info["seconds"] = time.perf_counter() - t0
    info["evaluations"] = n_eval[0]  # spline interpolations of the moving image's samples
    if not info["accepted"]:
        return transform, info
    return Transform(np.linalg.inv(warp)), info


def _prefilter_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cubic-spline coefficients (float64, mirror) of two images; on two threads when
    there are two cores and the images are not tiny (scipy releases the GIL)."""
    from scipy import ndimage

    from .parallel import run_all

    def pre(x):
        return lambda: ndimage.spline_filter(x, order=3, mode="mirror", output=np.float64)
    if min(a.size, b.size) >= _PARALLEL_SAMPLES and _spare_cores():
        return tuple(run_all([pre(a), pre(b)]))
    return pre(a)(), pre(b)()


# interpolation and prefilters of large levels on the cores; False: one thread
_THREADS = True


def _spare_cores() -> bool:
    """``_THREADS`` and :func:`.parallel.spare_cores` (a core free by the load average)."""
    from .parallel import spare_cores

    return _THREADS and spare_cores()


# below this many samples one thread interpolates (a thread's start-up is ~0.1 ms)
_PARALLEL_SAMPLES = 2 ** 15


def _interpolate(coeffs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Cubic-spline values at the (D, N) indices ``idx`` (``coeffs`` prefiltered, mirror
    boundary): ``map_coordinates``, over contiguous runs of the samples at once on the
    process's cores when there are many (it releases the GIL; each value depends on its
    own index only, so the result is the same array)."""
    from scipy import ndimage

    from .parallel import n_workers, run_all, split

    n = idx.shape[1]
    workers = n_workers() if _spare_cores() else 1
    if workers <= 1 or n < _PARALLEL_SAMPLES:
        return ndimage.map_coordinates(coeffs, idx, order=3, mode="mirror", prefilter=False)
    out = np.empty(n, coeffs.dtype)

    def part(a, b):
        def run():
            ndimage.map_coordinates(coeffs, idx[:, a:b], output=out[a:b], order=3,
                                    mode="mirror", prefilter=False)
        return run
    run_all([part(a, b) for a, b in split(n, min(workers, n // _PARALLEL_SAMPLES))])
    return out


def _gain_residual(m, t, gain, offset, out=None):
    """gain * m + offset - t, in one new array (or ``out``)."""
    res = np.multiply(m, gain, out=out)
    res -= t
    res += offset
    return res


def _median(a: np.ndarray, overwrite: bool = False) -> float:
    """np.median of a 1D float array (the same value) with one selection: for an even
    size the lower middle value is the maximum of the lower part, not a second
    selection (np.median selects both; the selections were ~2 ms per call at 131k).
    ``overwrite``: reorder ``a`` itself instead of a copy."""
    a = a if overwrite else a.copy()
    k = a.size // 2
    a.partition(k)
    if a.size % 2:
        return float(a[k])
    return 0.5 * (float(a[:k].max()) + float(a[k]))


def _tukey(res, cutoff, out=None, loss=True):
    """Tukey biweight weights of residuals ``res`` with cutoff ``cutoff`` robust standard
    deviations (MAD), and the mean loss as an RMS-like number (None when ``loss`` is
    False: the gain/offset rounds need the weights only). One array of the size of
    ``res`` is made, or ``out`` used (the median is taken in it, then it becomes the
    weights)."""
    a = np.abs(res, out=out)
    med = _median(a, overwrite=True)
    c = cutoff * (med / 0.6745) + 1e-12
    u = np.multiply(res, 1.0 / c, out=a)
    np.square(u, out=u)
    np.minimum(u, 1.0, out=u)
    np.subtract(1.0, u, out=u)                      # 1 - u^2
    if not loss:
        np.square(u, out=u)
        return u, None
    cube = float(np.einsum("i,i,i->", u, u, u))
    np.square(u, out=u)                             # the weights (1 - u^2)^2
    return u, float(np.sqrt(max(c * c / 6.0 * (1.0 - cube / u.size), 0.0)))


def _biweight_step(res, w, sd, gens, ndim, model, corners) -> float:
    """How far (world units, the largest move of a corner of the fixed grid) one
    Tukey-biweight Gauss-Newton step would move a fit whose residual is ``res``, biweight
    weights ``w`` and Jacobian ``sd`` (P, N): a weighted normal matrix, no interpolation."""
    h = np.einsum("pn,n,qn->pq", sd, w, sd)
    b = np.einsum("pn,n,n->p", sd, w, res)
    n_par = h.shape[0]
    try:
        dp = np.linalg.solve(h + 1e-9 * np.trace(h) / n_par * np.eye(n_par), b)
    except np.linalg.LinAlgError:
        return float("inf")
    d = _delta_matrix(dp, gens, ndim, model)
    moved = np.einsum("nd,ed->ne", corners, d[:ndim, :ndim] - np.eye(ndim)) + d[:ndim, ndim]
    return float(np.abs(moved).max())


class LinearJudge:
    """|NCC| of the fixed image and the moving image sampled through transforms (moving
    -> fixed; linear ones; others get NaN), all on ONE set of fixed pixels: the
    stronger-gradient half of the fixed image where every transform given in one call
    lands inside the moving image; cubic-spline interpolation. It is the criterion the
    Gauss-Newton refinement minimises (up to gain and offset), and far sharper than
    scores over every pixel with linear interpolation (flat areas, interpolation blur):
    on the moon photo (similarity) the whole-overlap NCC ranked a 0.27 px candidate
    above a 0.005 px one. Build once (samples, spline coefficients), call many times."""

    def __init__(self, fixed, moving, *, fixed_spacing=None, moving_spacing=None,
                 fixed_mask=None, moving_mask=None, max_samples: int | None = None):
        from scipy import ndimage

        fixed = np.asarray(fixed, np.float32)
        moving = np.asarray(moving, np.float32)
        ndim = fixed.ndim
        self.f_sp = np.ones(ndim) if fixed_spacing is None else np.asarray(fixed_spacing, float)
        self.m_sp = np.ones(ndim) if moving_spacing is None else np.asarray(moving_spacing, float)
        if max_samples is None:
            max_samples = 2 ** 16 if ndim == 2 else 2 ** 15
        grads = np.gradient(fixed)
        mag = sum(g * g for g in grads)
        inner = np.zeros(fixed.shape, bool)
        inner[tuple(slice(1, n - 1) for n in fixed.shape)] = True
        if fixed_mask is not None:
            inner &= np.asarray(fixed_mask, bool)
        idx = np.flatnonzero(inner & (mag > 0))
        self.pts = None
        if idx.size < 16:
            return
        strong = idx[mag.ravel()[idx] >= np.median(mag.ravel()[idx])]
        if strong.size > max_samples:
            strong = strong[np.linspace(0, strong.size - 1, max_samples).astype(np.int64)]
        self.pts = np.array(np.unravel_index(strong, fixed.shape), float).T * self.f_sp
        self.values = fixed.ravel()[strong].astype(np.float64)
        self.coeffs = ndimage.spline_filter(moving, order=3, mode="mirror", output=np.float64)
        self.mshape = np.array(moving.shape)
        self.mmask = None if moving_mask is None else np.asarray(moving_mask, bool)

    def __call__(self, transforms) -> list[float]:
        from scipy import ndimage

        out = [float("nan")] * len(transforms)
        if self.pts is None:
            return out
        coords, ok = {}, np.ones(len(self.pts), bool)
        for k, tf in enumerate(transforms):
            if tf is None or not tf.is_linear:
                continue
            q = tf.apply_inverse(self.pts) / self.m_sp
            inside = np.all((q >= 0) & (q <= self.mshape - 1), axis=1)
            if self.mmask is not None:
                near = np.clip(np.round(q).astype(int), 0, self.mshape - 1)
                inside &= self.mmask[tuple(near.T)]
            coords[k] = q
            ok &= inside
        if ok.sum() < 16:
            return out
        t = self.values[ok] - self.values[ok].mean()
        vt = _dot(t, t)
        for k, q in coords.items():
            m = ndimage.map_coordinates(self.coeffs, q[ok].T, order=3, mode="mirror",
                                        prefilter=False)
            m = m - m.mean()
            vm = _dot(m, m)
            if vm > 0 and vt > 0:
                out[k] = abs(_dot(m, t)) / float(np.sqrt(vm * vt))
        return out


def compare_linear(fixed, moving, transforms, *, fixed_spacing=None, moving_spacing=None,
                   fixed_mask=None, moving_mask=None, max_samples: int | None = None) -> list[float]:
    """:class:`LinearJudge` built and called once."""
    return LinearJudge(fixed, moving, fixed_spacing=fixed_spacing, moving_spacing=moving_spacing,
                       fixed_mask=fixed_mask, moving_mask=moving_mask,
                       max_samples=max_samples)(transforms)
