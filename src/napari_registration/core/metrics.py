"""Similarity scores between two images on the same grid, and target registration error.

Intensity scores are computed where both images have data (``mask``), after robust
normalisation of each image to [0, 1] (0.5th and 99.5th percentiles), so MSE is
comparable across images of different dtypes and ranges.

* ``mse``: mean squared error of the normalised images (lower is better, 0 = identical)
* ``ncc``: normalised cross-correlation (1 = identical up to gain/offset)
* ``mi``: mutual information in nats from a 32x32 joint histogram (higher is better)
* ``ssim``: structural similarity (1 = identical)
"""

from __future__ import annotations

import numpy as np


PERCENTILE_SAMPLES = 1_000_000


def _normalize_range(image: np.ndarray, mask, low, high, finite: bool = False):
    """The ``(lo, hi)`` that :func:`robust_normalize` maps to 0/1, or None when the
    result is all zeros (nothing selected, or a constant selection). ``finite``: the
    caller knows every value is finite (see :func:`percentiles`)."""
    values = image[mask] if mask is not None else image.ravel()
    if values.size == 0:
        return None
    if values.size > PERCENTILE_SAMPLES:
        # an even subsample estimates the percentiles as well and, on volumes, keeps one
        # GIL-holding np.percentile call from freezing napari's GUI for ~0.1-0.2 s
        values = values[:: values.size // PERCENTILE_SAMPLES]
    lo, hi = percentiles(values, [low, high], finite=finite)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return None
    return lo, hi


def robust_normalize(image: np.ndarray, mask: np.ndarray | None = None, low=0.5, high=99.5,
                     clip: bool = True) -> np.ndarray:
    """Rescale so the ``low``/``high`` percentiles map to 0/1 (float32), clipped to [0, 1]
    unless ``clip=False`` (then values beyond the percentiles keep their detail)."""
    image = np.asarray(image, dtype=np.float32)
    rng = _normalize_range(image, mask, low, high)
    if rng is None:
        return np.zeros_like(image)
    lo, hi = rng
    out = image - np.float32(lo)  # one new float32 array, then in place
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


# rows of float32 scratch per block in robust_normalize_uint8 (~256 KB: stays in cache)
_U8_BLOCK = 65_536


def robust_normalize_uint8(image: np.ndarray, mask: np.ndarray | None = None, low=0.5,
                           high=99.5, *, finite: bool = False) -> np.ndarray:
    """``robust_normalize(image, mask, low, high)`` (clipped) as uint8, rounded half up:
    bit for bit ``floor(robust_normalize(...) * 255 + 0.5)`` in float32, which is what
    OpenCV's detectors are given. Computed in blocks of rows through one small float32
    scratch, so the only image-sized allocation is the uint8 result (the float32 image
    and its scaled copy are never made: fresh pages cost more than the arithmetic).
    ``finite=True``: the caller has checked that no value is NaN or infinite (the core's
    grey images), which spares :func:`percentiles` its NaN pass; the result is the same."""
    image = np.asarray(image, dtype=np.float32)
    out = np.empty(image.shape, dtype=np.uint8)
    rng = _normalize_range(image, mask, low, high, finite=finite)
    if rng is None:
        out.fill(0)
        return out
    lo, span = np.float32(rng[0]), np.float32(rng[1] - rng[0])

    def stretch(src, dst, b):
        """``dst[...] = floor(clip((src - lo) / span, 0, 1) * 255 + 0.5)`` through the
        float32 scratch ``b`` (truncation toward zero = floor: b >= 0.5)."""
        np.subtract(src, lo, out=b)
        b /= span
        np.clip(b, 0.0, 1.0, out=b)
        b *= np.float32(255.0)
        b += np.float32(0.5)
        np.copyto(dst, b, casting="unsafe")

    if image.flags.c_contiguous:  # flat blocks through one scratch
        flat_in, flat_out = image.reshape(-1), out.reshape(-1)
        scratch = np.empty(min(_U8_BLOCK, flat_in.size), dtype=np.float32)
        for a in range(0, flat_in.size, _U8_BLOCK):
            src = flat_in[a:a + _U8_BLOCK]
            stretch(src, flat_out[a:a + src.size], scratch[:src.size])
    else:  # a strided view: row blocks of the array itself
        rows = max(1, _U8_BLOCK // max(1, int(np.prod(image.shape[1:]))))
        for r in range(0, image.shape[0], rows):
            src = image[r:r + rows]
            stretch(src, out[r:r + rows], np.empty(src.shape, dtype=np.float32))
    return out


# below this many values np.percentile's one partition is as fast as the bracket search
_BRACKET_MIN = 65_536
_BRACKET_SAMPLE = 8_192


def percentiles(values, q, *, finite: bool = False) -> np.ndarray:
    """``np.percentile(values, q)`` (its default "linear" method), the same numbers, in
    about a third of the time on large float arrays.

    np.percentile partitions every value; the result needs only the two order statistics
    around each requested rank. Here a sorted strided sample of ~8k values gives a narrow
    value range that must hold them; one pass counts the values below the range and
    collects those inside (a tail rank's range is open on one side: one comparison), and
    only these are partitioned. The range is checked (enough values below and inside);
    if it misses, or NaNs are present (a sum, checked first), np.percentile is called.
    The interpolation repeats numpy's arithmetic step by step (tested for equality).
    ``finite=True`` promises that no value is NaN or infinite (the caller checked; the
    core's grey images are): the NaN pass is skipped (~0.15-0.3 ms per 512^2 image)."""
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
    if not finite:
        with np.errstate(over="ignore", invalid="ignore"):  # inf + -inf: NaN, then numpy's
            total = np.add.reduce(v)
        if np.isnan(total):  # one pass, no copy: NaN anywhere makes the sum NaN
            return np.percentile(v, q)
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
        # a rank in a tail (the 0.5/99.5 percentiles of the normalisation) has a
        # one-sided bracket: one comparison pass instead of three
        if lo_v == -np.inf:
            n_below = 0
            inside = v[v <= hi_v]
        elif hi_v == np.inf:
            inside = v[v >= lo_v]
            n_below = n - inside.size
        else:
            n_below = int(np.count_nonzero(v < lo_v))
            inside = v[(v >= lo_v) & (v <= hi_v)]
        if n_below > r0 or n_below + inside.size <= r1:
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


def mse(a, b, mask=None) -> float:
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64))
    d = d[mask] if mask is not None else d
    return float(np.mean(d * d)) if d.size else float("nan")


def ncc(a, b, mask=None) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


def mutual_information(a, b, mask=None, bins: int = 32) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size < 2:
        return float("nan")
    # the joint histogram of np.histogram2d(a, b, bins) (equal bins over each range),
    # by one bincount: histogram2d's searchsorted cost ~20 ms per score on 65k pixels,
    # a quarter of a 512^2 translation's whole registration (issue #15)
    hist = np.bincount(_bin_index(a.ravel(), bins) * bins + _bin_index(b.ravel(), bins),
                       minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    pxy = hist / hist.sum()
    px = pxy.sum(axis=1, keepdims=True)
    py = pxy.sum(axis=0, keepdims=True)
    nz = pxy > 0
    return float(np.sum(pxy[nz] * np.log(pxy[nz] / (px @ py)[nz])))


def _bin_index(v: np.ndarray, bins: int) -> np.ndarray:
    """Index of equal-width bins over [v.min(), v.max()], the last bin closed (as numpy's
    histograms); a constant array falls in the middle bin, as there."""
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.full(v.shape, bins // 2, np.intp)
    idx = ((v - lo) * (bins / (hi - lo))).astype(np.intp)
    return np.minimum(idx, bins - 1, out=idx)


def ssim(a, b, mask=None) -> float:
    from skimage.metrics import structural_similarity

    # float32: skimage keeps it, and its ~8 full-size filtered images then take half
    # the memory (in float64 SSIM cost 16x the two images: the largest scoring buffer)
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if min(a.shape) < 7:
        return float("nan")
    _, full = structural_similarity(a, b, data_range=1.0, full=True)
    return float(np.mean(full[mask]) if mask is not None else np.mean(full))


def tre(points_a, points_b) -> dict:
    """Target registration error between paired (N, D) points: mean, median, max, rms."""
    a = np.asarray(points_a, float)
    b = np.asarray(points_b, float)
    if a.shape != b.shape:
        raise ValueError(f"TRE needs paired points of the same shape; got {a.shape} and {b.shape}")
    err = np.linalg.norm(a - b, axis=1)
    return {
        "mean": float(err.mean()),
        "median": float(np.median(err)),
        "max": float(err.max()),
        "rms": float(np.sqrt(np.mean(err ** 2))),
    }


def compare(fixed, warped, mask=None, *, with_ssim: bool = True) -> dict:
    """All scores of ``warped`` against ``fixed`` over ``mask`` (both on one grid)."""
    fixed = np.asarray(fixed)
    warped = np.asarray(warped)
    if fixed.shape != warped.shape:
        raise ValueError(f"images to compare must share a grid; got {fixed.shape} and {warped.shape}")
    if mask is not None and not np.any(mask):
        return {"mse": float("nan"), "ncc": float("nan"), "mi": float("nan"),
                "ssim": float("nan"), "overlap": 0.0}
    a = robust_normalize(fixed, mask)
    b = robust_normalize(warped, mask)
    out = {
        "mse": mse(a, b, mask),
        "ncc": ncc(a, b, mask),
        "mi": mutual_information(a, b, mask),
    }
    if with_ssim:
        out["ssim"] = ssim(a, b, mask)
    out["overlap"] = float(np.mean(mask)) if mask is not None else 1.0
    return out
