"""``method="auto"``: try the installed methods in a sensible order, score every
candidate on the images, keep the best.

Stages (each one optional, each one recorded in ``info["stages"]``):

1. **coarse**: global methods that need no starting point.
   ``fourier`` translation (any dimension) and, in 2D, ``fourier`` similarity/rigid
   (log-polar: any rotation, scale up to ~2x); each on the intensities and on the
   gradient magnitude (edges survive contrast inversion and monotonic remapping, so
   this copes with multi-modal pairs where phase correlation of the raw intensities
   locks onto the wrong peak). ``features`` (OpenCV keypoints, 2D) when installed.
   In 2D rigid/similarity/affine, ``fourier`` at full resolution with its spline
   Gauss-Newton stage runs first (affine: a Gauss-Newton affine pass from its
   similarity); when that reaches ``stop_ncc`` on a same-contrast pair it is kept and
   the slower stages below are skipped (it is as precise as ``intensity`` there, at
   a fraction of the time).
   A homography goes to ``features`` first (only keypoints fit one); when they are
   clearly aligned the Fourier stages are skipped. In 2D rigid/similarity/affine a
   cheap **contrast test** (:func:`contrast_test`, ~10 ms) runs before the Fourier fast
   path: on a pair it calls multi-modal, ``intensity`` (mutual information) runs first
   and the Fourier log-polar stage and keypoints on raw intensities (which need one
   contrast) are skipped; the verdict is checked on intensity's result (|NCC| >= 0.9
   there overrules it, and the Fourier stage runs after all). ``info["contrast"]``
   records the verdict, its evidence and the check.
2. **refine**: ``intensity`` (SimpleITK, with its spline Gauss-Newton polish) with the
   requested transform model: from scratch right after the cheap Fourier translation
   (its own centre and rotation search; the slower coarse stages are skipped when it
   is clearly aligned; in 3D it runs first, and the Fourier translations only when it
   is not clearly aligned), and again from the best coarse candidate when that one
   lies more than 2 pixels away (large rotations, scale changes).

Every candidate is scored by mutual information (robust across modalities) or
normalised cross-correlation (same modality; ``metric="auto"`` picks by the pair) on the
overlap of the fixed image and the warped moving image (``core.metrics``), against the
unaligned images as a baseline; the final choice re-scores all of them on one common
region. A stage that fails (``RegistrationError`` / ``ValueError``) is recorded with its
message and the next one runs.
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
# 2D: the core also hands over a linear (unclipped) rescale of both images, used by the
# stages blind to gain and offset (Fourier, the Gauss-Newton polish): detail beyond the
# 0.5/99.5 percentiles then still guides them; intensity (MI) and scoring keep the
# clipped images
LINEAR_COPY = True


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


def _block_mean(image, k: int) -> np.ndarray:
    """Means of k x k (x k) blocks (the trailing partial blocks dropped): block index i
    covers full indices k i .. k i + k - 1, centred on k i + (k - 1) / 2."""
    image = np.asarray(image, np.float32)
    if k <= 1:
        return image
    shape = [n // k for n in image.shape]
    crop = image[tuple(slice(0, n * k) for n in shape)]
    return crop.reshape([v for n in shape for v in (n, k)]).mean(
        axis=tuple(range(1, 2 * image.ndim, 2))).astype(np.float32)


def contrast_test(fixed, moving, transforms=(), *, fixed_spacing=None, moving_spacing=None,
                  size: int = 64) -> dict:
    """Do two images show one contrast (``"mono"``) or different ones (``"multi"``)?

    A cheap test (a few ms on 512^2 pairs) made on block means of at most ``size``
    pixels per axis (blurred enough that a few pixels of misalignment matter little),
    from two kinds of evidence:

    * the intensity distributions: distance between the 5..95 % quantiles of the two
      images' values strictly inside their 0.5/99.5 % percentile range (fill, clipping
      and saturation excluded); a same-contrast pair shares them up to the field of view;
    * the joint statistics at the best of the given alignments (``transforms``, moving
      -> fixed, world units; identity always included, the one with the highest mutual
      information kept): signed normalised cross-correlation ``ncc`` against the
      informational coefficient of correlation ``r_mi = sqrt(1 - exp(-2 MI))`` (equal to
      |NCC| for a linear relation, above it for any other).

    ``"multi"``: a strongly inverted relation (NCC <= -0.5 with r_mi >= 0.6), or
    distributions that differ (quantile distance >= 0.25) while the joint statistics show
    more than a positive linear relation (r_mi - NCC >= 0.1). Anything else is
    ``"mono"``: the test is made to say "multi" only when it is clear (a misaligned pair
    tells little), and ``auto`` verifies its verdict on the first intensity result.
    Validated on ~200 pairs (``benchmarks/bench_auto.py --contrast``, docs/benchmarks.md
    "auto, round 3"): the report's multi-modal pairs (IHC stains, MR T1 vs grey matter,
    inverted gamma + noise) say "multi", its photo pairs "mono"; 11 of 102 moved photos
    (large turns with zoom) say "multi" too, which auto's check then overrules.
    """
    from ..core.metrics import mutual_information, ncc, robust_normalize
    from ..core.resample import overlap_mask, resample

    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    ndim = fixed.ndim
    f_sp = np.ones(ndim) if fixed_spacing is None else np.asarray(fixed_spacing, float)
    m_sp = np.ones(ndim) if moving_spacing is None else np.asarray(moving_spacing, float)
    kf = max(1, int(np.ceil(max(fixed.shape) / float(size))))
    km = max(1, int(np.ceil(max(moving.shape) / float(size))))
    fc = robust_normalize(_block_mean(fixed, kf))
    mc = robust_normalize(_block_mean(moving, km))
    geometry = dict(output_spacing=f_sp * kf, output_origin=f_sp * (kf - 1) / 2.0,
                    input_spacing=m_sp * km, input_origin=m_sp * (km - 1) / 2.0)
    best = None
    for tf in (Transform.identity(ndim), *transforms):
        if tf is None or not tf.is_linear:
            continue
        mask = overlap_mask(mc.shape, tf, fc.shape, **geometry)
        if mask.sum() < 64:
            continue
        warped = resample(mc, tf, fc.shape, **geometry)
        mi = mutual_information(fc, warped, mask, bins=16)
        if best is None or mi > best[0]:
            best = (mi, ncc(fc, warped, mask))
    p = np.linspace(0.05, 0.95, 19)
    inner = [a[(a > 0) & (a < 1)] for a in (fc, mc)]
    dq = (float(np.mean(np.abs(np.quantile(inner[0], p) - np.quantile(inner[1], p))))
          if min(a.size for a in inner) >= 32 else float("nan"))
    if best is None:
        return {"verdict": "mono", "ncc": float("nan"), "r_mi": float("nan"),
                "quantile_distance": dq, "why": "no overlap to compare: assumed one contrast"}
    mi, rho = best
    r_mi = float(np.sqrt(max(0.0, 1.0 - np.exp(-2.0 * mi))))
    inverted = rho <= -0.5 and r_mi >= 0.6
    remapped = np.isfinite(dq) and dq >= 0.25 and r_mi - rho >= 0.1
    verdict = "multi" if (inverted or remapped) else "mono"
    why = ("inverted: NCC {:.2f}, r_mi {:.2f}".format(rho, r_mi) if inverted else
           "different intensity distributions (quantile distance {:.2f}) and a non-linear "
           "relation (r_mi {:.2f} vs NCC {:.2f})".format(dq, r_mi, rho) if remapped else
           "no clear sign of two contrasts (NCC {:.2f}, r_mi {:.2f}, quantile distance "
           "{:.2f})".format(rho, r_mi, dq))
    return {"verdict": verdict, "ncc": float(rho), "r_mi": r_mi, "quantile_distance": dq,
            "why": why}


def _score(fixed, moving, transform, f_sp, m_sp, fixed_mask, max_points=2 ** 16) -> dict:
    """Scores on every k-th fixed pixel per axis (at most ~``max_points``): a statistic,
    and scoring every stage at full resolution cost as much as the stages (retina 704^2)."""
    from ..core.metrics import mutual_information, ncc, robust_normalize

    k = max(1, int(np.ceil((fixed.size / max_points) ** (1.0 / fixed.ndim))))
    sub = tuple(slice(None, None, k) for _ in range(fixed.ndim))
    same_grid = fixed.shape == moving.shape and np.array_equal(np.asarray(f_sp, float),
                                                               np.asarray(m_sp, float))
    fixed = fixed[sub]
    fixed_mask = None if fixed_mask is None else np.asarray(fixed_mask, bool)[sub]
    geometry = dict(output_spacing=tuple(np.asarray(f_sp, float) * k), input_spacing=m_sp)
    warped, mask = _warp_with_mask(moving, transform, fixed.shape, geometry,
                                   sub if same_grid else None)
    if fixed_mask is not None:
        mask &= fixed_mask
    if mask.sum() < 64:
        return {"ncc": float("nan"), "mi": float("nan"), "overlap": float(mask.mean())}
    # core.metrics.compare's ncc and mi, without its mse (unused here; ~2 ms a score),
    # on the overlap's values picked once (the same values in the same order: the same
    # scores, without two full-size float64 copies per score)
    a = robust_normalize(fixed, mask)[mask]
    b = robust_normalize(warped, mask)[mask]
    return {"ncc": ncc(a, b), "mi": mutual_information(a, b), "overlap": float(np.mean(mask))}


def _warp_with_mask(moving, transform, shape, geometry, same_grid_sub=None):
    """The moving image on the (subsampled) fixed grid and where it lands inside the
    moving image. ``same_grid_sub``: the fixed and moving grids are one (shape and
    spacing) and the fixed grid is subsampled by these slices; then the identity (the
    baseline, every call) needs no interpolation: at integer positions linear
    interpolation returns the pixels themselves and every point is inside, so the slices
    of the moving image are the result, bit for bit (resample's own output there)."""
    from ..core.resample import overlap_mask, resample

    if same_grid_sub is not None and transform.is_linear and np.array_equal(
            np.asarray(transform.matrix, float), np.eye(len(shape) + 1)):
        return moving[same_grid_sub], np.ones(shape, bool)
    return (resample(moving, transform, shape, **geometry),
            overlap_mask(moving.shape, transform, shape, **geometry))


def register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress, cancel,
             fixed_mask=None, moving_mask=None, metric: Literal["auto", "mi", "ncc"] = "auto",
             structure: bool = True,
             use_features: bool = True, refine: bool = True, coarse_size: int = 256,
             stop_ncc: float | None = 0.98, min_overlap: float = 0.1,
             seed: int | None = None, linear_copy=None) -> BackendResult:
    """Chain and score methods; return the best-scoring transform.

    Options
    -------
    metric : "auto", "mi" or "ncc"
        How candidates are ranked: mutual information (any modality) or normalised
        cross-correlation (same modality, higher is better); "auto" ranks by NCC when
        the best candidate by mutual information shows a same-contrast pair (NCC >= 0.9,
        where NCC is the sharper judge of small misalignments), else by mutual information.
    structure : bool
        Also run the coarse Fourier stages on gradient magnitudes (multi-modal pairs).
    use_features : bool
        Include ``features`` (OpenCV keypoints) as a coarse stage when installed (2D).
    refine : bool
        Run ``intensity`` (when installed): from scratch (its own rotation search), and
        from the best coarse candidate when that one lies elsewhere.
    coarse_size : int
        The Fourier stages run on copies downsampled to at most this many pixels per
        axis (3D: a quarter of it, at least 32: 64^3 voxels are as many as 512^2
        pixels) (same world coordinates); 0 keeps full resolution. A 3D translation
        request runs its Fourier stage at full resolution.
    stop_ncc : float or None
        Skip the remaining (slower) coarse stages once a candidate reaches this absolute
        normalised cross-correlation (on the stronger-gradient half of the fixed image,
        cubic interpolation; the absolute value also accepts contrast-inverted pairs).
        0.98: a smooth 3D brain shifted by 8 mm still reached 0.96. None runs every stage.
    min_overlap : float
        Candidates whose overlap covers less than this fraction of the fixed image are
        discarded (a tiny overlap can score deceptively well).
    seed : int or None
        Seed of the ``intensity`` stages' random metric sampling: with a seed the same
        inputs give the identical transform (``features`` is always seeded); None uses
        ``intensity``'s default (a fixed seed: identical in 2D; in 3D every SimpleITK
        thread, results equal to the last digits).

    Every candidate is scored when it is made (on its own overlap, for the early stop)
    and, at the end, all of them again on one common footing: the same fixed pixels
    (where every candidate overlaps the moving image), cubic interpolation. The best
    of those scores wins.
    """
    from ..core.register import register as core_register

    if metric not in ("auto", "mi", "ncc"):
        raise ValueError(f"metric must be 'mi' (mutual information, any modality), 'ncc' "
                         f"(normalised cross-correlation, same modality) or 'auto' (chosen by "
                         f"the pair); got {metric!r}")
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
    candidates: list[tuple[float, int, Transform]] = []  # (own score, stage index, transform)
    rank = "mi" if metric == "auto" else metric

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
        value = sc[rank]
        if not np.isfinite(value):
            entry["rejected"] = "no overlap with the fixed image"
        elif sc["overlap"] < min_overlap:
            entry["rejected"] = (f"overlap {sc['overlap']:.2f} < min_overlap {min_overlap}")
        else:
            candidates.append((float(value), len(stages) - 1, tf))

    def run(method, model, why, *, rep="intensities", fraction=(0.0, 1.0), shrink=False, **opts):
        check_cancel()
        f_img, m_img = fixed, moving
        if method == "fourier" and rep == "intensities" and linear_copy is not None:
            f_img, m_img = linear_copy
        fs, ms, f_msk, m_msk = f_sp, m_sp, fixed_mask, moving_mask
        if shrink and coarse_size:
            size = coarse_size if ndim == 2 else max(32, int(coarse_size) // 4)
            f_img, fs = _shrink(f_img, f_sp, size)
            m_img, ms = _shrink(m_img, m_sp, size)
            if f_img.shape != fixed.shape or m_img.shape != moving.shape:
                why = why + f"; on a copy of at most {int(size)} px per axis"
                f_msk = None if fixed_mask is None else _shrink(fixed_mask, f_sp, size)[0] > 0.5
                m_msk = None if moving_mask is None else _shrink(moving_mask, m_sp, size)[0] > 0.5
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
            for key in ("polish", "spline_refine"):
                if isinstance(res.info.get(key), dict):
                    entry[key] = {k: res.info[key].get(k) for k in ("accepted", "reason")}
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

    # ---- the plan: cheap global stages, intensity from scratch, then (unless a
    # candidate is already clearly aligned) the slower global ones, then intensity from
    # the best of those when it lies elsewhere
    reps = ["intensities"] + (["gradient magnitude"] if structure else [])
    first, coarse = [], []
    if "fourier" in methods:
        for rep in reps:
            (first if rep == "intensities" else coarse).append(
                ("fourier", "translation", rep, "phase correlation: any shift, fast" +
                 ("" if rep == "intensities" else "; edges survive contrast changes")))
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
    refine_model = _refine_model(transform)
    n_refine = 1 if (refine and supports("intensity", refine_model)) else 0
    # 2D rigid/similarity/affine: fourier at full resolution with its spline Gauss-Newton
    # stage (+ an affine Gauss-Newton pass) before intensity from scratch: on same-contrast
    # pairs it is as precise at a fraction of the time, and when it reaches stop_ncc the
    # intensity run and the coarse stages are skipped; on other pairs it declines early
    # (|NCC| < 0.5 at its start) and costs its coarse log-polar search only
    fast_model = (_COARSE_2D[transform] if refine and ndim == 2 and stop_ncc is not None
                  and transform in ("rigid", "similarity", "affine")
                  and supports("fourier", _COARSE_2D[transform]) else None)
    # 3D rigid/similarity/affine: intensity from scratch goes before the Fourier shift.
    # Its own start search (centres, +-20 deg about each axis) does not use the shift, and
    # when it ends clearly aligned (|NCC| >= stop_ncc) the shift, its scoring and the
    # cubic-spline judge it made necessary (~0.25 s on a 63x117x99 brain, half the cost of
    # the intensity run) only re-confirmed the intensity result. Otherwise the shifts run
    # right after it, as before, and the intensity run from the best of them follows.
    if ndim == 3 and n_refine and transform != "translation" and refine_model == transform:
        coarse[:0] = first
        first = []
    n_total = max(1, len(first) + len(coarse) + 2 * n_refine + (1 if fast_model else 0))
    skipped = []
    done_stages = [0]

    def fraction():
        k = done_stages[0]
        done_stages[0] += 1
        return (min(k, n_total - 1) / n_total, min(k + 1, n_total) / n_total)

    judged: dict[int, float] = {}
    spline_ncc: dict[int, float] = {}  # the judge's own value (on the candidate's overlap)
    judge_tool = []

    def linear_judge():
        if not judge_tool:
            from ..core.refine import LinearJudge

            judge_tool.append(LinearJudge(fixed, moving, fixed_spacing=f_sp, moving_spacing=m_sp,
                                          fixed_mask=fixed_mask, moving_mask=moving_mask))
        return judge_tool[0]

    def judge(idx, tf):
        """|NCC| on strong-gradient fixed pixels, cubic spline (core.refine.compare_linear):
        whole-overlap NCC with linear interpolation stays low on aligned photos with
        fine texture (moon: 0.91 at the truth), so it stopped nothing."""
        if idx not in judged:
            value = abs(stages[idx]["score"]["ncc"])
            if tf.is_linear:
                cl = linear_judge()([tf])[0]
                spline_ncc[idx] = float(cl)
                value = max(value, cl) if np.isfinite(cl) else value
            judged[idx] = float(value)
        return judged[idx]

    def clearly_aligned(linear_only=None):
        # a candidate that refinement can start from (linear), or any when none follows
        # (and any for a homography: intensity cannot improve on a projective fit)
        if linear_only is None:
            linear_only = refine_model == transform
        if stop_ncc is None:
            return None
        eligible = [(idx, tf) for _, idx, tf in candidates if not (
            idx == baseline_index or (linear_only and n_refine and (not tf.is_linear or tf.is_projective)))]
        # first the values known without the judge: a candidate whose whole-overlap score
        # already clears the bar (the sharper judge can only raise it: judge = max of
        # both; building it cost as much as the Fourier stage on a 512^2 shift), or one
        # judged before. Only then the judge on the others (a misaligned coarse stage
        # listed before the aligned one used to build it for nothing: camera, 150 deg)
        for idx, tf in eligible:
            own = abs(stages[idx]["score"]["ncc"])
            value = judged[idx] if idx in judged else own
            if value >= stop_ncc:
                stages[idx]["aligned_ncc"] = float(value)
                return stages[idx]
        for idx, tf in eligible:
            if idx not in judged and judge(idx, tf) >= stop_ncc:
                stages[idx]["aligned_ncc"] = judged[idx]
                return stages[idx]
        return None

    def skip_note(done):
        return (f"skipped: {done['method']} {done['model']} ({done['on']}) already reached "
                f"|NCC| {done['aligned_ncc']:.3f} >= stop_ncc {stop_ncc}")

    intensity_opts = {}
    if n_refine:
        if seed is not None and "seed" in method_info("intensity")["options"]:
            intensity_opts["seed"] = int(seed)
        mi_opts, uses_mi = _mi_metric_option("mi" if metric == "auto" else metric)
        intensity_opts.update(mi_opts)
        mi_why = ", mutual information" if uses_mi else ""

    def run_intensity(why, **opts):
        tf = run("intensity", refine_model, why + mi_why, fraction=fraction(),
                 **intensity_opts, **opts)
        if tf is None and intensity_opts.get("metric") and "metric" in (stages[-1]["error"] or ""):
            opts2 = {k: v for k, v in intensity_opts.items() if k != "metric"}
            tf = run("intensity", refine_model, why, fraction=fraction(), **opts2, **opts)
        return tf

    if transform == "homography":
        # only keypoints fit a homography: they go first, and when they are clearly
        # aligned the coarse Fourier shifts (and their scoring and judging, as much again
        # as the keypoints on a 512^2 photo pair) are not needed
        for entry in [c for c in coarse if c[0] == "features"]:
            coarse.remove(entry)
            method, model, rep, why = entry
            run(method, model, why, rep=rep, fraction=fraction())
    for method, model, rep, why in first:
        if transform == "homography":
            done = clearly_aligned()
            if done is not None:
                skipped.append({"method": method, "model": model, "on": rep,
                                "why": skip_note(done)})
                done_stages[0] += 1
                continue
        # a translation is what phase correlation does best: full resolution (it is fast);
        # for other models it is a coarse start
        full = transform == "translation"
        run(method, model, why, rep=rep, fraction=fraction(), shrink=not full,
            **({} if full else _fourier_coarse_options()))
    # one contrast or two? On a multi-modal pair the Fourier log-polar stage and its
    # Gauss-Newton polish (both need one contrast) only fail, at up to 3x intensity's own
    # cost (IHC stains, MR T1 vs grey matter): intensity goes first, then the verdict is
    # checked on its result
    contrast = None
    if fast_model and n_refine and refine_model == transform:
        contrast = contrast_test(fixed, moving, [s["transform"] for s in stages[1:]
                                                 if s["transform"] is not None],
                                 fixed_spacing=f_sp, moving_spacing=m_sp)
    multi = contrast is not None and contrast["verdict"] == "multi"

    def fast():
        return _fast_path(run, transform, fast_model, stages, judge, record, stop_ncc,
                          fraction, *(linear_copy or (fixed, moving)), f_sp, m_sp,
                          fixed_mask, moving_mask, cancel)

    fast_done = None
    if fast_model and not multi:
        fast_done = fast()
    scratch = None
    scratch_ok = False
    if n_refine and refine_model != transform:
        # homography: intensity fits only its affine part; keypoints go first and the
        # intensity run starts from them (below), never from scratch
        skipped.append({"method": "intensity", "model": refine_model, "on": "intensities",
                        "why": f"skipped: from scratch, intensity cannot fit a {transform}; it "
                               "refines the best coarse stage instead"})
        done_stages[0] += 1
    elif n_refine:
        done = clearly_aligned() if transform == "translation" else fast_done
        if done is None:
            scratch = run_intensity(f"intensity {refine_model} from scratch (its own start and "
                                    "rotation search)" + ("; first: the contrast test says "
                                                          "multi-modal" if multi else ""))
            scratch_ok = (scratch is not None and stages[-1]["transform"] is scratch
                          and not stages[-1].get("rejected"))
        else:
            skipped.append({"method": "intensity", "model": refine_model, "on": "intensities",
                            "why": skip_note(done)})
            done_stages[0] += 1
    scratch_index = len(stages) - 1 if scratch_ok else None
    deferred = []  # stages held back by a "multi" verdict, run if it is overruled

    def overrule(reason):
        nonlocal multi, fast_done
        contrast["checked"] = "overruled: " + reason
        multi = False
        if fast_model:
            fast_done = fast()
        for method, model, rep, why in deferred:
            skipped[:] = [s for s in skipped if not (s["method"], s["model"], s["on"]) ==
                          (method, model, rep)]
            run(method, model, why + "; run after the multi-modal verdict was overruled",
                rep=rep, fraction=fraction(),
                shrink=method == "features" and refine_model == transform and n_refine > 0)

    if multi:
        # check the verdict where the images are aligned: a positive, near-linear relation
        # (|NCC| >= 0.9 on strong-gradient pixels) means one contrast after all; then the
        # Fourier + Gauss-Newton stage runs now (it is the more precise one there)
        own = stages[-1]["score"]["ncc"] if scratch_ok else float("nan")
        linear = judge(scratch_index, scratch) if scratch_ok and own > 0 else float("nan")
        if not scratch_ok:
            overrule("no intensity result to check it on")
        elif linear >= 0.9:
            overrule(f"|NCC| {linear:.2f} >= 0.9 at the intensity result: one contrast")
        else:
            contrast["checked"] = (f"confirmed at the intensity result: NCC {own:.2f}"
                                   + ("" if np.isnan(linear) else f", |NCC| {linear:.2f} on "
                                      "strong-gradient pixels") + " (one contrast: >= 0.9)")
            done_stages[0] += 1  # the full-resolution Fourier stage, not run
    # a coarse Fourier shift is only a start: a 1/10 px peak, no re-correlation passes
    # (the 1/100 px refinement cost as much as the intensity run on a 3D brain)
    coarse_fourier = _fourier_coarse_options()
    for method, model, rep, why in coarse:
        done = clearly_aligned()
        if done is not None:
            skipped.append({"method": method, "model": model, "on": rep, "why": skip_note(done)})
            done_stages[0] += 1
            continue
        if multi and method == "features":
            skipped.append({"method": method, "model": model, "on": rep,
                            "why": f"skipped: the pair is multi-modal (contrast test: "
                                   f"{contrast['why']}; {contrast['checked']}): keypoint "
                                   "descriptors need one contrast"})
            deferred.append((method, model, rep, why))
            done_stages[0] += 1
            continue
        if fast_model and not multi and (method, model, rep) == ("fourier", fast_model, "intensities"):
            skipped.append({"method": method, "model": model, "on": rep,
                            "why": "skipped: ran at full resolution already (first stage)"})
            done_stages[0] += 1
            continue
        if method == "fourier" and model == "rigid" and scratch_ok and ndim == 2:
            # intensity's own start search covers a full turn in 2D: log-polar adds
            # nothing for a rigid model (it earns its cost on scale changes)
            skipped.append({"method": method, "model": model, "on": rep,
                            "why": "skipped: the intensity run from scratch searched a full "
                                   "turn of rotations already (log-polar adds scale, not "
                                   "asked for here)"})
            done_stages[0] += 1
            continue
        # features too is only a start when intensity refines after it (not for a
        # homography, which it fits itself): SIFT on the coarse copy costs ~1/4 (on the
        # IHC pair, where it fails anyway, it was a third of auto's time at full size)
        run(method, model, why, rep=rep, fraction=fraction(),
            shrink=method == "fourier" or (method == "features" and refine_model == transform
                                           and n_refine > 0),
            **(coarse_fourier if (method, model) == ("fourier", "translation") else {}))

    if multi:
        # intensity maximises mutual information: when another candidate scores higher
        # mutual information, intensity did not align the pair and the "multi" verdict
        # rests on a misaligned look (a same-contrast pair turned by 100 degrees and
        # zoomed 1.3x can look like two contrasts): run the held-back stages after all
        mine = stages[scratch_index]["score"]["mi"]
        better = [(c, i) for c, i, _ in candidates if i != scratch_index
                  and stages[i]["score"]["mi"] > mine]
        if better:
            i = max(better)[1]
            overrule(f"{stages[i]['method']} {stages[i]['model']} ({stages[i]['on']}) scores "
                     f"higher mutual information ({stages[i]['score']['mi']:.3f}) than the "
                     f"intensity result ({mine:.3f}): intensity did not align the pair")
        else:
            contrast["checked"] += ("; the intensity result has the highest mutual information "
                                    "of all candidates")

    # ---- intensity from the best coarse candidate, when it lies elsewhere
    if n_refine and "init" in method_info("intensity")["options"]:
        starts = [c for c in candidates if c[2].is_linear and not c[2].is_projective
                  and stages[c[1]]["method"] not in ("intensity", "none")]
        if starts:
            best = max(starts, key=lambda c: c[0])
            far = scratch is None or _max_shift(best[2], scratch, fixed.shape, f_sp) > 2.0
            aligned = clearly_aligned()
            own = {i: c for c, i, _ in candidates}
            # a coarse (lower-order) estimate that scores below the intensity result is
            # no better start than the one intensity found itself: skip the second run
            beaten = (scratch is not None and scratch_ok and stages[best[1]]["score"] is not None
                      and own.get(best[1], -np.inf) <= max(
                          (c for c, i, tf in candidates if tf is scratch), default=-np.inf))
            if beaten:
                skipped.append({"method": "intensity", "model": refine_model, "on": "intensities",
                                "why": "skipped: refinement from the best coarse stage, which "
                                       "scores below the intensity run from scratch"})
            elif far and aligned is None:
                b = stages[best[1]]
                run_intensity(f"intensity {refine_model} refinement from the best coarse stage "
                              f"({b['method']} {b['model']} on {b['on']})", init=best[2])
            else:
                skipped.append({"method": "intensity", "model": refine_model, "on": "intensities",
                                "why": "skipped: refinement from the best coarse stage, whose "
                                       "start the intensity run from scratch already reached"
                                       if not far else skip_note(aligned)})

    # ---- a final Gauss-Newton polish of the best linear candidate (when not polished yet)
    if candidates and refine:
        _polish_best(*(linear_copy or (fixed, moving)), stages, candidates, baseline_index,
                     refine_model, judge,
                     record, f_sp, m_sp, fixed_mask, moving_mask, cancel, judged)

    progress(1.0, "scoring done")
    errors = [f"{s['method']} {s['model']} ({s['on']}): {s['error']}" for s in stages if s["error"]]
    if not [c for c in candidates if c[1] != baseline_index]:  # nothing but the baseline
        raise RegistrationError(
            "auto: no method produced an alignment. "
            + ("Stage errors: " + "; ".join(errors) + ". " if errors else "")
            + "Try landmarks (method='landmarks' with a few point pairs) or crop both images "
              "to the shared region, then run again."
        )
    # ---- one common footing for the final choice
    rank = _rescore_common(fixed, moving, stages, candidates, baseline_index, f_sp, m_sp,
                           fixed_mask, metric, rank, linear_judge, judged, spline_ncc)
    scored = [(stages[i]["score"][rank], i, tf) for _, i, tf in candidates
              if np.isfinite(stages[i]["score"][rank])]
    best_score, best_index, best_tf = max(scored, key=lambda c: c[0])
    advice = []
    baseline = stages[baseline_index]["score"][rank]
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
        "metric": rank,
        "score": best_score,
        "baseline_score": baseline,
        "stage_errors": errors,
        "advice": advice,
        "methods_available": methods,
    }
    if contrast is not None:
        info["contrast"] = contrast
    return BackendResult(best_tf, info)


def _fast_path(run, transform, model, stages, judge, record, stop_ncc, fraction, fixed, moving,
               f_sp, m_sp, fixed_mask, moving_mask, cancel):
    """Fourier ``model`` (rigid/similarity) at full resolution with its spline polish and,
    for an affine request, an affine Gauss-Newton pass from it; returns the stage that
    reached ``stop_ncc`` (by the same-contrast judge) with the requested model, or None."""
    opts = method_info("fourier")["options"]
    affine = transform == "affine"
    # affine: the similarity is only a start for the affine pass, so it runs on the
    # coarse copy (its own spline stage, fitting a similarity to an affine pair at full
    # resolution, cost 0.75 s on the retina and was then declined)
    tf = run("fourier", model, ("log-polar on a coarse copy: the start of an affine "
                                "Gauss-Newton pass" if affine else
                                "log-polar, then Gauss-Newton on a cubic-spline pyramid at full "
                                "resolution: any rotation, precise and fast on same-contrast pairs"),
             fraction=fraction(), shrink=affine,
             **({"fallback": False} if "fallback" in opts else {}),
             **({"refine": False, "upsample": 10} if affine and "refine" in opts else {}))
    if tf is None or not (affine or (stages[-1].get("spline_refine") or {}).get("accepted")):
        return None
    index = len(stages) - 1
    if affine:
        from ..core.refine import refine_linear

        src = stages[index]
        entry = {"method": "polish", "model": "affine", "on": "intensities",
                 "why": f"affine Gauss-Newton on a cubic-spline pyramid from {src['method']} "
                        f"{src['model']} (a similarity: a start up to ~16 px off at the corners)",
                 "transform": None, "score": None, "seconds": None, "error": None}
        t0 = time.perf_counter()
        try:
            out, info = refine_linear(fixed, moving, tf, model="affine", fixed_spacing=f_sp,
                                      moving_spacing=m_sp, fixed_mask=fixed_mask,
                                      moving_mask=moving_mask, start_error_px=16.0, min_ncc=0.5,
                                      cancel=cancel)  # 0.5: a start this rough lowers NCC
                                                      # (coins, 4 % shear: 0.86)
        except (ValueError, np.linalg.LinAlgError) as err:
            out, info = None, {"accepted": False, "reason": f"{type(err).__name__}: {err}"}
        entry["seconds"] = time.perf_counter() - t0
        entry["polish"] = {"accepted": info.get("accepted"), "reason": info.get("reason")}
        if not info.get("accepted"):
            entry["error"] = f"polish not kept: {info.get('reason')}"
            stages.append(entry)
            return None
        entry["transform"] = out
        record(entry, out)
        index, tf = len(stages) - 1, out
    if stages[index].get("rejected") or stages[index]["score"] is None:
        return None
    # the whole-overlap score may clear the bar already: the judge (the max of both) can
    # only raise it, and building it (spline coefficients of the moving image) then cost
    # as much as a tenth of the Fourier stage (camera_rotation_150)
    own = abs(stages[index]["score"]["ncc"])
    value = float(own) if own >= stop_ncc else judge(index, tf)
    if value >= stop_ncc:
        stages[index]["aligned_ncc"] = value
        return stages[index]
    return None


def _polish_best(fixed, moving, stages, candidates, baseline_index, model, judge, record,
                 f_sp, m_sp, fixed_mask, moving_mask, cancel, judged=None):
    """Run :func:`core.refine.refine_linear` from the best linear candidate (by the
    same-contrast judge) unless that one was polished already; record it as a stage."""
    from ..core.refine import MODELS, refine_linear

    linear = [(i, tf) for _, i, tf in candidates
              if i != baseline_index and tf.is_linear and not tf.is_projective]
    if not linear or model not in MODELS:
        return

    def final(src):
        precise = (src["method"] == "fourier" and src["model"] == "translation"
                   and "on a copy" not in src["why"])  # 1/100 px peak, re-correlated: keep as is
        return precise or any(isinstance(src.get(k), dict) and src[k].get("accepted")
                              for k in ("polish", "spline_refine"))

    hopeless = _hopeless(stages, linear, judged or {})
    if hopeless:
        # misaligned next to a clearly aligned candidate: never the best by the judge
        linear = [(i, tf) for i, tf in linear if i not in hopeless]
    if len(linear) == 1 and final(stages[linear[0][0]]):
        return  # the only candidate needs no polish: no need to build the judge either
    value, i, tf = max(((judge(i, tf), i, tf) for i, tf in linear), key=lambda c: c[0])
    src = stages[i]
    if value < 0.9 or final(src):
        return
    entry = {"method": "polish", "model": model, "on": "intensities",
             "why": f"Gauss-Newton on a cubic-spline pyramid from the best candidate "
                    f"({src['method']} {src['model']} on {src['on']})",
             "transform": None, "score": None, "seconds": None, "error": None}
    t0 = time.perf_counter()
    try:
        out, info = refine_linear(fixed, moving, tf, model=model, fixed_spacing=f_sp,
                                  moving_spacing=m_sp, fixed_mask=fixed_mask,
                                  moving_mask=moving_mask, start_error_px=4.0, min_ncc=0.9,
                                  cancel=cancel)
    except (ValueError, np.linalg.LinAlgError) as err:
        out, info = None, {"accepted": False, "reason": f"{type(err).__name__}: {err}"}
    entry["seconds"] = time.perf_counter() - t0
    entry["polish"] = {"accepted": info.get("accepted"), "reason": info.get("reason")}
    if info.get("accepted"):
        entry["transform"] = out
        record(entry, out)
    else:
        entry["error"] = f"polish not kept: {info.get('reason')}"
        stages.append(entry)


# a candidate is "hopeless" when its own-overlap |NCC| is below HOPELESS_NCC (and its
# mutual information below the anchor's) while another one (the anchor) reaches
# ANCHOR_NCC (own overlap, or the judge where it was built)
HOPELESS_NCC, ANCHOR_NCC = 0.5, 0.95


def _hopeless(stages, real, judged) -> set:
    """Indices of candidates (``real``: (stage index, transform) pairs) that cannot be
    the best same-contrast candidate, so the cubic-spline judge need not look at them.

    On a same-contrast pair a candidate within a fraction of a pixel of the truth has a
    whole-overlap |NCC| (linear interpolation) close to the best one's (moon, the finest
    texture in the report: 0.91 where the judge says 0.99); below 0.5 it is misaligned
    by pixels, and the judge, which ranks sub-pixel differences, can only confirm that
    (its value on a misaligned pair is low too). The mutual-information condition keeps
    the choice of ranking (by MI or by NCC) as it was: the candidate with the highest
    mutual information is never dropped. Empty when no candidate is clearly aligned."""
    own = {i: abs(float(stages[i]["score"]["ncc"])) for i, _ in real}
    mi = {i: float(stages[i]["score"]["mi"]) for i, _ in real}

    def aligned(i):
        value = max(own[i], judged.get(i, -np.inf))
        return value if np.isfinite(value) else -np.inf

    anchor = max((i for i, _ in real), key=aligned, default=None)
    if anchor is None or not aligned(anchor) >= ANCHOR_NCC or not np.isfinite(mi[anchor]):
        return set()
    return {i for i, _ in real if i != anchor and np.isfinite(own[i]) and own[i] < HOPELESS_NCC
            and np.isfinite(mi[i]) and mi[i] < mi[anchor]}


def _max_shift(a: Transform, b: Transform, shape, spacing) -> float:
    """Largest distance (in fixed pixels) between where two transforms send the fixed
    image's corners back to the moving image."""
    sp = np.asarray(spacing, float)
    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in shape], indexing="ij")).reshape(len(shape), -1).T * sp
    d = np.abs(a.apply_inverse(corners) - b.apply_inverse(corners)) / sp
    return float(d.max())


def _rescore_common(fixed, moving, stages, candidates, baseline_index, f_sp, m_sp, fixed_mask,
                    metric, rank, linear_judge, judged=None, spline_ncc=None):
    """Score every candidate again on one footing, replacing ``score`` (the first,
    own-overlap score stays as ``score_own``); returns the metric to rank by.

    Same-contrast pairs (``metric="ncc"``, or "auto" when the best candidate by mutual
    information has |NCC| >= 0.9 there) are ranked by |NCC| on one set of fixed pixels
    (the stronger-gradient half, where every candidate lands inside the moving image;
    cubic splines: :func:`core.refine.compare_linear`), the criterion the Gauss-Newton
    polish minimises. Other pairs by mutual information over the region where every
    candidate overlaps the moving image.

    Candidates that cannot win a same-contrast ranking (:func:`_hopeless`: misaligned
    next to a clearly aligned one) are left out of the judge's call (their own |NCC|
    ranks them; when one candidate is left, the judge is not built for it alone)."""
    from ..core.metrics import compare
    from ..core.resample import overlap_mask, resample

    real = [(i, tf) for _, i, tf in candidates if i != baseline_index]
    if len(real) < 2:
        # one candidate (and the baseline): nothing to rank on a common footing, and
        # the judge's spline coefficients would cost more than the stage that made it
        return rank
    hopeless = _hopeless(stages, real, judged or {}) if metric != "mi" else set()
    kept = [(i, tf) for i, tf in real if i not in hopeless]

    def own_footing(i, why):
        stages[i]["score_own"] = stages[i]["score"]
        stages[i]["score"] = dict(stages[i]["score"], ncc=abs(stages[i]["score"]["ncc"]),
                                  footing=why)

    common_why = "common: |NCC| on strong-gradient fixed pixels, cubic spline (mi: own overlap)"
    if len(kept) == 1:
        # the others are misaligned (own |NCC| < HOPELESS_NCC) next to this clearly
        # aligned one: the ranking is by |NCC| (the best by mutual information has
        # |NCC| >= ANCHOR_NCC), the judge's value where it was built for the stage
        (i, _), = kept
        value = (spline_ncc or {}).get(i, float("nan"))
        if np.isfinite(value):
            own = stages[i]["score"]
            stages[i]["score_own"] = own
            stages[i]["score"] = {"ncc": float(value), "mi": own["mi"], "overlap": own["overlap"],
                                  "footing": common_why + "; the only candidate left"}
        else:
            own_footing(i, "own overlap (the only candidate left: the judge was not needed)")
        for j in hopeless | {baseline_index}:
            own_footing(j, "own overlap" + (f" (not rescored: |NCC| < {HOPELESS_NCC} next to a "
                                            f"clearly aligned candidate)" if j in hopeless else ""))
        return "ncc"
    judge = linear_judge()([tf for _, tf in kept])
    by_mi = max(kept, key=lambda c: stages[c[0]]["score"]["mi"])[0]
    use_ncc = metric == "ncc" or (metric == "auto" and
                                  judge[[i for i, _ in kept].index(by_mi)] >= 0.9)
    if use_ncc and all(np.isfinite(v) for v in judge):
        for (i, _), value in zip(kept, judge):
            own = stages[i]["score"]
            stages[i]["score_own"] = own
            stages[i]["score"] = {"ncc": float(value), "mi": own["mi"], "overlap": own["overlap"],
                                  "footing": common_why}
        for j in hopeless | {baseline_index}:
            own_footing(j, "own overlap" + (f" (not rescored: |NCC| < {HOPELESS_NCC} next to a "
                                            f"clearly aligned candidate)" if j in hopeless else ""))
        return "ncc"
    if metric == "ncc":
        return rank
    k = max(1, int(np.ceil((fixed.size / 2 ** 18) ** (1.0 / fixed.ndim))))
    sub = tuple(slice(None, None, k) for _ in range(fixed.ndim))
    fixed = fixed[sub]
    geometry = dict(output_spacing=tuple(np.asarray(f_sp, float) * k), input_spacing=m_sp)
    common = None if fixed_mask is None else np.asarray(fixed_mask, bool)[sub].copy()
    for i, tf in real:
        mask = overlap_mask(moving.shape, tf, fixed.shape, **geometry)
        common = mask if common is None else (common & mask)
    if common is None or common.sum() < 64:
        return rank  # no shared region: keep the own-overlap scores
    for _, i, tf in candidates:
        warped = resample(moving, tf, fixed.shape, **geometry)
        sc = compare(fixed, warped, common, with_ssim=False)
        stages[i]["score_own"] = stages[i]["score"]
        stages[i]["score"] = {"ncc": sc["ncc"], "mi": sc["mi"], "overlap": sc["overlap"],
                              "footing": "common: the region every candidate overlaps"}
    return "mi"


def _fourier_coarse_options() -> dict:
    """Options that make a Fourier translation a cheap coarse start (where it has them)."""
    opts = method_info("fourier")["options"]
    return {k: v for k, v in (("upsample", 10), ("iterations", 0)) if k in opts}


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
