"""Fourier backend: phase correlation (nD translation, sub-pixel) and log-polar
rotation/scale estimation (2D), optionally refined by maximising NCC.

Convention pinned here: if the moving image shows the fixed content displaced by
``+d`` (a feature at ``p`` in fixed is at ``p + d`` in moving), the returned transform
(moving -> fixed) is a translation by ``-d``.
"""

from __future__ import annotations

import numpy as np

from ..core.register import BackendResult, RegistrationError
from ..core.transform import Transform, scale_matrix

TRANSFORMS = ("translation", "rigid", "similarity")
NDIMS = None  # translation: any dimension; rotation/scale: 2D (checked below)
# phase correlation and the spline refinement fit gain and offset themselves: the core
# rescales without clipping, so detail beyond the 0.5/99.5 percentiles still counts
# (moon similarity: 4.2e-3 -> 2.0e-3 px)
CLIP_NORMALIZED = False
DESCRIPTION = "Fourier phase correlation: fast shifts in nD, rotation and scale in 2D (log-polar)"


# ------------------------------------------------------------------------ primitives
def _window(shape) -> np.ndarray:
    """Separable Tukey window (flat centre, cosine edges over 1/8 of each axis)."""
    w = np.ones(shape, dtype=np.float32)
    for axis, n in enumerate(shape):
        edge = max(1, n // 8)
        ramp = 0.5 * (1 - np.cos(np.pi * np.arange(edge) / edge))
        prof = np.ones(n, dtype=np.float32)
        prof[:edge] = ramp
        prof[n - edge:] = ramp[::-1]
        sh = [1] * len(shape)
        sh[axis] = n
        w = w * prof.reshape(sh)
    return w


def _prepare(image, shape, window, mask=None):
    a = np.asarray(image, np.float32)
    if mask is not None:
        mean = float(a[mask].mean())
        a = np.where(mask, a - np.float32(mean), np.float32(0.0))
    else:
        a = a - np.float32(a.mean(dtype=np.float64))
    if window:
        # the separable window, one axis at a time in place: no full-size window array
        # (a 256^3 volume saved two 64 MiB temporaries)
        for axis, n in enumerate(a.shape):
            edge = max(1, n // 8)
            prof = np.ones(n, dtype=np.float32)
            ramp = (0.5 * (1 - np.cos(np.pi * np.arange(edge) / edge))).astype(np.float32)
            prof[:edge] = ramp
            prof[n - edge:] = ramp[::-1]
            sh = [1] * a.ndim
            sh[axis] = n
            a *= prof.reshape(sh)
    if a.shape != tuple(shape):
        pad = [(0, s - n) for s, n in zip(shape, a.shape)]
        a = np.pad(a, pad)
    return a


_EINSUM_MAX_WORK = 1_500_000  # complex multiply-adds up to which einsum is used (2D searches)


def _local_correlation(cross, shape, real, centre, step, half_width):
    """The correlation surface (inverse DFT of ``cross``) on a small grid around
    ``centre`` (spacing ``step`` pixels, +-``half_width``): a matrix-multiply DFT, one axis
    at a time, so only the points needed are computed. With ``real=True``, ``cross`` is
    an rfftn half spectrum; Hermitian symmetry gives the other half (weight 2)."""
    n_points = int(round(2 * half_width / step)) + 1
    offsets = (np.arange(n_points) - n_points // 2) * step
    out = cross.astype(np.complex64, copy=False)
    nd = len(shape)
    for axis in [nd - 1, *range(nd - 1)]:
        n = shape[axis]
        if real and axis == nd - 1:
            freqs = np.fft.rfftfreq(n) * n
            weight = np.full(freqs.size, 2.0)
            weight[0] = 1.0
            if n % 2 == 0:
                weight[-1] = 1.0
        else:
            freqs = np.fft.fftfreq(n) * n
            weight = 1.0
        kernel = (np.exp(2j * np.pi * np.outer(centre[axis] + offsets, freqs) / n)
                  * weight).astype(np.complex64)
        if axis == nd - 1:  # the big contraction, on contiguous data
            lead = out.shape[:-1]
            flat = np.ascontiguousarray(out).reshape(-1, out.shape[-1])
            if flat.size * n_points <= _EINSUM_MAX_WORK:
                # einsum: never wakes BLAS threads (a matrix product of a 2D image's
                # spectrum cost 3-26 ms per call on the loaded 2-core machine, waiting
                # for OpenBLAS threads; einsum 0.25-1 ms, and 0.3 ms with BLAS on 1 thread)
                out = np.einsum("nk,pk->np", flat, kernel).reshape(*lead, n_points)
            else:  # volumes: one BLAS matrix product
                out = (flat @ kernel.T).reshape(*lead, n_points)
        else:
            # the small contraction (n_points x n): einsum, which never wakes BLAS threads
            # (tensordot there cost ~50 ms per call on a busy 2-core machine, profiled;
            # einsum ~1 ms)
            out = np.moveaxis(np.einsum("pk,k...->p...", kernel, np.moveaxis(out, axis, 0)), 0, axis)
    surface = out.real
    idx = np.array(np.unravel_index(int(np.argmax(surface)), surface.shape), float)
    return centre + (idx - n_points // 2) * step, float(surface.max())


def phase_correlate(fixed, moving, *, upsample: int = 100, window: bool = True,
                    lowpass: float | None = 0.1, fixed_mask=None,
                    moving_mask=None) -> tuple[np.ndarray, float]:
    """Shift ``t`` (index units, napari axis order) with ``fixed(x) ~ moving(x - t)``,
    i.e. the translation that maps moving onto fixed, and the correlation peak height
    (1 = perfect match, ~0 = no match).

    ``lowpass`` weights the normalised cross-power spectrum with a Gaussian of that
    sigma (cycles per pixel). Pure phase correlation gives every frequency the same
    weight, so interpolation and noise at high frequencies pull the sub-pixel peak
    towards whole pixels (0.1 px bias measured on a spline-shifted photo); with
    ``lowpass=0.1`` the bias was 0.02 px."""
    from scipy import fft

    shape = tuple(max(a, b) for a, b in zip(fixed.shape, moving.shape))
    real = shape[-1] % 2 == 0
    # one spectrum at a time, products in place: peak memory ~3 volumes instead of ~8
    f = _prepare(fixed, shape, window, fixed_mask)
    cross = fft.rfftn(f, workers=-1) if real else fft.fftn(f, workers=-1)
    del f
    m = _prepare(moving, shape, window, moving_mask)
    M = fft.rfftn(m, workers=-1) if real else fft.fftn(m, workers=-1)
    del m
    cross *= np.conj(M, out=M)
    del M
    mag = np.abs(cross)
    mag += 1e-12 * mag.max() + 1e-30
    cross /= mag
    del mag
    norm = 1.0
    if lowpass:
        for w_axis in _gaussian_factors(shape, float(lowpass), real):
            cross *= w_axis
        # a perfect match then peaks at the mean weight over the full spectrum
        norm = float(np.prod([np.exp(-(np.fft.fftfreq(n) ** 2) / (2 * float(lowpass) ** 2)).mean()
                              for n in shape]))
    corr = fft.irfftn(cross, s=shape, workers=-1) if real else fft.ifftn(cross, workers=-1).real
    peak = np.array(np.unravel_index(int(np.argmax(corr)), shape), dtype=float)
    height = float(corr.max()) / norm
    shape_arr = np.array(shape, dtype=float)
    peak = np.where(peak > shape_arr / 2, peak - shape_arr, peak)
    if upsample and upsample > 1:
        # two stages: 1/10 px over +-1 px, then 1/upsample px over +-1/10 px
        step = max(1.0 / upsample, 0.1)
        peak, value = _local_correlation(cross, shape, real, peak, step, 1.0)
        if step > 1.0 / upsample:
            peak, value = _local_correlation(cross, shape, real, peak, 1.0 / upsample, step)
        height = value / np.prod(shape) / norm
    return peak, height


def _gaussian_factors(shape, sigma, real):
    """The per-axis factors of :func:`_gaussian_weights` (float32, broadcastable)."""
    axes = [np.fft.fftfreq(n) for n in shape]
    if real:
        axes[-1] = np.fft.rfftfreq(shape[-1])
    out = []
    for axis, f in enumerate(axes):
        sh = [1] * len(shape)
        sh[axis] = f.size
        out.append(np.exp(-(f ** 2) / (2 * sigma * sigma)).astype(np.float32).reshape(sh))
    return out


def _gaussian_weights(shape, sigma, real):
    axes = [np.fft.fftfreq(n) for n in shape]
    if real:
        axes[-1] = np.fft.rfftfreq(shape[-1])
    w = None
    for axis, f in enumerate(axes):
        sh = [1] * len(shape)
        sh[axis] = f.size
        g = np.exp(-(f ** 2) / (2 * sigma * sigma)).reshape(sh)
        w = g if w is None else w * g
    return w


def estimate_translation(fixed, moving, *, upsample=100, window=True, lowpass=0.1,
                         iterations=2, fixed_mask=None, moving_mask=None, cancel=None):
    """Phase correlation, then ``iterations`` passes that shift ``moving`` by the current
    estimate (cubic spline) and correlate again for the residual.

    Why: the edge taper and the content that enters/leaves the field of view bias a
    single estimate towards zero shift (0.4-0.7 px measured on 40-plane volumes); on
    the re-shifted image the residual is small, so the bias, proportional to it, fades.
    """
    shift, peak = phase_correlate(fixed, moving, upsample=upsample, window=window,
                                  lowpass=lowpass, fixed_mask=fixed_mask, moving_mask=moving_mask)
    # the residual is measured on a central crop (<= REFINE_CROP per axis, <= REFINE_VOXELS):
    # it only needs enough structure for a sub-pixel estimate, and keeps passes cheap
    side = min(REFINE_CROP, int(round(REFINE_VOXELS ** (1.0 / fixed.ndim))))
    region = tuple(slice((n - min(n, side)) // 2, (n - min(n, side)) // 2 + min(n, side))
                   for n in fixed.shape)
    fixed_c = fixed[region]
    fmask_c = None if fixed_mask is None else fixed_mask[region]
    for _ in range(int(iterations)):
        if cancel is not None and cancel():
            break
        shifted = _shifted_crop(moving, shift, region, order=3)
        mask = None if moving_mask is None else _shifted_crop(
            moving_mask.astype(np.float32), shift, region, order=0, cval=0.0) > 0.5
        if mask is not None and mask.sum() < 16:
            break
        residual, peak = phase_correlate(fixed_c, shifted, upsample=upsample, window=window,
                                         lowpass=lowpass, fixed_mask=fmask_c, moving_mask=mask)
        shift = shift + residual
        if np.max(np.abs(residual)) < 1.0 / max(upsample, 1):
            break
    return shift, peak


REFINE_CROP = 256  # per axis at most
REFINE_VOXELS = 2 ** 18  # and at most this many voxels (64^3 in 3D): 256^3 re-correlated whole was 3x skimage's time


def _shifted_crop(moving, shift, region, order=3, cval=None):
    """``moving`` translated by ``shift`` (moving -> fixed), sampled on the fixed-index
    ``region`` only: out[i] = moving[i + region.start - shift]."""
    from scipy import ndimage

    lo = [max(0, int(np.floor(r.start - t)) - 4) for r, t in zip(region, shift)]
    hi = [min(n, int(np.ceil(r.stop - t)) + 4) for r, t, n in zip(region, shift, moving.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return np.zeros(tuple(r.stop - r.start for r in region), np.float32)
    block = moving[tuple(slice(l, h) for l, h in zip(lo, hi))]
    offset = [r.start - t - l for r, t, l in zip(region, shift, lo)]
    mode = "nearest" if cval is None else "constant"
    out_shape = tuple(r.stop - r.start for r in region)
    if order > 1 and mode == "nearest":
        # scipy's own prefilter pads by 12 (edge) and makes float64 spline coefficients
        # (2x the block); do the same in float32, in place on the padded copy
        pad = 12
        coeffs = np.pad(np.asarray(block, np.float32), pad, mode="edge")
        ndimage.spline_filter(coeffs, order, output=coeffs, mode="nearest")
        return ndimage.affine_transform(coeffs, np.ones(len(shift)), offset=[o + pad for o in offset],
                                        output_shape=out_shape, order=order, mode="nearest",
                                        prefilter=False, output=np.float32)
    return ndimage.affine_transform(block, np.ones(len(shift)), offset=offset,
                                    output_shape=out_shape,
                                    order=order, mode=mode, cval=cval or 0.0).astype(np.float32)


# ----------------------------------------------------------------- rotation and scale
def _highpass(shape):
    # the product of the per-axis cosines built as one array (an outer product, not
    # full-size grids), then (1 - g)(2 - g): the same values in 2 arrays instead of 6
    g = None
    for axis, n in enumerate(shape):
        x = np.cos(np.pi * np.fft.fftshift(np.fft.fftfreq(n)))
        sh = [1] * len(shape)
        sh[axis] = n
        g = np.ones(shape) * x.reshape(sh) if g is None else g * x.reshape(sh)
    out = 1.0 - g
    np.subtract(2.0, g, out=g)
    out *= g
    return out


def _log_polar_grid(shape, n_angles, n_radii):
    """Sample positions (rows, cols) of the log-polar resampling and its log base: the
    same for both images of a pair, so built once."""
    centre = np.array(shape, float) // 2
    max_r = min(shape) / 2.0
    log_base = np.exp(np.log(max_r) / n_radii)
    radii = log_base ** np.arange(n_radii)
    angles = np.arange(n_angles) * np.pi / n_angles  # magnitude is symmetric: half turn
    # angle measured counter-clockwise on screen: row = -sin, col = +cos
    rows = centre[0] - np.multiply.outer(radii, np.sin(angles))
    cols = centre[1] + np.multiply.outer(radii, np.cos(angles))
    return [rows, cols], log_base


def _log_polar_magnitude(image, shape, n_angles, n_radii, grid=None, highpass=None):
    from scipy import fft, ndimage

    a = _prepare(image, shape, True)
    # |fftshift(F)| = fftshift(|F|): shift the real magnitude, not the complex spectrum
    mag = fft.fftshift(np.abs(fft.fftn(a, workers=-1)))
    del a
    mag = mag * (_highpass(shape) if highpass is None else highpass)
    coords, log_base = grid if grid is not None else _log_polar_grid(shape, n_angles, n_radii)
    lp = ndimage.map_coordinates(mag, coords, order=1, mode="constant")
    return lp.T.astype(np.float32), log_base  # (angle, radius)


def _similarity_idx(angle_deg, scale, shift, centre):
    """moving index -> fixed index: rotate by angle (ccw on screen) and scale about
    ``centre`` (moving index), then add ``shift``."""
    return Transform.from_rotation(angle_deg, center=centre, scale=scale, shift=shift).matrix


def _warp_to(moving, m_idx, shape):
    from scipy import ndimage

    inv = np.linalg.inv(m_idx)
    return ndimage.affine_transform(moving, inv[:2, :2], offset=inv[:2, 2], output_shape=shape,
                                    order=1, mode="constant", cval=np.nan)


def _masked_ncc(fixed, warped):
    ok = np.isfinite(warped)
    if ok.sum() < 16:
        return -1.0
    a = fixed[ok] - fixed[ok].mean()
    b = warped[ok] - warped[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else -1.0


def _estimate_similarity(fixed, moving, transform, upsample, cancel, n_angles=720):
    shape = tuple(max(a, b) for a, b in zip(fixed.shape, moving.shape))
    n_radii = max(64, int(min(shape)))
    grid, hp = _log_polar_grid(shape, n_angles, n_radii), _highpass(shape)
    lp_f, base = _log_polar_magnitude(fixed, shape, n_angles, n_radii, grid, hp)
    lp_m, _ = _log_polar_magnitude(moving, shape, n_angles, n_radii, grid, hp)
    del grid, hp
    (d_angle, d_logr), height = phase_correlate(lp_f, lp_m, upsample=20, window=False)
    # the magnitude spectrum turns with the image and shrinks as the image grows
    angle = d_angle * 180.0 / n_angles
    scale = float(base ** -d_logr)
    if transform == "rigid":
        scale = 1.0
    centre = (np.array(moving.shape, float) - 1) / 2
    found = []
    for cand in (angle, angle + 180.0):
        if cancel():
            return None
        m_rs = _similarity_idx(cand, scale, (0.0, 0.0), centre)
        rotated = _warp_to(moving, m_rs, shape)
        rotated_f = np.nan_to_num(rotated, nan=0.0)
        shift, peak = phase_correlate(fixed, rotated_f, upsample=upsample,
                                      moving_mask=np.isfinite(rotated))
        found.append((cand, shift, peak))
    # the translation peak tells the right turn from the one 180 degrees off by 4x or
    # more on every pair measured (right 0.39-0.99, wrong 0.06-0.10: report photos,
    # camera at -120..179 deg); the NCC of a full warp is computed for the clear winner
    # only, and decides between the two when their peaks are within 2x
    peaks = [max(p, 0.0) for _, _, p in found]
    clear = max(peaks) > 2.0 * min(peaks)
    best = None
    for cand, shift, peak in ([found[int(np.argmax(peaks))]] if clear else found):
        m_full = _similarity_idx(cand, scale, shift, centre)
        score = _masked_ncc(fixed, _warp_to(moving, m_full, fixed.shape))
        if best is None or score > best[0]:
            best = (score, cand, scale, shift, peak)
    return best, height


def _refine(fixed, moving, angle, scale, shift, transform, cancel, max_side=256):
    """Maximise NCC over (angle, log scale, shift) with Powell, on a downsampled copy."""
    from scipy import ndimage, optimize

    factor = max(1.0, max(fixed.shape) / max_side)
    if factor > 1:
        f = ndimage.zoom(ndimage.gaussian_filter(fixed, 0.5 * factor), 1 / factor, order=1)
        m = ndimage.zoom(ndimage.gaussian_filter(moving, 0.5 * factor), 1 / factor, order=1)
    else:
        f, m = fixed, moving
    centre = (np.array(moving.shape, float) - 1) / 2
    # ndimage.zoom maps small index i to big index i * (n_big - 1) / (n_small - 1)
    fac_f = (np.array(fixed.shape) - 1) / np.maximum(np.array(f.shape) - 1, 1)
    fac_m = (np.array(moving.shape) - 1) / np.maximum(np.array(m.shape) - 1, 1)
    ds = np.diag([*fac_m, 1.0])
    ds_inv = np.diag([*(1 / fac_f), 1.0])

    def params_to_idx(p):
        a, ls, r, c = p
        s = 1.0 if transform == "rigid" else float(np.exp(ls))
        return _similarity_idx(a, s, (r, c), centre)

    # score over one fixed region (the coarse overlap, eroded) so that the optimum is
    # not pulled by the overlap border moving with the parameters
    x0_small = ds_inv @ params_to_idx([angle, np.log(scale), shift[0], shift[1]]) @ ds
    region = ndimage.binary_erosion(np.isfinite(_warp_to(m, x0_small, f.shape)),
                                    iterations=max(2, min(f.shape) // 20))
    if region.sum() < 64:
        region = np.ones(f.shape, bool)
    f_reg = f[region]

    def cost(p):
        if cancel():
            raise _Stop
        small = ds_inv @ params_to_idx(p) @ ds
        return -_masked_ncc(f_reg, _warp_to(m, small, f.shape)[region])

    x0 = np.array([angle, np.log(scale), shift[0], shift[1]])
    try:
        # initial directions in each parameter's own scale (0.2 degree, 0.2 % zoom,
        # 0.2 px): unit steps in degrees and log-scale made Powell's line searches wander
        res = optimize.minimize(cost, x0, method="Powell",
                                options={"xtol": 1e-2, "ftol": 1e-7, "maxfev": 600,
                                         "direc": np.diag([0.2, 0.002, 0.2, 0.2])})
    except _Stop:
        return None
    return res.x, int(res.nfev), -float(res.fun)


class _Stop(Exception):
    pass


def _angle_scale(m_idx):
    """Angle (degrees, counter-clockwise on screen) and scale of a 2D similarity matrix."""
    a, b = m_idx[1, 0], m_idx[0, 0]
    return float(np.degrees(np.arctan2(a, b))), float(np.hypot(a, b))


def _refine_spline(f, m, angle, scale, shift, transform, fm, mm, cancel, info):
    """Gauss-Newton on a cubic-spline pyramid (:func:`core.refine.refine_linear`) from the
    log-polar estimate: ~10x more precise than the NCC polish and faster. Returns
    (index matrix moving -> fixed, NCC at full resolution), or None when it declines
    (e.g. different contrasts) or does not beat the coarse estimate's NCC."""
    from ..core.refine import refine_linear

    centre = (np.array(m.shape, float) - 1) / 2
    start = Transform(_similarity_idx(angle, scale if transform == "similarity" else 1.0, shift, centre))
    # the log-polar estimate is good to a few pixels: a pyramid down to 1/4 (or 1/8).
    # refine_linear keeps its result only if the residual on the finest level's samples
    # (cubic spline) is below the start's: no second check here. (A whole-image NCC with
    # linear interpolation used to veto it: on astronaut_rigid it preferred a 0.0023 px
    # Powell polish to the 0.0006 px spline result, and cost two full warps.)
    out, rinfo = refine_linear(f, m, start, model=transform, fixed_mask=fm, moving_mask=mm,
                               start_error_px=8.0, cancel=cancel)
    info["spline_refine"] = {k: v for k, v in rinfo.items() if k in
                             ("accepted", "reason", "iterations", "evaluations", "levels", "seconds",
                              "rms", "ncc")}
    if not rinfo["accepted"]:
        return None
    return out.matrix, float(rinfo["ncc"])



COARSE_FACTOR, COARSE_MIN_SIDE = 2, 256  # block means for the log-polar search when refining


def _block_mean(image, k):
    from ..core.refine import _block_mean as block_mean

    return image if k == 1 else block_mean(image, k)


def _shift_at_full_resolution(angle, scale, shift, k, full_moving_shape):
    """The shift (about the full moving image's centre) of a similarity found on k x k
    block means: block index i is full index k * i + (k - 1) / 2."""
    small_shape = np.array(full_moving_shape) // k
    m_small = _similarity_idx(angle, scale, shift, (small_shape - 1) / 2)
    s = np.eye(3)
    s[:2, :2] *= k
    s[:2, 2] = (k - 1) / 2
    m_full = s @ m_small @ np.linalg.inv(s)
    centre = (np.array(full_moving_shape, float) - 1) / 2
    return m_full[:2, 2] - _similarity_idx(angle, scale, (0.0, 0.0), centre)[:2, 2]


# --------------------------------------------------------------------------- backend
def _to_spacing(image, spacing, target):
    """Resample ``image`` (grid spacing ``spacing``, origin 0) to grid spacing ``target``."""
    from scipy import ndimage

    spacing = np.asarray(spacing, float)
    target = np.asarray(target, float)
    if np.allclose(spacing, target):
        return image
    ratio = target / spacing
    shape = _spacing_shape(image.shape, spacing, target)
    return ndimage.affine_transform(image, ratio, output_shape=shape, order=1, mode="nearest")


def _spacing_shape(shape, spacing, target) -> tuple:
    ratio = np.asarray(target, float) / np.asarray(spacing, float)
    return tuple(max(1, int(round(n / r))) for n, r in zip(shape, ratio))


# resampling to a common pixel size may grow an image by at most this factor (or up to
# this many pixels): beyond it the spacings are almost surely in different units
_MAX_GROWTH, _MAX_PIXELS = 4, 2 ** 24


def _check_growth(name, shape, spacing, target):
    new = _spacing_shape(shape, spacing, target)
    n_old, n_new = int(np.prod(shape)), int(np.prod(new, dtype=float))
    if n_new > max(_MAX_PIXELS, _MAX_GROWTH * n_old):
        raise ValueError(
            f"fourier works at one pixel size ({[float(t) for t in target]}); the {name} image "
            f"(spacing {[float(v) for v in spacing]}) would be resampled from {tuple(shape)} to "
            f"{new} pixels ({n_new / n_old:.0f}x). Check that both spacings use the same units; "
            "otherwise pass the image with the coarser pixels as fixed, or downsample the "
            "finer one first")


MAX_UPSAMPLE = 1000


def register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress, cancel,
             fixed_mask=None, moving_mask=None, upsample: int = 100, window: bool = True,
             lowpass: float | None = 0.1, iterations: int = 2,
             refine: bool = True, fallback: bool = True) -> BackendResult:
    """Phase correlation (translation, nD) or log-polar + phase correlation (2D rigid,
    similarity), in world units.

    Options
    -------
    upsample : int
        Sub-pixel precision of the translation peak is ``1/upsample`` pixel.
    window : bool
        Taper image edges (Tukey) before the FFT; reduces edge artefacts.
    lowpass : float or None
        Gaussian weight on the cross-power spectrum (sigma, cycles/pixel); None for
        pure phase correlation. Reduces whole-pixel bias from interpolation and noise.
    iterations : int
        Translation: re-correlation passes on the re-shifted moving image (removes the
        edge bias of a single estimate; 0 for one plain pass).
    refine : bool
        For rigid/similarity: polish the log-polar estimate by Gauss-Newton on a
        cubic-spline pyramid (least squares up to gain and offset; falls back to
        maximising NCC with Powell when that declines).
    fallback : bool
        When the Gauss-Newton polish declines (contrasts not linearly related), polish
        with Powell on NCC instead (slow: hundreds of warps); False returns the
        log-polar estimate as it is (``auto`` does, and refines with intensity).
    """
    ndim = fixed.ndim
    if transform != "translation" and ndim != 2:
        raise ValueError(f"fourier {transform!r} works on 2D images; for {ndim}D use "
                         "transform='translation' or method='intensity'")
    if not 1 <= int(upsample) <= MAX_UPSAMPLE:
        # the peak search evaluates ~upsample/5 points per axis: bounded, or 1e8 asks
        # for tens of GB
        raise ValueError(f"upsample must be between 1 and {MAX_UPSAMPLE} (precision "
                         f"1/upsample pixel); got {upsample}")
    f_sp = np.asarray(fixed_spacing, float)
    target = f_sp if transform == "translation" else np.full(ndim, f_sp.min())
    _check_growth("fixed", fixed.shape, f_sp, target)
    _check_growth("moving", moving.shape, moving_spacing, target)
    f = _to_spacing(fixed, f_sp, target)
    m = _to_spacing(moving, moving_spacing, target)
    fm = None if fixed_mask is None else _to_spacing(fixed_mask.astype(np.float32), f_sp, target) > 0.5
    mm = None if moving_mask is None else _to_spacing(moving_mask.astype(np.float32), moving_spacing, target) > 0.5
    info: dict = {}
    progress(0.1, "phase correlation")
    if transform == "translation":
        shift, peak = estimate_translation(f, m, upsample=int(upsample), window=window,
                                           lowpass=lowpass, iterations=iterations,
                                           fixed_mask=fm, moving_mask=mm, cancel=cancel)
        m_idx = np.eye(ndim + 1)
        m_idx[:ndim, ndim] = shift
        info.update(peak=peak, shift_px=shift.tolist())
    else:
        if fm is not None:
            f = np.where(fm, f, 0.0).astype(np.float32)
        if mm is not None:
            m = np.where(mm, m, 0.0).astype(np.float32)
        # the spline polish follows: a 1/10 px peak is start enough (1/100 px cost ~0.1 s),
        # and so is the search on 2x2 block means (3-10x cheaper; the start it gives was
        # as close on the report's photos: within ~4 px, inside the polish's pyramid range)
        k = COARSE_FACTOR if refine and min(min(f.shape), min(m.shape)) >= COARSE_MIN_SIDE else 1
        # (and 360 log-polar angles, 1/2 degree, instead of 720: ~10 % of the CPU time)
        searches = [(k, 360 if refine else 720, min(int(upsample), 10) if refine else int(upsample))]
        if refine and k > 1:
            # the block means can lose what the search needs (camera at 60 deg and 1.3x:
            # scale found as 1.0 on them): when the spline stage then declines, search
            # again at full resolution, 720 angles
            searches.append((1, 720, int(upsample)))
        polished = None
        for attempt, (kk, n_angles, up) in enumerate(searches):
            est = _estimate_similarity(_block_mean(f, kk), _block_mean(m, kk), transform, up,
                                       cancel, n_angles=n_angles)
            if est is None or est[0] is None:
                return BackendResult(Transform.identity(ndim), {"stop_reason": "cancelled"})
            (score, angle, scale, shift, peak), lp_peak = est
            if kk > 1:
                shift = _shift_at_full_resolution(angle, scale, shift, kk, m.shape)
            found = {"angle_deg": angle, "scale": scale, "shift_px": list(shift), "ncc": score}
            if attempt == 0:
                info.update(coarse=found)
                progress(0.5, "refining")
            else:
                info.update(coarse_full={**found, "why": "block-mean search declined"})
            info.update(log_polar_peak=lp_peak, peak=peak)
            if refine:
                polished = _refine_spline(f, m, angle, scale, shift, transform, fm, mm, cancel, info)
            if polished is not None:
                break
        if polished is not None:
            m_idx, score = polished
            angle, scale = _angle_scale(m_idx)
        elif refine and fallback:
            out = _refine(f, m, angle, scale, shift, transform, cancel)
            if out is None:
                return BackendResult(Transform.identity(ndim), {"stop_reason": "cancelled"})
            (a_ref, log_s, r, c), nfev, _ = out
            s_ref = 1.0 if transform == "rigid" else float(np.exp(log_s))
            centre = (np.array(m.shape, float) - 1) / 2
            score_ref = _masked_ncc(f, _warp_to(m, _similarity_idx(a_ref, s_ref, (r, c), centre), f.shape))
            if score_ref >= score:  # keep the polish only if it helps at full resolution
                angle = a_ref
                scale = 1.0 if transform == "rigid" else float(np.exp(log_s))
                shift = np.array([r, c])
                score = score_ref
            info.update(refine_evaluations=nfev)
        if polished is None:
            centre = (np.array(m.shape, float) - 1) / 2
            m_idx = _similarity_idx(angle, scale, shift, centre)
        info.update(angle_deg=float(angle), scale=float(scale), ncc=float(score))
        if score < 0.05:
            raise RegistrationError(
                f"fourier {transform} found no convincing rotation/scale (NCC {score:.2f}); the "
                "images may share too little structure. Try equalize='clahe', method='features' "
                "(large rotations with texture) or method='intensity'"
            )
    s = scale_matrix(target)
    m_world = s @ m_idx @ np.linalg.inv(s)
    progress(1.0, "done")
    return BackendResult(Transform(m_world), info)
