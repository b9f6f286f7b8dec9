"""Large image pairs with a known motion, built lazily from small real images.

For tests, benchmarks and the guide: a whole-slide-sized (or volume-sized) fixed image
is a real image (scikit-image's immunohistochemistry slide, a brain MR template ...)
mirrored and magnified; the moving image is the same scene seen through a known
transform. Nothing is held in memory: every block (and every pyramid level) is
computed from the small source image when it is read, so a 40,000^2 pair costs
nothing until it is used.
"""

from __future__ import annotations

import numpy as np

from .core.transform import Transform

__all__ = ["lazy_scene", "slide_pair", "smooth_deformation"]


def _sample(texture, coords, shape, rgb, scale):
    from scipy import ndimage

    if len(shape) == 2:
        # 2D: OpenCV's remap (bilinear, mirrored edges) is ~20x faster than scipy here;
        # its 1/32-pixel weights only define the scene, the same for fixed and moving
        import cv2

        tex = np.ascontiguousarray(texture, dtype=np.float32)
        rows = (coords[0] / scale).astype(np.float32).reshape(shape)
        cols = (coords[1] / scale).astype(np.float32).reshape(shape)
        out = cv2.remap(tex, cols, rows, interpolation=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT)
        return out.reshape(shape + ((texture.shape[-1],) if rgb else ()))
    if rgb:
        return np.stack([ndimage.map_coordinates(texture[..., c], coords / scale, order=1,
                                                 mode="grid-mirror", output=np.float32).reshape(shape)
                         for c in range(texture.shape[-1])], axis=-1)
    return ndimage.map_coordinates(texture, coords / scale, order=1, mode="grid-mirror",
                                   output=np.float32).reshape(shape)


def _sample_block(block_info=None, *, texture, magnify, detail, detail_magnify, factor,
                  transform, rgb, out_dtype, ndim):
    """Evaluate the scene on one block of one level: pixel index -> level-0 world of the
    pixel's centre -> (moving image: through ``transform``) -> texture coordinates."""
    loc = block_info[None]["array-location"][:ndim]
    axes = [np.arange(a, b, dtype=np.float64) * f + (f - 1) / 2 for (a, b), f in zip(loc, factor)]
    grid = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([g.ravel() for g in grid], axis=1)
    if transform is not None and transform.is_linear and not transform.is_projective:
        # moving world -> the fixed scene's world; by hand: a (N, 2) @ (2, 2) matmul
        # went through BLAS threads that fought dask's (0.6 s a block on a busy machine)
        m = transform.matrix
        pts = sum(pts[:, k:k + 1] * m[:ndim, k] for k in range(ndim)) + m[:ndim, ndim]
    elif transform is not None:
        pts = transform.apply(pts)
    shape = tuple(b - a for a, b in loc)
    out = _sample(texture, pts.T, shape, rgb, magnify)
    if detail is not None:
        # fine detail from a second real image, from its own pyramid so that coarse
        # levels see it averaged (as a scanner's lower magnification would), not aliased
        j = max(0, int(np.round(np.log2(max(float(np.min(factor)), 1.0) / detail_magnify))))
        j = min(j, len(detail) - 1)
        mod = 0.55 + 0.45 * _sample(detail[j], pts.T, shape, False, detail_magnify * 2 ** j)
        out = out * (mod[..., None] if rgb else mod)
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(out_dtype)


def lazy_scene(texture, shape, *, magnify: float, transform: Transform | None = None,
               factor=1, rgb: bool = False, dtype=None, chunks=1024, detail=None,
               detail_magnify: float = 4.0):
    """A dask array of ``shape`` (spatial) showing ``texture`` magnified ``magnify`` times
    (mirrored beyond its edges), optionally modulated by ``detail`` (a list of levels of
    a second image, fine -> coarse, magnified ``detail_magnify`` times), at pyramid
    ``factor`` (a pixel covers ``factor`` level-0 pixels, centred on them). With
    ``transform`` T (moving world -> fixed world) the pixel at moving world ``x`` shows
    the fixed scene at ``T(x)``."""
    import dask.array as da

    texture = np.asarray(texture)
    ndim = len(shape)
    factor = np.broadcast_to(np.asarray(factor, float), (ndim,))
    dtype = np.dtype(dtype or texture.dtype)
    chunks = tuple(min(int(c), int(n)) for c, n in
                   zip(np.broadcast_to(np.asarray(chunks).ravel(), (ndim,)), shape))
    full_shape = tuple(shape) + ((texture.shape[-1],) if rgb else ())
    full_chunks = chunks + ((texture.shape[-1],) if rgb else ())
    return da.map_blocks(_sample_block, dtype=dtype, chunks=da.core.normalize_chunks(full_chunks, full_shape),
                         meta=np.empty((0,) * len(full_shape), dtype),
                         texture=texture, magnify=float(magnify), detail=detail,
                         detail_magnify=float(detail_magnify), factor=factor, transform=transform,
                         rgb=rgb, out_dtype=dtype, ndim=ndim)


def _detail_levels(image, n=12):
    from skimage.transform import pyramid_gaussian

    img = np.asarray(image, np.float32) / 255.0
    return [np.ascontiguousarray(lev, np.float32)
            for lev in pyramid_gaussian(img, max_layer=n, downscale=2, preserve_range=True)
            if min(lev.shape) >= 2]


def smooth_deformation(shape, amplitude: float, *, cells: int = 4, seed: int = 0,
                       spacing=1.0):
    """A smooth, fold-free random deformation of a ``shape`` field of view (world =
    index * ``spacing``): a forward displacement field (moving side -> fixed side) on a
    coarse grid, about ``cells`` bumps a side, largest displacement ``amplitude`` world
    units. Linear interpolation between grid nodes 1/16 of a cell apart keeps it smooth."""
    from scipy import ndimage

    from .core.transform import FieldStep

    ndim = len(shape)
    spacing = np.broadcast_to(np.asarray(spacing, float), (ndim,))
    rng = np.random.default_rng(seed)
    nodes = cells * 16 + 1
    field = np.empty((nodes,) * ndim + (ndim,), np.float32)
    for k in range(ndim):
        noise = rng.standard_normal((nodes,) * ndim)
        field[..., k] = ndimage.gaussian_filter(noise, sigma=nodes / cells / 2.5, mode="reflect")
    field *= float(amplitude) / max(float(np.abs(field).max()), 1e-12)
    extent = (np.asarray(shape, float) - 1) * spacing
    return FieldStep(field, spacing=extent / (nodes - 1), origin=np.zeros(ndim), direction="forward")


def slide_pair(size: int = 40_000, *, angle: float = 2.0, shift=(123.4, -56.7), levels: int = 6,
               chunks: int = 1024, deform: float = 0.0, seed: int = 0):
    """A whole-slide pair (uint8 RGB, ``size`` x ``size``) from scikit-image's
    immunohistochemistry slide (detail: its camera photo), as pyramids (lists fine -> coarse, 2x per level).

    Returns ``(fixed_levels, moving_levels, truth)``; ``truth`` maps moving world ->
    fixed world (rotation by ``angle`` degrees about the centre, then ``shift``), level-0
    pixel units. ``deform`` > 0 first bends the moving slide by a smooth random
    deformation (:func:`smooth_deformation`, largest displacement ``deform`` px, ``seed``),
    as a slide that stretched on its glass: ``truth`` is then deformable."""
    from skimage import data

    texture = data.immunohistochemistry()
    detail = _detail_levels(data.camera())
    magnify = size / texture.shape[0]  # the slide shows the whole stain image once
    c = (size - 1) / 2
    truth = Transform.from_rotation(angle, center=(c, c)).then(Transform.from_translation(shift))
    if deform:
        bend = Transform(steps=[smooth_deformation((size, size), deform, seed=seed)])
        truth = bend.then(truth)
    fixed, moving = [], []
    for k in range(levels):
        f = 2 ** k
        n = size // f
        for out, t in ((fixed, None), (moving, truth)):
            out.append(lazy_scene(texture, (n, n), magnify=magnify, transform=t, factor=f,
                                  rgb=True, chunks=chunks, detail=detail))
    return fixed, moving, truth
