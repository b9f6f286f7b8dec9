"""Views that show how good an alignment is: checkerboard, difference, colour overlay."""

from __future__ import annotations

import numpy as np

from .metrics import robust_normalize


def checkerboard(a, b, tile: float | None = None, spacing=None) -> np.ndarray:
    """Interleave two same-grid images in tiles of ``tile`` world units (2D or 3D).

    Both images are normalised to [0, 1] first so the tiles can be compared by eye.
    The default tile is an eighth of the smallest world extent.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs two images on one grid; got {a.shape} and {b.shape}")
    spacing = np.ones(a.ndim) if spacing is None else np.asarray(spacing, float)
    extent = np.asarray(a.shape) * spacing
    if tile is None:
        tile = float(np.min(extent)) / 8
    if not tile > 0:
        raise ValueError(f"checkerboard tile must be positive (world units); got {tile}")
    parity = np.zeros(a.shape, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(a.shape, spacing)):
        idx = (np.arange(n) * s // tile).astype(np.int64)
        shape = [1] * a.ndim
        shape[axis] = n
        parity = parity + idx.reshape(shape)
    return np.where(parity % 2 == 0, robust_normalize(a), robust_normalize(b)).astype(np.float32)


def difference(a, b, mask=None) -> np.ndarray:
    """Signed difference of the normalised images (b - a), 0 outside ``mask``."""
    out = robust_normalize(b) - robust_normalize(a)
    if mask is not None:
        out = np.where(mask, out, 0.0)
    return out.astype(np.float32)


def overlay(a, b) -> np.ndarray:
    """Green/magenta RGB overlay: white where aligned structures coincide."""
    a = robust_normalize(a)
    b = robust_normalize(b)
    return np.stack([b, a, b], axis=-1)
