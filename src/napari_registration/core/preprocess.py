"""Preprocessing shared by all backends: grey conversion, normalisation, equalisation,
smoothing. All functions return new arrays; inputs are never modified."""

from __future__ import annotations

import numpy as np

EQUALIZE_CHOICES = (None, "hist", "clahe")


def to_grey(image: np.ndarray) -> np.ndarray:
    """RGB(A) (last axis) -> luminance, as float32."""
    image = np.asarray(image)
    rgb = image[..., :3].astype(np.float32)
    return rgb @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


def normalize(image: np.ndarray, mask=None, low: float = 0.5, high: float = 99.5,
              clip: bool = True) -> np.ndarray:
    """Robust rescale to [0, 1] by percentiles (float32); ``clip=False`` keeps the values
    beyond the percentiles (a purely linear rescale).

    The same values as :func:`~.metrics.robust_normalize` (tested bit for bit), with the
    percentiles found by :func:`percentiles` instead of a partition of every pixel."""
    from .metrics import PERCENTILE_SAMPLES

    image = np.asarray(image, dtype=np.float32)
    values = image[mask] if mask is not None else image.ravel()
    if values.size == 0:
        return np.zeros_like(image)
    if values.size > PERCENTILE_SAMPLES:
        values = values[:: values.size // PERCENTILE_SAMPLES]
    lo, hi = percentiles(values, [low, high])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(image)
    out = image - np.float32(lo)  # one new float32 array, then in place
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


# below this many values np.percentile's one partition is as fast as the bracket search
_BRACKET_MIN = 65_536
_BRACKET_SAMPLE = 8_192


def percentiles(values, q) -> np.ndarray:
    """``np.percentile(values, q)`` (its default "linear" method), the same numbers, in
    about a third of the time on large float arrays.

    np.percentile partitions every value; the result needs only the two order statistics
    around each requested rank. Here a sorted strided sample of ~8k values gives a narrow
    value range that must hold them; one pass counts the values below the range and
    collects those inside, and only these are partitioned. The range is checked (enough
    values below and inside); if it misses, or NaNs are present, np.percentile is called.
    The interpolation repeats numpy's arithmetic step by step (tested for equality)."""
    v = np.asarray(values).ravel()
    q = np.asarray(q, dtype=np.float64)
    n = v.size
    if n < _BRACKET_MIN or v.dtype.kind != "f" or q.ndim != 1:
        return np.percentile(v, q)
    # numpy's virtual index for method "linear", as numpy computes it
    qf = np.true_divide(q, 100)
    virtual = (n - 1) * qf
    prev = np.floor(virtual)
    nxt = prev + 1
    above, below = virtual >= n - 1, virtual < 0
    prev_i = np.where(above, n - 1, np.where(below, 0, prev)).astype(np.intp)
    next_i = np.where(above, n - 1, np.where(below, 0, nxt)).astype(np.intp)
    gamma = virtual - np.where(above, -1, np.where(below, 0, prev))
    sample = np.sort(v[:: max(1, n // _BRACKET_SAMPLE)])
    m = sample.size
    stats: dict[int, float] = {}
    for r0, r1 in zip(prev_i, next_i):
        if r0 in stats and r1 in stats:
            continue
        p = r0 / max(n - 1, 1)
        centre = p * (m - 1)
        margin = 4.0 * np.sqrt(m * p * (1 - p)) + 32
        i_lo, i_hi = int(np.floor(centre - margin)), int(np.ceil(centre + margin))
        lo_v = sample[i_lo] if i_lo > 0 else -np.inf
        hi_v = sample[i_hi] if i_hi < m - 1 else np.inf
        n_below = int(np.count_nonzero(v < lo_v))
        inside = v[(v >= lo_v) & (v <= hi_v)]
        n_above = int(np.count_nonzero(v > hi_v))
        if (n_below + inside.size + n_above != n  # NaNs
                or n_below > r0 or n_below + inside.size <= r1):
            return np.percentile(v, q)
        k = sorted({int(r0) - n_below, int(r1) - n_below})
        part = np.partition(inside, k)
        stats[int(r0)] = part[int(r0) - n_below]
        stats[int(r1)] = part[int(r1) - n_below]
    a = np.array([stats[int(i)] for i in prev_i], dtype=v.dtype)
    b = np.array([stats[int(i)] for i in next_i], dtype=v.dtype)
    # numpy's _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) where t >= 0.5
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe",
                dtype=out.dtype)
    return out


def equalize(image: np.ndarray, how: str | None, mask=None) -> np.ndarray:
    """Histogram equalisation (``"hist"``) or CLAHE (``"clahe"``) of a [0, 1] image."""
    if how in (None, False, "none"):
        return image
    from skimage import exposure

    if how in ("hist", True):
        return exposure.equalize_hist(image, mask=mask).astype(np.float32)
    if how == "clahe":
        return exposure.equalize_adapthist(np.clip(image, 0, 1)).astype(np.float32)
    raise ValueError(f"equalize must be one of None, 'hist', 'clahe'; got {how!r}")


def smooth(image: np.ndarray, sigma: float, spacing=None) -> np.ndarray:
    """Gaussian smoothing with ``sigma`` in world units (converted per axis with spacing)."""
    if not sigma:
        return image
    if sigma < 0:
        raise ValueError(f"smooth (Gaussian sigma, world units) must be >= 0; got {sigma}")
    from scipy import ndimage

    spacing = np.ones(image.ndim) if spacing is None else np.asarray(spacing, float)
    return ndimage.gaussian_filter(image, sigma / spacing).astype(np.float32)


def prepare(image, *, spacing=None, mask=None, normalize_: bool = True, equalize_=None,
            smooth_: float = 0.0, clip: bool = True) -> np.ndarray:
    """The shared pipeline: float32, robust [0, 1] normalisation, equalisation, smoothing.

    ``clip=False`` (used for methods that are blind to gain and offset, e.g. phase
    correlation and the spline refinement) rescales linearly without clipping, so bright
    or dark detail beyond the 0.5/99.5 percentiles still guides the fit; equalisation
    always clips."""
    out = np.asarray(image, dtype=np.float32)
    if normalize_ or equalize_:
        out = normalize(out, mask, clip=clip or bool(equalize_))
    out = equalize(out, equalize_, mask)
    out = smooth(out, smooth_, spacing)
    return np.ascontiguousarray(out, dtype=np.float32)
