"""``method="auto"``: try the installed methods in a sensible order, score every
candidate on the images, keep the best.

Stages (each one optional, each one recorded in ``info["stages"]``):

1. **coarse**: global methods that need no starting point.
   ``fourier`` translation (any dimension) and, in 2D, ``fourier`` similarity/rigid
   (log-polar: any rotation, scale up to ~2x); each on the intensities and on the
   gradient magnitude (edges survive contrast inversion and monotonic remapping, so
   this copes with multi-modal pairs where phase correlation of the raw intensities
   locks onto the wrong peak). ``features`` (OpenCV keypoints, 2D) when installed.
2. **refine**: ``intensity`` (SimpleITK) started from the best coarse candidate, with
   the requested transform model, when installed.

Every candidate is scored by mutual information (``metric="mi"``, robust across
modalities) or normalised cross-correlation (``metric="ncc"``, same modality) on the
overlap of the fixed image and the warped moving image (``core.metrics``), against the
unaligned images as a baseline. A stage that fails (``RegistrationError`` /
``ValueError``) is recorded with its message and the next one runs.
"""

from __future__ import annotations

from typing import Literal

import time

import numpy as np

from ..core.register import (BackendResult, RegistrationCancelled, RegistrationError,
                             available_methods, method_info)
from ..core.transform import Transform

DESCRIPTION = ("Automatic: coarse global search (Fourier, features) then intensity refinement, "
               "every stage scored, best kept")
NDIMS = (2, 3)


def _transforms():
    names = ["translation", "rigid", "similarity", "affine"]
    import importlib.util

    if importlib.util.find_spec("napari_registration.backends.features") is not None:
        names.append("homography")
    return tuple(names)


TRANSFORMS = _transforms()

# transform the coarse 2D Fourier stage estimates, per requested model
_COARSE_2D = {"translation": "translation", "rigid": "rigid", "similarity": "similarity",
              "affine": "similarity", "homography": "similarity"}


def _structure(image: np.ndarray, spacing) -> np.ndarray:
    """Gradient magnitude (Gaussian, 1.5 px): a modality-robust view of the image."""
    from scipy import ndimage

    return ndimage.gaussian_gradient_magnitude(np.asarray(image, np.float32), 1.5).astype(np.float32)


def _shrink(image, spacing, max_side):
    """A smoothed, downsampled copy and its spacing, covering the same world: with
    ``ndimage.zoom`` small index i sits at big index i * (n - 1) / (m - 1)."""
    from scipy import ndimage

    image = np.asarray(image, np.float32)
    factor = max(image.shape) / float(max_side)
    if factor <= 1.0:
        return image, tuple(spacing)
    small = ndimage.zoom(ndimage.gaussian_filter(image, 0.5 * factor), 1.0 / factor, order=1)
    ratio = (np.array(image.shape) - 1) / np.maximum(np.array(small.shape) - 1, 1)
    return small.astype(np.float32), tuple(float(s) for s in np.asarray(spacing) * ratio)


def _score(fixed, moving, transform, f_sp, m_sp, fixed_mask) -> dict:
    from ..core.metrics import compare
    from ..core.resample import overlap_mask, resample

    geometry = dict(output_spacing=f_sp, input_spacing=m_sp)
    warped = resample(moving, transform, fixed.shape, **geometry)
    mask = overlap_mask(moving.shape, transform, fixed.shape, **geometry)
    if fixed_mask is not None:
        mask &= fixed_mask
    if mask.sum() < 64:
        return {"ncc": float("nan"), "mi": float("nan"), "overlap": float(mask.mean())}
    out = compare(fixed, warped, mask, with_ssim=False)
    return {"ncc": out["ncc"], "mi": out["mi"], "overlap": out["overlap"]}


def register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress, cancel,
             fixed_mask=None, moving_mask=None, metric: Literal["mi", "ncc"] = "mi", structure: bool = True,
             use_features: bool = True, refine: bool = True, coarse_size: int = 256,
             stop_ncc: float | None = 0.95, min_overlap: float = 0.1,
             seed: int | None = None) -> BackendResult:
    """Chain and score methods; return the best-scoring transform.

    Options
    -------
    metric : "mi" or "ncc"
        How candidates are ranked: mutual information (any modality) or normalised
        cross-correlation (same modality, higher is better).
    structure : bool
        Also run the coarse Fourier stages on gradient magnitudes (multi-modal pairs).
    use_features : bool
        Include ``features`` (OpenCV keypoints) as a coarse stage when installed (2D).
    refine : bool
        Polish the best coarse candidate with ``intensity`` when installed.
    coarse_size : int
        The Fourier stages run on copies downsampled to at most this many pixels per
        axis (same world coordinates); 0 keeps full resolution.
    stop_ncc : float or None
        Skip the (slow) log-polar stages once a candidate reaches this absolute
        normalised cross-correlation on the overlap (clearly aligned; the absolute value
        also accepts contrast-inverted pairs). None runs every stage.
    min_overlap : float
        Candidates whose overlap covers less than this fraction of the fixed image are
        discarded (a tiny overlap can score deceptively well).
    seed : int or None
        Seed of the ``intensity`` refinement's random metric sampling: with a seed the
        same inputs give the identical transform (``features`` is always seeded); None
        leaves it unseeded (faster: SimpleITK then uses every thread).
    """
    from ..core.register import register as core_register

    if metric not in ("mi", "ncc"):
        raise ValueError(f"metric must be 'mi' (mutual information, any modality) or 'ncc' "
                         f"(normalised cross-correlation, same modality); got {metric!r}")
    if int(coarse_size) < 0 or 0 < int(coarse_size) < 32:
        raise ValueError(f"coarse_size must be 0 (full resolution) or >= 32 pixels; got {coarse_size}")
    if stop_ncc is not None and not 0.0 < float(stop_ncc) <= 1.0:
        raise ValueError(f"stop_ncc must be in (0, 1] or None (run every stage); got {stop_ncc}")
    if not 0.0 <= float(min_overlap) < 1.0:
        raise ValueError(f"min_overlap must be a fraction in [0, 1); got {min_overlap}")
    ndim = fixed.ndim
    f_sp, m_sp = tuple(fixed_spacing), tuple(moving_spacing)
    methods = [m for m in available_methods() if m not in ("auto", "landmarks")]
    stages: list[dict] = []
    candidates: list[tuple[float, int, Transform]] = []  # (score, stage index, transform)

    def check_cancel():
        if cancel():
            raise RegistrationCancelled("registration cancelled")

    def supports(method, model):
        if method not in methods:
            return False
        info = method_info(method)
        return model in info["transforms"] and (info["ndims"] is None or ndim in info["ndims"])

    def record(entry, tf):
        stages.append(entry)
        if tf is None:
            return
        sc = _score(fixed, moving, tf, f_sp, m_sp, fixed_mask)
        entry.update(score=sc)
        value = sc[metric]
        if not np.isfinite(value):
            entry["rejected"] = "no overlap with the fixed image"
        elif sc["overlap"] < min_overlap:
            entry["rejected"] = (f"overlap {sc['overlap']:.2f} < min_overlap {min_overlap}")
        else:
            candidates.append((float(value), len(stages) - 1, tf))

    def run(method, model, why, *, rep="intensities", fraction=(0.0, 1.0), shrink=False, **opts):
        check_cancel()
        f_img, m_img = fixed, moving
        fs, ms, f_msk, m_msk = f_sp, m_sp, fixed_mask, moving_mask
        if shrink and coarse_size:
            f_img, fs = _shrink(fixed, f_sp, coarse_size)
            m_img, ms = _shrink(moving, m_sp, coarse_size)
            if f_img.shape != fixed.shape or m_img.shape != moving.shape:
                why = why + f"; on a copy of at most {int(coarse_size)} px per axis"
                f_msk = None if fixed_mask is None else _shrink(fixed_mask, f_sp, coarse_size)[0] > 0.5
                m_msk = None if moving_mask is None else _shrink(moving_mask, m_sp, coarse_size)[0] > 0.5
        if rep == "gradient magnitude":
            f_img, m_img = _structure(f_img, fs), _structure(m_img, ms)
        lo, hi = fraction

        def sub_progress(frac, message):
            progress(lo + (hi - lo) * frac, f"{method} {model}: {message}")

        entry = {"method": method, "model": model, "on": rep, "why": why, "transform": None,
                 "score": None, "seconds": None, "error": None}
        t0 = time.perf_counter()
        tf = None
        try:
            res = core_register(f_img, m_img, method=method, transform=model,
                                fixed_spacing=fs, moving_spacing=ms,
                                normalize=rep != "intensities", warp=False, score=False,
                                fixed_mask=f_msk, moving_mask=m_msk,
                                progress=sub_progress, cancel=cancel, **opts)
            tf = res.transform
            entry["transform"] = tf
            for key in ("stop_reason", "iterations", "inliers", "angle_deg", "scale", "peak"):
                if key in res.info:
                    entry[key] = res.info[key]
        except RegistrationCancelled:
            raise
        except (RegistrationError, ValueError, RuntimeError, np.linalg.LinAlgError) as err:
            entry["error"] = f"{type(err).__name__}: {err}"
        entry["seconds"] = time.perf_counter() - t0
        record(entry, tf)
        return tf

    # ---- baseline: the images as they are
    identity = Transform.identity(ndim)
    record({"method": "none", "model": "identity", "on": "intensities",
            "why": "baseline: the unaligned images", "transform": identity, "score": None,
            "seconds": 0.0, "error": None}, identity)
    baseline_index = len(stages) - 1

    # ---- coarse, global stages
    reps = ["intensities"] + (["gradient magnitude"] if structure else [])
    # cheap and global first; log-polar (the slow one) last, skipped when not needed
    coarse = []
    if "fourier" in methods:
        coarse += [("fourier", "translation", rep,
                    "phase correlation: any shift, fast" +
                    ("" if rep == "intensities" else "; edges survive contrast changes"))
                   for rep in reps]
    if use_features and ndim == 2 and transform != "translation":
        f_model = transform if supports("features", transform) else "similarity"
        if supports("features", f_model):
            coarse.append(("features", f_model, "intensities",
                           "keypoint matching: large motion, perspective, partial overlap"))
    if "fourier" in methods and ndim == 2 and transform != "translation":
        model = _COARSE_2D[transform]
        coarse += [("fourier", model, rep,
                    "log-polar: any rotation and large scale changes" +
                    ("" if rep == "intensities" else "; edges survive contrast changes"))
                   for rep in reps]
    n_refine = 1 if (refine and supports("intensity", _refine_model(transform))) else 0
    n_total = max(1, len(coarse) + 2 * n_refine)
    skipped = []

    def clearly_aligned():
        # a candidate that refinement can start from (linear), or any when none follows
        for _, idx, tf in candidates:
            if idx == baseline_index or (n_refine and (not tf.is_linear or tf.is_projective)):
                continue
            if abs(stages[idx]["score"]["ncc"]) >= stop_ncc:
                return stages[idx]
        return None

    for k, (method, model, rep, why) in enumerate(coarse):
        expensive = method == "fourier" and model != "translation"  # log-polar
        done = clearly_aligned() if (stop_ncc is not None and expensive) else None
        if done is not None:
            skipped.append({"method": method, "model": model, "on": rep,
                            "why": f"skipped: {done['method']} {done['model']} ({done['on']}) "
                                   f"already reached |NCC| {abs(done['score']['ncc']):.3f} >= "
                                   f"stop_ncc {stop_ncc}"})
            continue
        run(method, model, why, rep=rep, fraction=(k / n_total, (k + 1) / n_total),
            shrink=method == "fourier")

    # ---- refinement from the best coarse candidate
    advice = []
    if n_refine:
        # intensity starts from a linear, non-projective transform
        starts = [c for c in candidates if c[2].is_linear and not c[2].is_projective]
        best = max(starts, key=lambda c: c[0]) if starts else (0.0, baseline_index, identity)
        start = best[2]
        refine_model = _refine_model(transform)
        opts = {"init": start} if "init" in method_info("intensity")["options"] else {}
        if seed is not None and "seed" in method_info("intensity")["options"]:
            opts["seed"] = int(seed)
        why = (f"intensity {refine_model} refinement from the best coarse stage "
               f"({stages[best[1]]['method']} {stages[best[1]]['model']} on {stages[best[1]]['on']})")
        k = len(coarse)
        mi_opts, uses_mi = _mi_metric_option(metric)
        tf = None
        if mi_opts:  # prefer an MI metric so multi-modal pairs refine too
            tf = run("intensity", refine_model, why + ", mutual information",
                     fraction=(k / n_total, (k + 1) / n_total), **opts, **mi_opts)
        if tf is None and (not mi_opts or "metric" in (stages[-1]["error"] or "")):
            run("intensity", refine_model, why + (", mutual information" if uses_mi else ""),
                fraction=((k + 1) / n_total, 1.0), **opts)

    progress(1.0, "scoring done")
    errors = [f"{s['method']} {s['model']} ({s['on']}): {s['error']}" for s in stages if s["error"]]
    if not [c for c in candidates if c[1] != baseline_index]:  # nothing but the baseline
        raise RegistrationError(
            "auto: no method produced an alignment. "
            + ("Stage errors: " + "; ".join(errors) + ". " if errors else "")
            + "Try landmarks (method='landmarks' with a few point pairs) or crop both images "
              "to the shared region, then run again."
        )
    best_score, best_index, best_tf = max(candidates, key=lambda c: c[0])
    baseline = stages[baseline_index]["score"][metric]
    if best_index == baseline_index:
        advice.append("no stage scored better than the unaligned images: they may already be "
                      "aligned, or share too little structure (try method='landmarks')")
    chosen = stages[best_index]
    if best_index != baseline_index and chosen["model"] != transform:
        missing = [m for m in ("intensity", "features") if m not in methods]
        advice.append(
            f"the best candidate is a {chosen['model']}, not the requested {transform}: "
            + (f"{' and '.join(repr(m) for m in missing)} (which fit it) not installed"
               if missing else "the stages that fit it failed or scored lower (see stages)")
            + "; the result is the best lower-order estimate")
    info = {
        "stages": stages,
        "skipped": skipped,
        "chosen": {"stage": best_index, "method": chosen["method"],
                   "model": chosen["model"], "on": chosen["on"]},
        "metric": metric,
        "score": best_score,
        "baseline_score": baseline,
        "stage_errors": errors,
        "advice": advice,
        "methods_available": methods,
    }
    return BackendResult(best_tf, info)


def _refine_model(transform: str) -> str:
    return "affine" if transform == "homography" else transform


def _mi_metric_option(metric: str) -> tuple[dict, bool]:
    """Options selecting mutual information in the intensity backend (if it has such an
    option), and whether it then uses mutual information."""
    if metric != "mi":
        return {}, False
    opts = method_info("intensity")["options"]
    if "metric" not in opts:
        return {}, False
    default = str(opts["metric"]).lower()
    if "mattes" in default or "mi" == default or "mutual" in default:
        return {}, True  # already mutual information
    return {"metric": "mattes"}, True
