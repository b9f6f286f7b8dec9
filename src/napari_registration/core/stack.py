"""Align the frames of a time series (2D+t, 3D+t) or z-stack, and run many
registrations side by side (a local process pool or a dask.distributed cluster).

Everything goes through :func:`~napari_registration.core.register.register`, so every
installed method works frame by frame. The computation is a generator,
:func:`iter_register_stack`, that yields one event per finished frame (napari's
``thread_worker`` wraps it in the widget); :func:`register_stack` drives it and
reports through a plain ``progress(fraction, message)`` callback.

Conventions: ``StackResult.transforms[i]`` maps frame ``i``'s world coordinates to the
reference frame's world coordinates (napari axis order of one frame, world =
index * spacing, origin 0), whatever the reference mode. With ``reference="previous"``
each frame is registered to the one before it and the steps are chained:
``T_i = t(i -> i-1).then(T_{i-1})``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .register import (RegistrationCancelled, RegistrationError, _json_safe, as_cancel_check,
                       register)
from .resample import resample
from .transform import Transform

__all__ = ["register_stack", "iter_register_stack", "StackResult", "iter_tasks",
           "write_tiff_stack", "REFERENCES"]

REFERENCES = ("first", "previous", "mean")


# ----------------------------------------------------------------------------- helpers
def _is_dask(a) -> bool:
    return hasattr(a, "chunks") and hasattr(a, "compute") and hasattr(a, "map_blocks")


def _load(a) -> np.ndarray:
    """A numpy copy of one frame (a dask slice is computed here, without a cluster)."""
    if _is_dask(a):
        return np.asarray(a.compute(scheduler="sync"))
    return np.asarray(a)


def _downsample(frame: np.ndarray, factor) -> np.ndarray:
    """Block mean over ``factor`` pixels per axis (float32); the trailing partial block
    is dropped. Block ``k`` covers pixels ``k*f .. k*f+f-1``, so its centre lies at
    world ``(k*f + (f-1)/2) * spacing``: see :func:`_coarse_geometry`."""
    a = np.asarray(frame, np.float32)
    factor = tuple(int(f) for f in factor)
    if all(f == 1 for f in factor):
        return a
    a = a[tuple(slice(0, (n // f) * f) for n, f in zip(a.shape, factor))]
    shape = []
    for n, f in zip(a.shape, factor):
        shape += [n // f, f]
    return a.reshape(shape).mean(axis=tuple(range(1, 2 * len(factor), 2)), dtype=np.float32)


def _coarse_geometry(spacing, factor):
    """Spacing and origin of a block-mean downsampled grid, in the full-resolution
    world: the transform found on the coarse copy is then already a full-resolution
    world transform."""
    spacing = np.asarray(spacing, float)
    factor = np.asarray(factor, float)
    return tuple(spacing * factor), tuple(spacing * (factor - 1) / 2)


def _register_task(fixed, moving, settings: dict, fixed_ready: bool, cancel=None,
                   full=None) -> dict:
    """One registration of ``moving`` onto ``fixed`` (runs in a worker process, a dask
    worker, or in-process). Returns the transform and light-weight diagnostics.

    With ``full`` (the whole frame, all channels) and ``moving=None`` the driver is taken
    from ``full`` and ``full`` is warped here too, so a frame travels to a worker once."""
    t0 = time.perf_counter()
    if moving is None:
        moving = full if settings["driver_index"] is None else full[settings["driver_index"]]
    if settings.get("engine") == "spline":
        return _spline_task(fixed, moving, settings, fixed_ready, cancel, full, t0)
    factor = settings["downsample"]
    f = fixed if fixed_ready else _downsample(_load(fixed), factor)
    m = _downsample(_load(moving), factor)
    sp, origin = settings["reg_spacing"], settings["reg_origin"]
    res = register(f, m, method=settings["method"], transform=settings["transform"],
                   fixed_spacing=sp, moving_spacing=sp, fixed_origin=origin,
                   moving_origin=origin, cancel=cancel, **settings["options"])
    info = {k: v for k, v in res.info.items()
            if k not in ("versions", "options", "method", "transform", "masks")}
    if not res.metrics:
        # a cheap quality figure per frame (the full before/after scores, SSIM and MI
        # included, cost more than a fourier registration: ask for them with score=True)
        info.update(_quick_ncc(f, m, res.transform, sp, origin))
    out = {"transform": res.transform, "metrics": _json_safe(res.metrics)}
    if full is not None:
        out["warped"] = _warp_frame(full, res.transform, settings["spacing"], settings["order"],
                                    settings["driver_index"] is not None)
    info["seconds"] = time.perf_counter() - t0
    out["info"] = _json_safe(info)
    return out


SPLINE_OPTIONS = ("window", "lowpass", "order")
POLISH = ("auto", "spline", "none")


SPLINE_MIN_SIDE = 16  # smaller frames go through register(), which checks them in detail


def _spline_engine(polish, method, transform, options, shape, spacing=None) -> bool:
    """Whether the frames go through :class:`.stack_refine.TranslationReference` (phase
    correlation against a cached reference + a spline Gauss-Newton polish) instead of
    one :func:`register` call each; ``polish="spline"`` insists and says why not."""
    if polish is None:
        polish = "none"
    if polish not in POLISH:
        raise ValueError(f"polish must be one of {list(POLISH)}; got {polish!r}")
    if polish == "none":
        return False
    why = None
    if method != "fourier" or transform not in ("translation", "rigid"):
        why = (f"it polishes translations and rotations found by method='fourier' (got "
               f"{method!r}, {transform!r})")
    elif transform == "rigid" and (len(shape) != 2 or spacing is None
                                   or not np.allclose(spacing, spacing[0], rtol=1e-9)):
        why = "its rigid polish takes 2D frames with square pixels"
    elif min(shape) < SPLINE_MIN_SIDE:
        why = (f"the frames registered are {tuple(shape)} pixels; it needs >= "
               f"{SPLINE_MIN_SIDE} per axis")
    else:
        other = sorted(k for k, v in options.items() if k not in SPLINE_OPTIONS
                       and not (k in ("score", "rgb") and not v))
        if other:
            why = (f"it takes only the options {list(SPLINE_OPTIONS)}; got {other} (these "
                   "need one register() call per frame)")
        lowpass = options.get("lowpass", 0.1)
        if lowpass is not None and (isinstance(lowpass, bool) or not isinstance(lowpass, (int, float))
                                    or not np.isfinite(lowpass) or lowpass <= 0):
            raise ValueError(f"option 'lowpass' must be a positive number (cycles per pixel) or "
                             f"None; got {lowpass!r}")
        if not isinstance(options.get("window", True), (bool, np.bool_)):
            raise ValueError(f"option 'window' must be True or False; got {options['window']!r}")
    if why is not None:
        if polish == "spline":
            raise ValueError(f"polish='spline' cannot be used here: {why}; pass polish='auto' "
                             "(or 'none')")
        return False
    return True


def _spline_reference(image, settings):
    from .stack_refine import RigidReference, TranslationReference

    opts = settings["options"]
    kind = RigidReference if settings["transform"] == "rigid" else TranslationReference
    return kind(image, window=bool(opts.get("window", True)), lowpass=opts.get("lowpass", 0.1))


def _spline_task(fixed, moving, settings, fixed_ready, cancel, full, t0) -> dict:
    """:func:`_register_task` for the spline engine: ``fixed`` is a prepared
    :class:`.stack_refine.TranslationReference` when ``fixed_ready``."""
    factor = settings["downsample"]
    ref = fixed if fixed_ready else _spline_reference(_downsample(_load(fixed), factor), settings)
    m = _downsample(_load(moving), factor)
    found, info = ref.register(m, as_cancel_check(cancel))
    if settings["transform"] == "rigid":
        if found is None:
            # beyond the polish's reach (a large turn): the global log-polar search
            out = _register_task(ref.reference, moving, {**settings, "engine": "register"}, True,
                                 cancel, full)
            out["info"]["spline_declined"] = info["stop_reason"]
            return out
        from .resample import index_to_world, world_to_index

        geo = (settings["reg_spacing"], settings["reg_origin"])
        transform = Transform(index_to_world(*geo) @ found @ world_to_index(*geo))
    else:
        transform = Transform.from_translation(found * np.asarray(settings["reg_spacing"], float))
    info = {"engine": "phase correlation + spline Gauss-Newton", **info,
            "ncc_before": ref.ncc(m)}
    out = {"transform": transform, "metrics": {}}
    if full is not None:
        out["warped"] = _warp_frame(full, transform, settings["spacing"], settings["order"],
                                    settings["driver_index"] is not None)
    info["seconds"] = time.perf_counter() - t0
    out["info"] = _json_safe(info)
    return out


def _quick_ncc(fixed, moving, transform, spacing, origin) -> dict:
    """NCC before/after on every other pixel of the fixed grid (a quarter of the cost of
    the full grid in 2D; the figure differs in the third decimal)."""
    from .metrics import ncc

    stride = 2 if min(fixed.shape) >= 64 else 1
    sub = fixed[tuple(slice(None, None, stride) for _ in fixed.shape)]
    geo = dict(output_spacing=tuple(np.asarray(spacing) * stride), input_spacing=spacing,
               output_origin=origin, input_origin=origin)
    after = resample(moving, transform, sub.shape, **geo)
    inside = resample(np.ones(moving.shape, np.uint8), transform, sub.shape, labels=True,
                      **geo).astype(bool)
    same = fixed.shape == moving.shape
    before = moving[tuple(slice(None, None, stride) for _ in moving.shape)] if same else None
    return {"ncc_before": ncc(sub, before) if same else None,
            "ncc_after": ncc(sub, after, inside) if inside.any() else None}


def _warp_frame(frame, transforms, spacing, order: int, channels: bool) -> np.ndarray:
    """Warp one frame (optionally with a leading channel axis) onto its own grid."""
    frame = _load(frame)
    transform = transforms if isinstance(transforms, Transform) else Transform(transforms)
    spatial = frame.shape[1:] if channels else frame.shape
    fast = _translation_offset(transform, spacing, order, frame.dtype)
    if fast is not None:
        return _translate_frame(frame, fast, channels)
    kw = dict(output_spacing=spacing, input_spacing=spacing, order=order)
    if channels:
        return np.stack([resample(frame[c], transform, spatial, **kw) for c in range(frame.shape[0])])
    return resample(frame, transform, spatial, **kw)


def _translation_offset(transform, spacing, order, dtype):
    """For a linear warp (order 1) by a pure translation of a float or integer frame: the
    sampling offset (input index = output index + offset) that ``resample`` would use;
    None otherwise (the general path)."""
    from .resample import index_map

    if order != 1 or not transform.is_linear or transform.is_projective:
        return None
    if not (np.dtype(dtype) in (np.float32, np.float64) or np.dtype(dtype).kind in "iu"):
        return None
    zero = np.zeros(len(spacing))
    m = index_map(transform, spacing, zero, spacing, zero)
    nd = len(spacing)
    if not np.allclose(m[:nd, :nd], np.eye(nd), rtol=0, atol=1e-12):
        return None
    return m[:nd, nd]


def _translate_frame(frame, offset, channels):
    """:func:`_warp_frame` for a pure translation, linear interpolation: the same values
    as ``resample`` (float32 arithmetic for integer frames, rounded and clipped back)."""
    from .stack_refine import translate_linear

    def one(img):
        if img.dtype in (np.float32, np.float64):
            return translate_linear(img, offset)
        out = translate_linear(img.astype(np.float32), offset)
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)

    if channels:
        return np.stack([one(frame[c]) for c in range(frame.shape[0])])
    return one(frame)


def _warp_block(block, matrices, spacing, order, channels, block_info=None):
    """dask map_blocks kernel: a block holds whole frames along axis 0."""
    start = block_info[0]["array-location"][0][0]
    out = np.empty_like(block)
    for k in range(block.shape[0]):
        out[k] = _warp_frame(block[k], matrices[start + k], spacing, order, channels)
    return out


# ------------------------------------------------------------------ parallel execution
def _client_workers(client) -> int:
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # pragma: no cover - exotic clients
        return 2


def iter_tasks(fn: Callable, items: Iterable[tuple[Any, tuple]], *, client=None,
               workers: int = 1, cancel: Callable[[], bool] | None = None,
               window: int | None = None) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run ``fn(*args)`` for each ``(key, args)`` of ``items``; yield ``(key, result,
    error)`` as tasks finish (in completion order). One failing task does not stop the
    others: its exception is yielded as ``error``.

    * ``client`` (a ``dask.distributed.Client``): tasks run on its cluster;
    * else ``workers > 1``: a local process pool of that size;
    * else in this process, in order.

    ``items`` is consumed lazily and at most ``window`` (default twice the number of
    workers) tasks are in flight, so frames of a large stack are loaded as they are
    needed. ``cancel()`` is polled; when it returns True the pending tasks are
    cancelled and :class:`RegistrationCancelled` is raised.
    """
    cancel = as_cancel_check(cancel)

    def stop_requested():
        return cancel is not None and cancel()

    items = iter(items)
    if client is None and int(workers) <= 1:
        for key, args in items:
            if stop_requested():
                raise RegistrationCancelled("cancelled")
            try:
                result = fn(*args)
            except RegistrationCancelled:
                raise
            except Exception as err:  # noqa: BLE001 - reported per item
                yield key, None, err
            else:
                yield key, result, None
        return

    pool = None
    if client is not None:
        nworkers = _client_workers(client)

        def submit(args):
            return client.submit(fn, *args, pure=False)
    else:
        nworkers = int(workers)
        pool = _new_pool(nworkers)

        def submit(args):
            nonlocal pool
            try:
                return pool.submit(fn, *args)
            except concurrent.futures.process.BrokenProcessPool:
                # a worker died (killed, out of memory): its tasks are reported as
                # failed; the rest of the run goes on in a fresh pool
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _new_pool(nworkers)
                return pool.submit(fn, *args)

    window = int(window or 2 * nworkers)
    pending: dict = {}
    exhausted = False
    # process pool: tasks lost with a dead worker are retried one at a time, alone in a
    # fresh pool, so the one that kills its worker is found and reported
    args_of: dict = {}
    suspects: collections.deque = collections.deque()
    retried: set = set()
    try:
        while True:
            if suspects and not pending:
                key = suspects.popleft()
                retried.add(key)
                pending[submit(args_of[key])] = key
            while not suspects and not exhausted and len(pending) < window:
                try:
                    key, args = next(items)
                except StopIteration:
                    exhausted = True
                    break
                pending[submit(args)] = key
                if pool is not None:
                    args_of[key] = args
            if not pending:
                return
            done = [f for f in pending if f.done()]
            if not done:
                if stop_requested():
                    raise RegistrationCancelled("cancelled")
                if pool is not None:
                    concurrent.futures.wait(list(pending), timeout=0.1,
                                            return_when=concurrent.futures.FIRST_COMPLETED)
                else:
                    import distributed

                    try:  # block without spinning (the driver may host the scheduler)
                        distributed.wait(list(pending), timeout=0.1,
                                         return_when="FIRST_COMPLETED")
                    except (TimeoutError, distributed.TimeoutError):
                        pass
                continue
            for fut in done:
                key = pending.pop(fut)
                try:
                    result = fut.result()
                except concurrent.futures.process.BrokenProcessPool:
                    # every task in flight fails with the pool; only one may have killed
                    # it: retry each alone in a fresh pool; one that dies alone is reported
                    if key not in retried:
                        suspects.append(key)
                        continue
                    args_of.pop(key, None)
                    yield key, None, RuntimeError(
                        "a worker process died while running this item (killed, or out of "
                        "memory); run it again, with fewer workers if memory is short")
                except Exception as err:  # noqa: BLE001 - reported per item
                    args_of.pop(key, None)
                    yield key, None, err
                else:
                    args_of.pop(key, None)
                    yield key, result, None
            if stop_requested():
                raise RegistrationCancelled("cancelled")
    finally:
        for fut in pending:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _watch_parent(parent_pid: int, period: float = 0.2) -> None:
    """Process-pool initializer: a daemon thread ends this worker as soon as its parent
    is gone (killed, crashed), so orphans never go on computing and writing."""
    import os
    import threading

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(period)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    try:  # Linux: also ask the kernel to kill this worker with its parent
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(70)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _main_reimport_unsafe() -> bool:
    """True when worker processes would re-run the user's script: spawn imports the
    ``__main__`` file in every worker, and a script without an
    ``if __name__ == "__main__":`` guard would start the whole run again there."""
    import re
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if not path or (spec is not None and spec.name.split(".")[-1] == "__main__"):
        return False  # interactive, -c, a package's __main__: spawn does not re-run it
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            source = fh.read()
    except OSError:
        return False
    return not re.search(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", source, re.M)


def _new_pool(nworkers: int):
    """A process pool whose workers die with this process; threads (with a warning)
    when the main script cannot be re-imported safely by worker processes."""
    import multiprocessing
    import os
    import warnings

    if _main_reimport_unsafe():
        warnings.warn(
            f"workers={nworkers}: the main script has no 'if __name__ == \"__main__\":' guard, "
            "so worker processes would run it again; using threads instead. Put the code "
            "that calls napari-registration under that guard to use processes.",
            RuntimeWarning, stacklevel=4)
        return concurrent.futures.ThreadPoolExecutor(max_workers=nworkers)
    # spawn: safe with threads (Qt, dask) in the parent, same on every OS
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=nworkers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_watch_parent, initargs=(os.getpid(),))


# ------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class StackResult:
    """The outcome of :func:`register_stack`.

    Attributes
    ----------
    warped : ndarray, dask array or None
        The aligned stack, same shape and dtype as the input (a lazy dask array when
        the input was one: compute it, or write it with :func:`write_tiff_stack`).
    transforms : tuple of Transform
        ``transforms[i]`` maps frame ``i``'s world coordinates to the reference
        frame's world coordinates (one frame's napari axis order, world = index *
        spacing).
    info : dict
        Stack settings (``reference``, ``method``, ``transform``, ``downsample``, ...),
        ``seconds``, and ``frames``: one dict per frame with the frame it was registered
        to, ``metrics`` (before/after, on the registration copy), the method's
        diagnostics, and ``error`` when ``on_error="identity"`` kept a failed frame.
    """

    warped: Any
    transforms: tuple
    info: dict
    shape: tuple
    axis: int
    spacing: tuple
    channel_axis: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def drift(self) -> np.ndarray:
        """(N, D) world displacement of the content in each frame relative to the
        reference: where the reference frame's centre is found in frame ``i``, minus
        the centre (for a translation this is minus the correcting shift)."""
        centre = (np.asarray(self.frame_shape, float) - 1) / 2 * np.asarray(self.spacing)
        return np.array([t.apply_inverse(centre[None])[0] - centre for t in self.transforms])

    @property
    def frame_shape(self) -> tuple:
        drop = {self.axis} | ({self.channel_axis} if self.channel_axis is not None else set())
        return tuple(n for k, n in enumerate(self.shape) if k not in drop)

    def to_dict(self) -> dict:
        """JSON-safe: every transform, the drift, settings and per-frame info."""
        return {
            "type": "napari-registration stack result",
            "convention": "transforms[i] maps frame i world -> reference world; "
                          "napari axis order of one frame; world = index*spacing",
            "shape": list(self.shape),
            "axis": self.axis,
            "channel_axis": self.channel_axis,
            "spacing": list(self.spacing),
            "transforms": [t.to_dict() for t in self.transforms],
            "drift": self.drift.tolist(),
            "info": _json_safe(self.info),
        }


# ---------------------------------------------------------------------------- validation
def _normalise_axis(axis, ndim, name) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"{name} must be an integer axis index; got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a {ndim}D stack")
    return int(axis) % ndim


def _as_stack(frames):
    if frames is None:
        raise ValueError("frames is None: pass a numpy or dask array with a time (or z) axis")
    if _is_dask(frames):
        return frames
    if isinstance(frames, (list, tuple)):
        shapes = {np.shape(f) for f in frames}
        if len(shapes) > 1:
            raise ValueError(f"the frames have different shapes {sorted(shapes)}; crop or pad "
                             "them to one shape (or register them pairwise with register())")
        frames = np.stack([np.asarray(f) for f in frames])
    a = np.asarray(frames)
    if a.dtype == object or a.dtype.kind in "USVc":
        raise ValueError(f"frames have dtype {a.dtype}; pass a real numeric array")
    return a


def _spatial_spacing(spacing, ndim_total, drop, ndim_spatial):
    if spacing is None:
        return (1.0,) * ndim_spatial
    try:
        sp = [float(v) for v in np.ravel(spacing)]
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be numbers (one per spatial axis, napari order); got "
                         f"{spacing!r}") from None
    if len(sp) == ndim_total and ndim_total != ndim_spatial:  # napari layer.scale
        sp = [v for k, v in enumerate(sp) if k not in drop]
    if len(sp) == 1:
        sp = sp * ndim_spatial
    if len(sp) != ndim_spatial or any(not np.isfinite(v) or v <= 0 for v in sp):
        raise ValueError(f"spacing must give {ndim_spatial} positive values (one per spatial "
                         f"axis, napari order) or one per array axis; got {list(np.ravel(spacing))}")
    return tuple(sp)


def _factor(downsample, ndim_spatial):
    f = np.ravel(downsample if downsample is not None else 1)
    if f.size == 1:
        f = np.repeat(f, ndim_spatial)
    if f.size != ndim_spatial or any(int(v) != v or v < 1 for v in f):
        raise ValueError(f"downsample must be a whole number >= 1 (or one per spatial axis); "
                         f"got {downsample!r}")
    return tuple(int(v) for v in f)


# ----------------------------------------------------------------------------- the work
def iter_register_stack(frames, *, axis: int = 0, reference="first", method: str = "fourier",
                        transform: str = "translation", spacing=None,
                        cancel: Callable[[], bool] | None = None, channel_axis: int | None = None,
                        driver_channel: int = 0, downsample=1, coarse=None, client=None,
                        workers: int = 1, on_error: str = "raise", warp: bool = True,
                        known: dict | None = None, polish: str = "auto", **options):
    """Generator form of :func:`register_stack`: yields one ``dict`` event per step
    (``phase`` "reference" | "register" | "warp", ``frame``, ``done``, ``total``,
    ``fraction``, ``message``) and returns the :class:`StackResult` (the value of
    ``StopIteration``; napari's ``thread_worker`` passes it to ``returned``).

    ``known`` resumes an interrupted run: ``{frame: (step, info)}`` from the
    "register" events of an earlier run with the same settings (``step`` is the
    event's ``transform``); those frames are not registered again."""
    t0 = time.perf_counter()
    known = dict(known or {})
    cancel = as_cancel_check(cancel)
    data = _as_stack(frames)
    lazy = _is_dask(data)
    ndim_total = data.ndim
    axis = _normalise_axis(axis, ndim_total, "axis")
    drop = {axis}
    if channel_axis is not None:
        channel_axis = _normalise_axis(channel_axis, ndim_total, "channel_axis")
        if channel_axis == axis:
            raise ValueError(f"channel_axis and axis are both {axis}: the frames and the "
                             "channels must be different axes")
        drop.add(channel_axis)
    ndim_spatial = ndim_total - len(drop)
    if ndim_spatial < 2:
        raise ValueError(f"a stack of shape {tuple(data.shape)} with axis={axis}"
                         f"{'' if channel_axis is None else f', channel_axis={channel_axis}'} leaves "
                         f"{ndim_spatial}D frames; frames must be 2D or 3D (pass the right axis)")
    if on_error not in ("raise", "identity"):
        raise ValueError(f"on_error must be 'raise' or 'identity'; got {on_error!r}")
    sp = _spatial_spacing(spacing, ndim_total, drop, ndim_spatial)
    factor = _factor(downsample, ndim_spatial)

    # normalised layout: (frame, [channel,] *spatial)
    move = np if not lazy else __import__("dask.array", fromlist=["moveaxis"])
    src = [axis] + ([channel_axis] if channel_axis is not None else [])
    work = move.moveaxis(data, src, list(range(len(src))))
    n = int(work.shape[0])
    if n < 1:
        raise ValueError(f"the stack has no frames along axis {axis}")
    if channel_axis is not None:
        nch = int(work.shape[1])
        if not -nch <= int(driver_channel) < nch:
            raise ValueError(f"driver_channel={driver_channel} but the stack has {nch} channels")
        driver = work[:, int(driver_channel) % nch]
    else:
        driver = work
    frame_shape = tuple(int(s) for s in driver.shape[1:])
    reduced = tuple(n // f for n, f in zip(frame_shape, factor))
    if max(factor) > 1 and min(reduced) < 4:
        raise ValueError(f"downsample={list(factor)} leaves frames of {reduced} pixels from "
                         f"{frame_shape}; registration needs >= 4 per axis: use a smaller factor")

    # what is registered: the driver frames, or those of a coarser copy (pyramid level)
    reg_driver, reg_sp, reg_or = driver, np.asarray(sp, float), np.zeros(ndim_spatial)
    if coarse is not None:
        cdata = _as_stack(coarse)
        if cdata.ndim != ndim_total:
            raise ValueError(f"coarse must have the stack's {ndim_total} axes; got shape "
                             f"{tuple(cdata.shape)}")
        cwork = (move.moveaxis(cdata, src, list(range(len(src)))) if _is_dask(cdata)
                 else np.moveaxis(cdata, src, list(range(len(src)))))
        if cwork.shape[: len(src)] != work.shape[: len(src)]:
            raise ValueError("coarse must have as many frames (and channels) as the stack; "
                             f"got shape {tuple(cdata.shape)} for {tuple(data.shape)}")
        reg_driver = cwork[:, int(driver_channel) % int(work.shape[1])] if channel_axis is not None else cwork
        cshape = np.array(reg_driver.shape[1:], float)
        if np.any(cshape > np.array(frame_shape)):
            raise ValueError(f"coarse frames {tuple(int(v) for v in cshape)} are larger than "
                             f"the stack's frames {frame_shape}")
        ratio = np.array(frame_shape, float) / cshape
        # coarse pixel k covers full pixels k*r .. k*r + r - 1: its centre in the full world
        reg_sp, reg_or = reg_sp * ratio, reg_sp * (ratio - 1) / 2
    reg_or = reg_or + reg_sp * (np.asarray(factor, float) - 1) / 2
    reg_sp = reg_sp * np.asarray(factor, float)

    # per-frame register options: the core warps once at the end, at full resolution
    reg_options = dict(options)
    reg_options.setdefault("rgb", False)
    reg_options.setdefault("score", False)
    reg_options["warp"] = False
    order = int(options.get("order", 1))
    settings = {"method": method, "transform": transform, "spacing": sp,
                "downsample": factor, "options": reg_options, "order": order,
                "reg_spacing": tuple(reg_sp), "reg_origin": tuple(reg_or),
                "driver_index": (int(driver_channel) % int(work.shape[1])
                                 if channel_axis is not None else None)}
    spline = _spline_engine(polish, method, transform, options,
                            [s // f for s, f in zip(reg_driver.shape[1:], factor)], reg_sp)
    settings["engine"] = "spline" if spline else "register"

    # the reference
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {list(REFERENCES)}, a frame index or "
                             f"an image; got {reference!r}")
        ref_mode = 0 if reference == "first" else reference
    elif isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        if not -n <= int(reference) < n:
            raise ValueError(f"reference frame {reference} is out of range: the stack has {n} frames")
        ref_mode = int(reference) % n
    else:
        ref_arr = np.asarray(reference)
        if coarse is not None:
            raise ValueError("a reference image cannot be combined with coarse=: pass a frame "
                             "index as the reference, or downsample= instead of coarse=")
        if ref_arr.shape != frame_shape:
            raise ValueError(f"a reference image must have one frame's shape {frame_shape}; "
                             f"got {ref_arr.shape}")
        ref_mode = "image"

    def check_cancel():
        if cancel is not None and cancel():
            raise RegistrationCancelled("stack registration cancelled")

    serial = client is None and int(workers) <= 1
    extra = (cancel,) if serial else ()

    def frame_of(i):
        # slices of a dask stack are computed here (sync) before they are sent
        return _load(reg_driver[i])

    def share(ref):
        if spline:  # the reference's spectrum, spline gradients, ...: once per stack
            ref = _spline_reference(ref, settings)
        return client.scatter(ref, broadcast=True) if client is not None else ref

    # numpy frames whose transform is final after one registration are warped in the
    # same task (one trip to a worker per frame); "previous" chains first, warps after
    warp_in_task = warp and not lazy and ref_mode != "previous" and not known
    out_work = np.empty(work.shape, dtype=work.dtype) if (warp and not lazy) else None

    def items(ref_arg, mode, with_warp=False, skip=()):
        for i in range(n):
            if i in skip:
                continue
            if mode == "previous":
                if i == 0:
                    continue
                yield i, (frame_of(i - 1), frame_of(i), settings, False, *extra)
            elif isinstance(mode, int) and i == mode:
                continue
            elif with_warp:
                yield i, (ref_arg, None if coarse is None else frame_of(i), settings, True,
                          cancel if serial else None, np.asarray(work[i]))
            else:
                yield i, (ref_arg, frame_of(i), settings, True, *extra)

    ident = Transform.identity(ndim_spatial)
    reg_share = 0.85 if (warp and not lazy and not warp_in_task) else 1.0
    frame_info: list[dict] = [{"frame": i} for i in range(n)]
    failed = [0]

    def run_pass(ref_arg, mode, phase, f0, f1, with_warp=False):
        """Register every frame to ``ref_arg`` (or its predecessor); yields events,
        fills ``steps`` (and ``out_work`` with_warp)."""
        total = n - (1 if (mode == "previous" or isinstance(mode, int)) else 0)
        done = 0
        skip = set(known) if phase == "register" else set()
        for i in sorted(skip):  # resumed: found by an earlier run with the same settings
            steps[i], info_i = known[i]
            frame_info[i].update(info_i or {})
            done += 1
        for i, out, err in iter_tasks(_register_task, items(ref_arg, mode, with_warp, skip),
                                      client=client, workers=workers, cancel=cancel):
            done += 1
            if err is not None:
                if isinstance(err, RegistrationCancelled):
                    raise err
                if on_error == "raise":
                    if isinstance(err, (ValueError, RegistrationError)):
                        raise type(err)(f"frame {i}: {err}") from err
                    raise err
                failed[0] += 1
                steps[i] = ident
                if with_warp:
                    out_work[i] = work[i]
                frame_info[i].update(error=f"{type(err).__name__}: {err}")
                message = f"frame {i}: failed ({err}); kept in place"
            else:
                steps[i] = out["transform"]
                if with_warp:
                    out_work[i] = out["warped"]
                frame_info[i].update(out["info"])
                if out["metrics"]:
                    frame_info[i]["metrics"] = out["metrics"]
                message = f"{phase}: frame {i} ({done}/{total})"
            yield {"phase": phase, "frame": i, "done": done, "total": total,
                   "fraction": f0 + (f1 - f0) * done / max(total, 1), "message": message,
                   "transform": steps[i], "info": frame_info[i]}

    steps: dict[int, Transform] = {}
    if ref_mode == "mean":
        # the mean of a drifting stack is blurred: register to the middle frame first,
        # then to the mean of those aligned (coarse) frames
        mid = n // 2
        yield from run_pass(share(_downsample(frame_of(mid), factor)), mid, "reference",
                            0.0, 0.4 * reg_share)
        geo = dict(output_spacing=tuple(reg_sp), input_spacing=tuple(reg_sp),
                   output_origin=tuple(reg_or), input_origin=tuple(reg_or))
        total_img = None
        for i in range(n):
            check_cancel()
            small = _downsample(frame_of(i), factor)
            t = steps.get(i, ident)
            img = resample(small, t, small.shape, **geo)
            wgt = resample(np.ones(small.shape, np.float32), t, small.shape, **geo)
            if total_img is None:
                total_img, total_w = img.astype(np.float64), wgt.astype(np.float64)
            else:
                total_img += img
                total_w += wgt
        mean = (total_img / np.maximum(total_w, 1e-6)).astype(np.float32)
        mean[total_w < 0.5] = float(mean[total_w >= 0.5].mean()) if np.any(total_w >= 0.5) else 0.0
        steps = {}
        yield from run_pass(share(mean), "mean", "register", 0.4 * reg_share, reg_share,
                            warp_in_task)
    elif ref_mode == "previous":
        yield from run_pass(None, "previous", "register", 0.0, reg_share)
    else:
        if ref_mode == "image":
            ref = _downsample(ref_arr, factor)
        else:
            ref = _downsample(frame_of(ref_mode), factor)
        check_cancel()
        yield from run_pass(share(ref), ref_mode if ref_mode != "image" else "image",
                            "register", 0.0, reg_share, warp_in_task)
        if warp_in_task and isinstance(ref_mode, int):
            out_work[ref_mode] = work[ref_mode]
    for i in range(n):
        frame_info[i]["registered_to"] = (
            (i - 1 if i > 0 else None) if ref_mode == "previous" else
            None if (isinstance(ref_mode, int) and i == ref_mode) else ref_mode)

    # transforms to the reference
    if ref_mode == "previous":
        transforms = [ident]
        for i in range(1, n):
            transforms.append(steps[i].then(transforms[-1]))
    else:
        transforms = [steps.get(i, ident) for i in range(n)]

    warped = None
    if warp:
        if lazy:
            matrices = [t if not t.is_linear else t.matrix for t in transforms]
            nd = work.ndim
            blocks = work.rechunk({k: -1 for k in range(1, nd)})
            warped_work = blocks.map_blocks(_warp_block, matrices, sp, order,
                                            channel_axis is not None, dtype=work.dtype)
            warped = move.moveaxis(warped_work, list(range(len(src))), src)
        elif warp_in_task:
            warped = np.moveaxis(out_work, list(range(len(src))), src)
        else:
            channels = channel_axis is not None

            def warp_items():
                for i in range(n):
                    yield i, (np.asarray(work[i]), transforms[i], sp, order, channels)

            wdone = 0
            for i, frame_out, err in iter_tasks(_warp_frame, warp_items(), client=client,
                                                workers=workers, cancel=cancel):
                if err is not None:
                    raise err
                out_work[i] = frame_out
                wdone += 1
                yield {"phase": "warp", "frame": i, "done": wdone, "total": n,
                       "fraction": reg_share + (1 - reg_share) * wdone / n,
                       "message": f"warped frame {i} ({wdone}/{n})"}
            warped = np.moveaxis(out_work, list(range(len(src))), src)

    info = {
        "reference": reference if isinstance(reference, (str, int, np.integer)) else "image",
        "method": method,
        "transform": transform,
        "options": {k: v for k, v in options.items() if not isinstance(v, np.ndarray)},
        "downsample": list(factor),
        "coarse_shape": None if coarse is None else list(reg_driver.shape[1:]),
        "registration_spacing": [float(v) for v in reg_sp],
        "driver_channel": int(driver_channel) if channel_axis is not None else None,
        "frames": frame_info,
        "failed": failed[0],
        "scheduler": ("dask.distributed" if client is not None else
                      "serial" if int(workers) <= 1 else
                      f"threads ({int(workers)}; no __main__ guard)" if _main_reimport_unsafe()
                      else f"process pool ({int(workers)})"),
        "lazy": lazy,
        "polish": "spline" if spline else "none",
        "seconds": time.perf_counter() - t0,
    }
    return StackResult(warped=warped, transforms=tuple(transforms), info=info,
                       shape=tuple(int(s) for s in data.shape), axis=axis, spacing=sp,
                       channel_axis=channel_axis)


def register_stack(frames, *, axis: int = 0, reference="first", method: str = "fourier",
                   transform: str = "translation", spacing=None,
                   progress: Callable[[float, str], None] | None = None,
                   cancel: Callable[[], bool] | None = None, channel_axis: int | None = None,
                   driver_channel: int = 0, downsample=1, coarse=None, client=None,
                   workers: int = 1, on_error: str = "raise", warp: bool = True,
                   known: dict | None = None, polish: str = "auto", **options) -> StackResult:
    """Align every frame of a stack (2D+t or 3D+t, optionally with channels) to a
    reference.

    Parameters
    ----------
    frames : array_like
        numpy or dask array; ``axis`` indexes the frames. A dask stack is registered
        frame by frame and warped lazily (``result.warped`` is a dask array), so a stack
        larger than memory can be written with :func:`write_tiff_stack`.
    axis : int
        The frame (time or z) axis.
    reference : "first" | "previous" | "mean" | int | array
        What each frame is registered to: frame 0, the frame before (steps chained, so
        every transform still maps to frame 0), the mean frame, a frame index, or an
        image of one frame's shape.
    method, transform, **options
        As for :func:`~napari_registration.register` (any installed method).
    spacing : sequence of float
        Pixel size of one frame (napari order), or one value per array axis (napari
        ``layer.scale``; the frame and channel entries are dropped).
    progress : callable(fraction, message), optional
        Called after every frame.
    cancel : callable() -> bool, optional
        Polled between (and, in-process, within) frames; True stops with
        :class:`RegistrationCancelled`.
    channel_axis, driver_channel : int
        With a channel axis, channel ``driver_channel`` is registered and the same
        transforms are applied to every channel.
    downsample : int or sequence of int
        Register on a block-mean copy reduced by this factor per spatial axis and warp
        at full resolution (the coarse copy's spacing and origin make its transforms
        full-resolution world transforms).
    coarse : array_like, optional
        A lower-resolution copy of the same stack (e.g. a level of a napari multiscale
        pyramid: same axes, frames and channels, smaller frames) to register instead of
        ``frames``; its pixel size is taken as the shape ratio and its pixels as centred
        on the blocks they summarise. The warp is still done on ``frames``.
    client : dask.distributed.Client, optional
        Run frames as tasks on this cluster.
    workers : int
        Without a client, ``workers > 1`` runs frames in a local process pool.
    on_error : "raise" | "identity"
        What to do when one frame cannot be registered: stop, or keep that step as the
        identity and record the error in ``info["frames"][i]["error"]``.
    warp : bool
        Compute ``result.warped`` (False: transforms only).
    polish : "auto" | "spline" | "none"
        "auto" (default): with ``method="fourier"``, ``transform="translation"`` and no
        options other than ``window``, ``lowpass`` and ``order``, every frame is
        phase-correlated against a reference spectrum computed once, then polished by
        Gauss-Newton on cubic splines (least squares up to a gain and offset), which is
        both faster and ~20x more precise than one ``register()`` per frame
        (``docs/benchmarks.md``); otherwise one ``register()`` per frame. "spline":
        insist (``ValueError`` saying why when it does not apply). "none": always one
        ``register()`` per frame.

    Returns
    -------
    StackResult
        ``warped`` (same shape as ``frames``), ``transforms`` (frame i world ->
        reference world), ``info``, ``drift``, ``to_dict()``.
    """
    gen = iter_register_stack(
        frames, axis=axis, reference=reference, method=method, transform=transform,
        spacing=spacing, cancel=cancel, channel_axis=channel_axis,
        driver_channel=driver_channel, downsample=downsample, coarse=coarse, client=client,
        workers=workers,
        on_error=on_error, warp=warp, known=known, polish=polish, **options)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(float(event["fraction"]), str(event["message"]))


# ------------------------------------------------------------------------------- output
def write_tiff_stack(path, stack, *, frames_per_batch: int = 4,
                     progress: Callable[[float, str], None] | None = None):
    """Write a (numpy or dask) stack to one TIFF with the stack's shape, computing and
    holding only ``frames_per_batch`` slices along the first axis at a time (dask
    batches use the current scheduler, e.g. a distributed client). BigTIFF is used
    above 2 GB. Read it back with ``tifffile.imread`` (or ``tifffile.memmap``)."""
    import tifffile

    shape = tuple(int(s) for s in stack.shape)
    dtype = np.dtype(stack.dtype)
    n = shape[0]
    nbytes = int(np.prod(shape)) * dtype.itemsize
    page_shape = shape[-2:]
    step = max(1, int(frames_per_batch))

    def pages():
        for start in range(0, n, step):
            stop = min(start + step, n)
            block = stack[start:stop]
            block = np.asarray(block.compute()) if _is_dask(block) else np.asarray(block)
            yield from block.reshape((-1,) + page_shape)
            if progress is not None:
                progress(stop / n, f"wrote {stop}/{n}")

    tifffile.imwrite(path, pages(), shape=shape, dtype=dtype, bigtiff=nbytes > 2 ** 31,
                     photometric="minisblack")
    return path
