"""Preprocessing shared by all backends: grey conversion, normalisation, equalisation,
smoothing. All functions return new arrays; inputs are never modified."""

from __future__ import annotations

import numpy as np

from .metrics import percentiles  # noqa: F401  (re-exported: the fast np.percentile)

EQUALIZE_CHOICES = (None, "hist", "clahe")


def to_grey(image: np.ndarray) -> np.ndarray:
    """RGB(A) (last axis) -> luminance, as float32."""
    image = np.asarray(image)
    rgb = image[..., :3].astype(np.float32)
    return rgb @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


def normalize(image: np.ndarray, mask=None, low: float = 0.5, high: float = 99.5,
              clip: bool = True) -> np.ndarray:
    """Robust rescale to [0, 1] by percentiles (float32); ``clip=False`` keeps the values
    beyond the percentiles (a purely linear rescale)."""
    from .metrics import robust_normalize

    return robust_normalize(image, mask, low, high, clip=clip)


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


def prepare_uint8(image, *, mask=None, finite: bool = False) -> np.ndarray:
    """``prepare(image, mask=mask)`` (robust [0, 1] normalisation, clipped) as uint8
    (x 255, rounded half up), bit for bit what a detector gets from the float image, in
    one blocked pass: for backends that only read 8-bit images (``UINT8_INPUT``).
    ``finite=True``: the caller checked that every value is finite (same result, one
    pass fewer)."""
    from .metrics import robust_normalize_uint8

    return robust_normalize_uint8(image, mask, finite=finite)
