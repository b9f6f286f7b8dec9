"""``register()``: validate, preprocess, dispatch to a backend, warp, score.

Backends live in ``napari_registration.backends`` and are found through a small
registry (name -> module). A backend module provides

* ``TRANSFORMS``: the transform names it supports;
* ``NDIMS``: the image dimensions it supports (``None`` for any);
* ``DESCRIPTION``: one line for menus;
* ``register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress,
  cancel, **options) -> BackendResult``: keyword-only options with defaults, which
  are also what a widget shows for the method.

Backends see float32 arrays in [0, 1], spacing, and masks; they never see origins
(the core composes them in) and never warp the output image (the core does, once).
They return a transform mapping moving world -> fixed world *for zero origins*.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .resample import _geometry, overlap_mask, resample
from .transform import Transform

__all__ = [
    "register",
    "RegistrationResult",
    "BackendResult",
    "RegistrationError",
    "RegistrationCancelled",
    "available_methods",
    "method_info",
    "TRANSFORM_CHOICES",
]

TRANSFORM_CHOICES = ("translation", "rigid", "similarity", "affine", "homography", "bspline",
                     "demons", "tps")

# name -> module; a backend appears in available_methods() once its module exists
_BACKENDS: dict[str, str] = {
    "fourier": "napari_registration.backends.fourier",
    "features": "napari_registration.backends.features",
    "intensity": "napari_registration.backends.intensity",
    "landmarks": "napari_registration.backends.landmarks",
    "auto": "napari_registration.backends.auto",
}

# options the core itself handles, for every method
CORE_OPTIONS = {
    "normalize": True,        # robust [0, 1] rescale before the backend
    "equalize": None,         # None | "hist" | "clahe"
    "smooth": 0.0,            # Gaussian sigma in world units
    "fixed_mask": None,       # bool array, fixed shape: where to look
    "moving_mask": None,      # bool array, moving shape
    "rgb": None,              # None = guess (last axis 3/4 on a 2D image), True, False
    "warp": True,             # resample moving onto the fixed grid
    "order": 1,               # interpolation order for the warped image
    "score": True,            # compute before/after metrics
    "fast_warp": False,       # 2D linear: OpenCV's warp (~4x faster, 1/32-px weights)
}


class RegistrationError(Exception):
    """The method ran but could not find an alignment; the message says what to try.

    Deliberately not a RuntimeError: superqt's generator workers (napari's
    thread_worker) take a RuntimeError for a deleted worker and emit neither
    ``errored`` nor ``finished``, which left widgets waiting forever."""


class RegistrationCancelled(RegistrationError):
    """The ``cancel`` callback asked to stop."""


@dataclass
class BackendResult:
    """What a backend returns: a transform (moving world -> fixed world, zero origins)
    and diagnostics. ``extras`` carries arrays for display (e.g. keypoints) in napari
    coordinates of the zero-origin worlds; the core shifts them by the origins."""

    transform: Transform
    info: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationResult:
    """The outcome of :func:`register`.

    Attributes
    ----------
    warped : ndarray, dask array, list of dask arrays, or None
        The moving image resampled onto the fixed grid (same shape as ``fixed``). Lazy
        (a dask array, computed block by block) when ``fixed`` or ``moving`` was a dask
        array or ``pixel_budget`` was given; a list with one lazy array per fixed level
        (fine -> coarse) when ``fixed`` was a pyramid.
    transform : Transform
        Maps MOVING world coordinates -> FIXED world coordinates (napari axis order).
    metrics : dict
        ``{"before": {...}, "after": {...}}`` with ``mse``, ``ncc``, ``mi``, ``ssim`` and
        ``overlap`` (fraction of the fixed grid covered by the moving image).
    info : dict
        Method, options, stop reason, iterations or inliers, seconds, versions.
    extras : dict
        Display data from the backend (e.g. ``fixed_keypoints``, ``moving_keypoints``,
        ``matches``), in world coordinates.
    """

    warped: np.ndarray | None
    transform: Transform
    metrics: dict
    info: dict
    fixed_shape: tuple
    fixed_spacing: tuple
    fixed_origin: tuple
    moving_shape: tuple
    moving_spacing: tuple
    moving_origin: tuple
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe: the transform, metrics, info and both grids."""
        return {
            "type": "napari-registration result",
            "transform": self.transform.to_dict(),
            "metrics": _json_safe(self.metrics),
            "info": _json_safe(self.info),
            "fixed": {"shape": list(self.fixed_shape), "spacing": list(self.fixed_spacing),
                      "origin": list(self.fixed_origin)},
            "moving": {"shape": list(self.moving_shape), "spacing": list(self.moving_spacing),
                       "origin": list(self.moving_origin)},
        }


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Transform):
        return obj.to_dict()
    if isinstance(obj, np.ndarray):
        if obj.size > 64:
            return f"<array shape={list(obj.shape)} dtype={obj.dtype}>"
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


# ---------------------------------------------------------------------------- registry
def available_methods() -> list[str]:
    """Names of the registration methods installed in this version."""
    # the backends are modules of this package: whether each exists does not change while
    # the process runs, so the file-system look-ups (a find_spec per backend, ~0.2 ms a
    # call, made twice by every register()) run once per registry content
    key = tuple(_BACKENDS.items())
    names = _AVAILABLE.get(key)
    if names is None:
        names = _AVAILABLE[key] = tuple(
            name for name, mod in key if importlib.util.find_spec(mod) is not None)
    return list(names)


_AVAILABLE: dict = {}


def _backend(method: str):
    if not isinstance(method, str) or method not in available_methods():
        raise ValueError(f"unknown method {method!r}; choose one of {available_methods()}")
    return importlib.import_module(_BACKENDS[method])


def method_info(method: str) -> dict:
    """Transforms, dimensions, description and options (name -> default) of a method,
    for widgets and documentation."""
    mod = _backend(method)
    options, annotations, doc = _signature_info(mod.register)
    return {
        "name": method,
        "description": getattr(mod, "DESCRIPTION", ""),
        "transforms": tuple(mod.TRANSFORMS),
        "ndims": getattr(mod, "NDIMS", None),
        "options": dict(options),
        # option -> its annotation as text (e.g. "float | None", "Literal['orb', 'sift']"):
        # lets a widget offer None or a fixed set of choices
        "annotations": dict(annotations),
        # the backend's docstring: its "Options" section documents each option
        "doc": doc,
    }


# backend register function -> (options, annotations, doc, parameters): register() and
# auto ask for the same methods on every call, and the signature does not change between
# them (a replaced or reloaded backend has another function object, so it is inspected
# afresh; inspect.signature costs ~0.2 ms a call)
_SIGNATURES: dict = {}


def _signature_info(fn) -> tuple[dict, dict, str]:
    """The options (name -> default), their annotations as text, and the docstring of a
    backend's register function."""
    return _signature(fn)[:3]


def _signature(fn) -> tuple:
    if fn not in _SIGNATURES:
        sig = inspect.signature(fn)
        options = {
            name: p.default
            for name, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _BACKEND_PLUMBING
        }
        annotations = {
            name: p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
            for name, p in sig.parameters.items()
            if name in options and p.annotation is not inspect.Parameter.empty
        }
        _SIGNATURES[fn] = (options, annotations, inspect.getdoc(fn) or "", sig.parameters)
    return _SIGNATURES[fn]


_BACKEND_PLUMBING = {"transform", "fixed_spacing", "moving_spacing", "progress", "cancel",
                     "fixed_mask", "moving_mask", "linear_copy", "stretch_uint8",
                     "uint8_native"}


# ------------------------------------------------------------------------- validation
def _guess_rgb(a: np.ndarray) -> bool:
    return a.ndim == 3 and a.shape[-1] in (3, 4) and min(a.shape[:2]) > 8


def _as_image(name: str, image, rgb) -> tuple[np.ndarray, bool]:
    if image is None:
        raise ValueError(f"{name} image is None: pass a numpy or dask array")
    if hasattr(image, "compute") and hasattr(image, "chunks"):  # dask
        image = image.compute()
    try:
        a = np.asarray(image)
    except Exception as err:  # pragma: no cover - exotic array-likes
        raise ValueError(f"{name} image cannot be read as an array: {err}") from None
    if a.dtype == object or a.dtype.kind in "USV":
        raise ValueError(f"{name} image has dtype {a.dtype}; pass a numeric array")
    if a.dtype.kind == "c":
        raise ValueError(f"{name} image is complex; pass its magnitude (np.abs) or real part")
    if a.size == 0:
        raise ValueError(f"{name} image is empty (shape {a.shape})")
    is_rgb = _guess_rgb(a) if rgb is None else bool(rgb)
    if is_rgb and (a.ndim < 3 or a.shape[-1] not in (3, 4)):
        raise ValueError(f"{name} image with rgb=True needs a last axis of 3 or 4; shape is {a.shape}")
    return a, is_rgb


def _grey_float(name, a, is_rgb, mask=None) -> tuple[np.ndarray, float, float]:
    """The finite float32 grey image of ``a`` and its (min, max)."""
    from .preprocess import to_grey

    # float32 input is used as is (no copy: it is only read); see the fill below
    g = to_grey(a) if is_rgb else np.asarray(a, dtype=np.float32)
    # min and max are needed below anyway, and NaN/inf anywhere shows in them (NaN
    # propagates): no boolean image unless something is not finite
    lo, hi = float(g.min()), float(g.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(g)
        bad = ~finite
        if g is a or np.shares_memory(g, a):
            g = g.copy()
        if mask is None or np.any(bad & mask):
            where = "" if mask is None else f" inside {name}_mask"
            raise ValueError(
                f"{name} image has {int(np.count_nonzero(bad if mask is None else bad & mask))} "
                f"NaN/inf values{where}; replace them first, e.g. np.nan_to_num({name}, nan=0.0), "
                f"or exclude them with {name}_mask (True where the image is valid)"
            )
        # every NaN/inf lies outside the mask: give them a finite value (the backends
        # never look there) so that normalisation and resampling stay finite
        g[bad] = float(np.min(g[finite & mask]))
        lo, hi = float(g.min()), float(g.max())
    if hi == lo:
        raise ValueError(f"{name} image is constant (every pixel = {lo}): there is nothing to align")
    return g, lo, hi


def _native_uint8_gain(raw: np.ndarray, lo: float, hi: float) -> float | None:
    """The gain that puts a grey image on its own 8-bit scale, or None when it has none:
    1 for uint8 images (grey values 0..255), 255 for floating-point images within
    [0, 1]; other dtypes and ranges (uint16, raw intensities) have no 8-bit scale of
    their own and are only ever stretched. ``raw``: the array :func:`_as_image` made."""
    if raw.dtype == np.uint8:
        return 1.0
    if raw.dtype.kind == "f" and 0.0 <= lo and hi <= 1.0:
        return 255.0
    return None


def _spatial_shape(a, is_rgb) -> tuple:
    return tuple(a.shape[:-1]) if is_rgb else tuple(a.shape)


def _mask(name, mask, shape):
    if mask is None:
        return None
    m = mask.compute() if hasattr(mask, "compute") and hasattr(mask, "chunks") else np.asarray(mask)
    if m.dtype == object or m.dtype.kind in "USVc":
        raise ValueError(f"{name} must be a boolean (or 0/1) array; got dtype {m.dtype}")
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have the image's shape {tuple(shape)}; got {m.shape}")
    m = m != 0
    if not m.any():
        raise ValueError(f"{name} is empty (all False): nothing would be registered")
    return m


def _check_option_type(method, key, value, default, annotation) -> None:
    """An option's value must have the kind of its default (bool, whole number, number,
    text), or be None where the signature allows it: a wrong type is reported here,
    naming the option, instead of surfacing as a TypeError deep inside a backend."""
    import numbers

    if annotation is inspect.Parameter.empty:
        return  # an unannotated option may take anything (e.g. init: a name or a Transform)
    kinds = {t.strip() for t in str(annotation).split("|")} - {"None", ""}
    if len(kinds) > 1:
        return  # several accepted types: the backend checks them itself
    if value is None:
        if default is None or "None" in str(annotation):
            return
        raise ValueError(f"option {key!r} of method {method!r} cannot be None; its default is {default!r}")
    if key == "init" and isinstance(value, Transform):
        return  # every backend's `init` may be a Transform (the core converts its worlds)
    if isinstance(default, bool):
        ok = isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))
        kind = "True or False"
    elif isinstance(default, numbers.Integral):
        ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
              and np.isfinite(value) and float(value) == int(value))
        kind = "a whole number"
    elif isinstance(default, numbers.Real):
        ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
              and not np.isnan(value))
        kind = "a number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        kind = "a string"
    else:
        return
    if not ok:
        raise ValueError(f"option {key!r} of method {method!r} must be {kind} (default "
                         f"{default!r}); got {value!r} ({type(value).__name__})")


def _check_option_types(method, backend_register, backend_opts, core) -> None:
    params = _signature(backend_register)[3]
    for key, value in backend_opts.items():
        p = params[key]
        _check_option_type(method, key, value, p.default, p.annotation)
    for key in ("normalize", "warp", "score", "order", "smooth", "fast_warp"):
        _check_option_type(method, key, core[key], CORE_OPTIONS[key], type(CORE_OPTIONS[key]).__name__)
    if core["rgb"] is not None:
        _check_option_type(method, "rgb", core["rgb"], False, "bool")
    if not 0 <= int(core["order"]) <= 5:
        raise ValueError(f"order (spline interpolation order of the warped image) must be 0-5; "
                         f"got {core['order']}")
    core["order"] = int(core["order"])


# ----------------------------------------------------------------------------- register
def register(
    fixed,
    moving,
    *,
    method: str = "fourier",
    transform: str = "translation",
    fixed_spacing=None,
    moving_spacing=None,
    fixed_origin=None,
    moving_origin=None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    **options: Any,
) -> RegistrationResult:
    """Align ``moving`` to ``fixed``.

    Parameters
    ----------
    fixed, moving : array_like
        2D or 3D images (numpy or dask; ``fourier`` accepts any dimension). They may
        differ in shape and spacing. RGB(A) images (last axis 3 or 4) are registered
        on their luminance and warped per channel.
    method : str
        One of :func:`available_methods` ("fourier", "features", "intensity",
        "landmarks", "auto").
    transform : str
        "translation", "rigid", "similarity", "affine", "homography", "bspline",
        "demons" or "tps", as the method supports.
    fixed_spacing, moving_spacing : sequence of float
        World size of a pixel per axis (napari ``layer.scale``); default 1.
    fixed_origin, moving_origin : sequence of float
        World position of pixel 0 (napari ``layer.translate``); default 0.
    progress : callable(fraction, message), optional
    cancel : callable() -> bool, optional
        Polled; returning True stops with :class:`RegistrationCancelled`.
    **options
        Shared: ``normalize``, ``equalize`` (None/"hist"/"clahe"), ``smooth`` (world
        sigma), ``fixed_mask``, ``moving_mask``, ``rgb``, ``warp``, ``order``, ``score``,
        ``fast_warp`` (2D linear warps with OpenCV: ~4x faster, 1/32-pixel weights).
        Per method: see :func:`method_info`.
        Big images: ``pixel_budget`` (pixels a side of the level the transform is
        estimated on; default 2048 for pyramids and dask arrays, off for numpy),
        ``pyramid_refine`` ("tiles" or None: coarse-to-fine linear refinement on tiles of finer
        levels), ``refine_tile`` (tile side, default 512 in 2D, 96 in 3D),
        ``pyramid_deformable`` (True: then a B-spline refinement on the finest level within
        ``deformable_budget`` pixels a side, default 512 in 2D, 128 in 3D). ``fixed``/``moving`` may be
        pyramids: lists of arrays from fine to coarse (a napari multiscale layer's data).

    Returns
    -------
    RegistrationResult
        ``result.transform`` maps moving world -> fixed world; ``result.warped`` is the
        moving image on the fixed grid.

    Raises
    ------
    ValueError
        Bad input; the message says what to change.
    RegistrationError
        The method could not find an alignment; the message says what to try.
    """
    # pyramids (lists of levels) and dask arrays: estimate on a level within the pixel
    # budget, refine on tiles, warp lazily (core/pyramid.py); never compute a whole dask input
    from .pyramid import PYRAMID_OPTIONS, is_pyramid, register_pyramid
    from .lazy import is_dask

    if (is_pyramid(fixed) or is_pyramid(moving) or is_dask(fixed) or is_dask(moving)
            or options.get("pixel_budget") is not None):
        _backend(method)
        return register_pyramid(fixed, moving, method=method, transform=transform,
                                fixed_spacing=fixed_spacing, moving_spacing=moving_spacing,
                                fixed_origin=fixed_origin, moving_origin=moving_origin,
                                progress=progress, cancel=cancel, **options)
    for key in PYRAMID_OPTIONS:
        if options.get(key, PYRAMID_OPTIONS[key]) != PYRAMID_OPTIONS[key]:
            raise ValueError(f"option {key!r} applies to pyramids and dask arrays; pass "
                             "pixel_budget=N to use it on a numpy image")
        options.pop(key, None)

    t0 = time.perf_counter()
    cancel = as_cancel_check(cancel)
    mod = _backend(method)
    supported = tuple(mod.TRANSFORMS)
    if transform not in supported:
        raise ValueError(
            f"method {method!r} does not support transform {transform!r}; choose one of {list(supported)}"
        )

    # split options: core ones vs the backend's
    core = dict(CORE_OPTIONS)
    backend_opts = {}
    info_meta = method_info(method)
    for key, value in options.items():
        if key in CORE_OPTIONS:
            core[key] = value
        elif key in info_meta["options"]:
            backend_opts[key] = value
        else:
            owners = [m for m in available_methods()
                      if m != method and key in method_info(m)["options"]]
            hint = f" ({key!r} is an option of method {owners[0]!r})" if owners else ""
            raise ValueError(
                f"unknown option {key!r} for method {method!r}{hint}. Its options: "
                f"{sorted(info_meta['options'])}; shared options: {sorted(CORE_OPTIONS)}"
            )
    _check_option_types(method, mod.register, backend_opts, core)

    fixed_raw, fixed_rgb = _as_image("fixed", fixed, core["rgb"])
    moving_raw, moving_rgb = _as_image("moving", moving, core["rgb"])
    fixed_mask = _mask("fixed_mask", core["fixed_mask"], _spatial_shape(fixed_raw, fixed_rgb))
    moving_mask = _mask("moving_mask", core["moving_mask"], _spatial_shape(moving_raw, moving_rgb))
    fixed_g, *fixed_range = _grey_float("fixed", fixed_raw, fixed_rgb, fixed_mask)
    moving_g, *moving_range = _grey_float("moving", moving_raw, moving_rgb, moving_mask)
    if fixed_g.ndim != moving_g.ndim:
        raise ValueError(
            f"fixed is {fixed_g.ndim}D {fixed_g.shape} but moving is {moving_g.ndim}D "
            f"{moving_g.shape}: both must have the same number of axes (take a slice, "
            "or pass rgb=True/False if one of them is a colour image)"
        )
    ndim = fixed_g.ndim
    for name, g in (("fixed", fixed_g), ("moving", moving_g)):
        if min(g.shape) < 4:
            colour = (" If the last axis holds colour channels, pass rgb=True (register_stack: "
                      "channel_axis=-1)." if g.shape[-1] in (3, 4) and min(g.shape[:-1]) >= 4 else "")
            raise ValueError(f"{name} image is too small to register (shape {g.shape}); every "
                             "axis needs >= 4 pixels (drop length-1 axes with np.squeeze)." + colour)
    ndims = getattr(mod, "NDIMS", None)
    if ndims is not None and ndim not in ndims:
        alt = [m for m in available_methods() if m != method and
               (getattr(_backend(m), "NDIMS", None) is None or ndim in _backend(m).NDIMS)]
        hint = f"; try method={alt[0]!r}" if alt else ""
        raise ValueError(f"method {method!r} works on {'/'.join(f'{d}D' for d in ndims)} images, "
                         f"not {ndim}D{hint}")

    f_sp = _geometry(fixed_spacing, ndim, 1.0, "fixed_spacing")
    m_sp = _geometry(moving_spacing, ndim, 1.0, "moving_spacing")
    f_or = _geometry(fixed_origin, ndim, 0.0, "fixed_origin")
    m_or = _geometry(moving_origin, ndim, 0.0, "moving_origin")
    _check_geometry_range(f_sp, m_sp, f_or, m_or)

    def report(fraction, message):
        if progress is not None:
            progress(float(min(max(fraction, 0.0), 1.0)), str(message))

    def should_stop():
        if cancel is not None and cancel():
            raise RegistrationCancelled("registration cancelled")
        return False

    def backend_progress(fraction, message):
        should_stop()
        report(0.05 + 0.8 * fraction, message)

    def backend_cancel():
        return bool(cancel is not None and cancel())

    from .preprocess import prepare, prepare_uint8

    report(0.0, "preprocessing")
    should_stop()
    # a backend that is blind to gain and offset says so (CLIP_NORMALIZED = False): it
    # gets a linear rescale, so detail beyond the percentiles is not clipped away
    clip = bool(getattr(mod, "CLIP_NORMALIZED", True))
    # a backend that mixes both kinds of stage (auto, 2D) also gets a linear rescale
    linear_copy = (clip and getattr(mod, "LINEAR_COPY", False) and ndim == 2
                   and core["normalize"] and not core["equalize"])
    if linear_copy:
        backend_opts["linear_copy"] = tuple(
            prepare(img, spacing=sp, mask=msk, smooth_=core["smooth"], clip=False)
            for img, sp, msk in ((fixed_g, f_sp, fixed_mask), (moving_g, m_sp, moving_mask)))
    # a backend that reads 8-bit images only (features: OpenCV's detectors) says so
    # (UINT8_INPUT = True) and gets the same stretch as uint8, made in one pass: no
    # float32 copies for it to convert
    uint8_input = (getattr(mod, "UINT8_INPUT", False) and clip and not linear_copy
                   and core["normalize"] and not core["equalize"] and not core["smooth"])
    # ... and one that makes that stretch itself (UINT8_STRETCH: features, in each image's
    # detection thread, so that one image's stretch overlaps the other's detection) gets
    # the finite grey images and stretch_uint8=True
    stretch_in_backend = uint8_input and getattr(mod, "UINT8_STRETCH", False)
    if stretch_in_backend:
        f_prep, m_prep = fixed_g, moving_g
        backend_opts["stretch_uint8"] = True
        # ... and each image's own 8-bit scale, where it has one (a backend that says
        # UINT8_NATIVE may detect on it before it stretches: features with ORB)
        if getattr(mod, "UINT8_NATIVE", False):
            backend_opts["uint8_native"] = (_native_uint8_gain(fixed_raw, *fixed_range),
                                            _native_uint8_gain(moving_raw, *moving_range))
    elif uint8_input:
        # _grey_float has made every value finite (or refused the image)
        f_prep = prepare_uint8(fixed_g, mask=fixed_mask, finite=True)
        m_prep = prepare_uint8(moving_g, mask=moving_mask, finite=True)
    elif linear_copy and not core["smooth"]:
        # same percentiles, same rescale: the clipped images are the linear ones clipped
        # (bit for bit), without computing the percentiles a second time
        f_prep, m_prep = (np.clip(img, 0.0, 1.0) for img in backend_opts["linear_copy"])
    else:
        f_prep = prepare(fixed_g, spacing=f_sp, mask=fixed_mask, normalize_=core["normalize"],
                         equalize_=core["equalize"], smooth_=core["smooth"], clip=clip)
        m_prep = prepare(moving_g, spacing=m_sp, mask=moving_mask, normalize_=core["normalize"],
                         equalize_=core["equalize"], smooth_=core["smooth"], clip=clip)

    # an initial transform (full world) is handed to the backend in zero-origin worlds
    if "init" in backend_opts and isinstance(backend_opts["init"], Transform):
        init = backend_opts["init"]
        if init.ndim != ndim:
            raise ValueError(f"init is a {init.ndim}D transform but the images are {ndim}D")
        backend_opts["init"] = (Transform.from_translation(m_or)
                                .then(init).then(Transform.from_translation(-f_or)))
    # paired points (landmarks) are given in full world coordinates, like init: hand them
    # to the backend in the zero-origin worlds it works in
    for key, origin in (("fixed_points", f_or), ("moving_points", m_or)):
        if backend_opts.get(key) is not None:
            try:
                pts = np.array(backend_opts[key], dtype=float)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be an (N, {ndim}) array of numbers in napari "
                                 "world coordinates") from None
            if pts.ndim != 2 or pts.shape[1] != ndim:
                raise ValueError(f"{key} must have shape (N, {ndim}) (napari axis order, world "
                                 f"coordinates) for {ndim}D images; got shape {pts.shape}")
            backend_opts[key] = pts - origin

    # the backends get arrays of their own: with normalize=False (and no other
    # preprocessing) prepare() may hand back the caller's float32 array itself
    # (stretch_uint8: the backend only reads the grey images to make its uint8 copies)
    if not stretch_in_backend and np.shares_memory(f_prep, fixed_raw):
        f_prep = f_prep.copy()
    if not stretch_in_backend and np.shares_memory(m_prep, moving_raw):
        m_prep = m_prep.copy()

    report(0.05, f"{method}: {transform}")
    t_backend = time.perf_counter()
    out: BackendResult = mod.register(
        f_prep, m_prep, transform=transform, fixed_spacing=tuple(f_sp), moving_spacing=tuple(m_sp),
        fixed_mask=fixed_mask, moving_mask=moving_mask, progress=backend_progress,
        cancel=backend_cancel, **backend_opts,
    )
    del f_prep, m_prep  # not needed for warping and scoring: free them before the warp
    should_stop()
    backend_seconds = time.perf_counter() - t_backend
    if not isinstance(out, BackendResult):  # pragma: no cover - backend contract
        raise TypeError(f"backend {method!r} returned {type(out).__name__}, not BackendResult")

    # put the origins back: moving world -> zero-origin moving -> ... -> fixed world
    full = (Transform.from_translation(-m_or).then(out.transform)
            .then(Transform.from_translation(f_or)))
    extras = dict(out.extras)
    for key in list(extras):
        if key.startswith("fixed_") and isinstance(extras[key], np.ndarray) and extras[key].ndim == 2:
            extras[key] = extras[key] + f_or
        elif key.startswith("moving_") and isinstance(extras[key], np.ndarray) and extras[key].ndim == 2:
            extras[key] = extras[key] + m_or

    geometry = dict(output_spacing=f_sp, output_origin=f_or, input_spacing=m_sp, input_origin=m_or)
    warped = None
    metrics: dict = {}
    if core["warp"] or core["score"]:
        report(0.86, "warping")
        should_stop()
        warped = resample(moving_raw, full, fixed_g.shape, rgb=moving_rgb, order=core["order"],
                          fast=bool(core["fast_warp"]), **geometry)
    if core["score"]:
        report(0.93, "scoring")
        should_stop()
        metrics = _score(fixed_g, moving_g, full, fixed_mask, f_sp, f_or, m_sp, m_or)
    if not core["warp"]:
        warped = None

    info = {
        "method": method,
        "transform": transform,
        "options": {k: v for k, v in {**core, **options}.items()
                    if k not in ("fixed_mask", "moving_mask")},
        "masks": {"fixed": fixed_mask is not None, "moving": moving_mask is not None},
        **out.info,
        "backend_seconds": backend_seconds,
        "seconds": time.perf_counter() - t0,
        "versions": _versions(),
    }
    report(1.0, "done")
    return RegistrationResult(
        warped=warped, transform=full, metrics=metrics, info=info, extras=extras,
        fixed_shape=tuple(fixed_g.shape), fixed_spacing=tuple(float(v) for v in f_sp),
        fixed_origin=tuple(float(v) for v in f_or), moving_shape=tuple(moving_g.shape),
        moving_spacing=tuple(float(v) for v in m_sp), moving_origin=tuple(float(v) for v in m_or),
    )


def as_cancel_check(cancel):
    """``cancel`` as a callable() -> bool: a callable as it is, a ``threading.Event``
    (or anything with ``is_set()``) as its ``is_set``; None stays None."""
    if cancel is None:
        return None
    is_set = getattr(cancel, "is_set", None)
    if callable(is_set):
        return is_set
    if callable(cancel):
        return cancel
    raise ValueError("cancel must be a callable returning True to stop, or a threading.Event; "
                     f"got {type(cancel).__name__}")


# pixel sizes outside these bounds, or fixed/moving/axis ratios beyond MAX_SPACING_RATIO,
# are unit mistakes (metres for micrometres, a missing scale): refused with the numbers
SPACING_RANGE = (1e-9, 1e9)
MAX_SPACING_RATIO = 1e4
MAX_ORIGIN = 1e15


def _check_geometry_range(f_sp, m_sp, f_or, m_or) -> None:
    lo, hi = SPACING_RANGE
    for name, sp in (("fixed_spacing", f_sp), ("moving_spacing", m_sp)):
        if np.any(sp < lo) or np.any(sp > hi):
            raise ValueError(f"{name} {list(map(float, sp))} is outside {lo:g}..{hi:g}; give "
                             "pixel sizes in units that make them moderate (e.g. micrometres "
                             "instead of metres)")
    both = np.concatenate([f_sp, m_sp])
    ratio = float(both.max() / both.min())
    if ratio > MAX_SPACING_RATIO:
        raise ValueError(f"pixel sizes differ by a factor of {ratio:.3g} (fixed_spacing "
                         f"{list(map(float, f_sp))}, moving_spacing {list(map(float, m_sp))}); "
                         f"at most {MAX_SPACING_RATIO:g} is accepted: check that both are in "
                         "the same units and axis order")
    for name, o in (("fixed_origin", f_or), ("moving_origin", m_or)):
        if np.any(np.abs(o) > MAX_ORIGIN):
            raise ValueError(f"{name} {list(map(float, o))} is beyond +-{MAX_ORIGIN:g}; check "
                             "its units")


# scores are statistics: ~65k evenly strided points estimate them to ~1e-3, and at
# 1 M points scoring cost a 512^2 translation more than the registration (issue #15)
SCORE_MAX_PIXELS = 2 ** 16


def _score(fixed_g, moving_g, transform, fixed_mask, f_sp, f_or, m_sp, m_or) -> dict:
    """Before/after metrics over the overlap. Large images are scored on every k-th
    fixed pixel per axis (at most ~65k points): the scores are statistics, and this keeps
    scoring from costing more than the registration itself."""
    from .metrics import compare

    ndim = fixed_g.ndim
    k = max(1, int(np.ceil((fixed_g.size / SCORE_MAX_PIXELS) ** (1.0 / ndim))))
    sub = tuple(slice(None, None, k) for _ in range(ndim))
    fixed_s = fixed_g[sub]
    geometry = dict(output_spacing=f_sp * k, output_origin=f_or, input_spacing=m_sp, input_origin=m_or)
    out = {}
    for name, t in (("before", Transform.identity(ndim)), ("after", transform)):
        img = resample(moving_g, t, fixed_s.shape, **geometry)
        mask = overlap_mask(moving_g.shape, t, fixed_s.shape, **geometry)
        if fixed_mask is not None:
            mask &= fixed_mask[sub]
        out[name] = compare(fixed_s, img, mask)
        out[name]["stride"] = k
    return out


def _versions() -> dict:
    import sys

    from .. import __version__

    out = {"napari-registration": __version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for mod, name in (("cv2", "opencv"), ("SimpleITK", "simpleitk"), ("skimage", "scikit-image"),
                      ("scipy", "scipy")):
        if mod in sys.modules:
            out[name] = getattr(sys.modules[mod], "__version__", "?")
    return out


def apply_transform(image, transform: Transform, *, output_shape, output_spacing=None,
                    output_origin=None, input_spacing=None, input_origin=None,
                    labels: bool = False, rgb: bool = False, order: int | None = None,
                    lazy: bool | None = None, chunks=None, fast: bool = False):
    """Resample other data of the moving image (channels, labels) onto the fixed grid.

    ``labels=True`` uses nearest neighbour and keeps the dtype. Input is not modified.

    A dask ``image`` (or ``lazy=True``) gives a lazy dask array: each output block (shape
    ``chunks``; default the input's chunks) reads only the input region it needs, with
    the same values as the eager warp (order 0; order 1 to the last bit of float
    rounding). ``lazy=False`` computes a dask input first and returns numpy.
    ``fast=True``: 2D linear warps with OpenCV (~4x faster than the exact warp, parallel
    on threads; 1/32-pixel interpolation weights).
    """
    from .lazy import is_dask, lazy_resample

    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a Transform (got {type(transform).__name__}); "
                        "use load_transform(path) or result.transform")
    if lazy is None:
        lazy = is_dask(image)
    if not lazy:
        image = image.compute() if is_dask(image) else np.asarray(image)
    elif not is_dask(image):
        image = np.asarray(image)
    if image.dtype.kind == "c":
        raise ValueError("cannot resample a complex image; pass np.abs(image)")
    if image.dtype == object or image.dtype.kind in "USV":
        raise ValueError(f"image has dtype {image.dtype}; pass a numeric array")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    try:
        shape = tuple(int(n) for n in np.ravel(output_shape))
    except (TypeError, ValueError):
        raise ValueError(f"output_shape must be whole numbers (the fixed image's shape); "
                         f"got {output_shape!r}") from None
    if len(shape) != transform.ndim or min(shape) < 1:
        raise ValueError(f"output_shape must be {transform.ndim} positive whole numbers (the "
                         f"fixed image's shape, without a colour axis); got {output_shape!r}")
    if order is not None and (isinstance(order, bool) or not 0 <= int(order) <= 5
                              or int(order) != order):
        raise ValueError(f"order (spline interpolation order) must be 0-5; got {order!r}")
    expected = transform.ndim + (1 if rgb else 0)
    if image.ndim != expected:
        raise ValueError(f"image is {image.ndim}D but the transform is {transform.ndim}D"
                         + (" (plus a colour axis)" if rgb else "")
                         + "; apply it to each frame/channel, or use register_stack"
                         + ("; if the last axis holds colour channels, pass rgb=True"
                            if not rgb and image.ndim == expected + 1 and image.shape[-1] in (3, 4) else ""))
    if lazy:
        return lazy_resample(image, transform, shape, output_spacing=output_spacing,
                             output_origin=output_origin, input_spacing=input_spacing,
                             input_origin=input_origin, labels=labels, rgb=rgb,
                             order=None if order is None else int(order), chunks=chunks,
                             fast=fast)
    return resample(image, transform, shape, output_spacing=output_spacing,
                    output_origin=output_origin, input_spacing=input_spacing,
                    input_origin=input_origin, labels=labels, rgb=rgb,
                    order=None if order is None else int(order), fast=fast)
