"""Intensity backend: SimpleITK ``ImageRegistrationMethod`` (linear and B-spline) and the
demons filters (dense displacement fields), in 2D and 3D.

Pipeline
--------
1. **Start**: ``init="auto"`` tries both the geometric centres and the intensity
   centres of mass (moments); ``"geometry"``, ``"moments"`` or ``"none"`` pick one;
   an explicit :class:`Transform` (e.g. from features or landmarks) is used as is.
2. **Coarse search** (rigid, similarity, affine and the linear stage of bspline/demons):
   on a ~4000-voxel copy of the images, the metric is evaluated at every start (start
   rotations 2D: a full turn, 3D: +-20 degrees about each axis, times the candidate
   centres; about a given ``init`` transform too when it is rigid), the 3 best are optimised as rigid transforms using every voxel (no random
   sampling, so the search is the same whatever the seed) and the best final metric
   wins. This is what makes the default set-up converge for rotations up to ~30
   degrees and multi-modal pairs (camera 2D: 24/24 runs; elastix's defaults 15/24).
3. **Linear stage**: multi-resolution ``ImageRegistrationMethod`` (Mattes mutual
   information, regular-step gradient descent with a per-level estimated step, scales
   from physical shift), one ITK run per level on bin-averaged copies, skipping levels
   coarser than half the search grid.
4. **Deformable stage**: a B-spline or a demons field on top of the linear result. 2D
   and 3D same-contrast B-splines use the spline Gauss-Newton engine of
   :mod:`core.deform`; multi-modal pairs and a named optimizer use ITK (L-BFGS-B). The
   result is one :class:`Transform`: ``MatrixStep`` then ``FieldStep``.
5. **Polish** (linear transforms, ``polish=True``): a Gauss-Newton pass on a cubic-spline
   pyramid (:mod:`core.refine`) for same-contrast pairs; in 3D, on intensity-remapped
   images for pairs of different contrast (:func:`_remapped_polish`). With a polish to
   follow, step 3 pauses (2D: right after the search and before its finest level; 3D
   rigid: before its finest level) and the polish is tried there; the rest of step 3
   runs only when it declines (different contrast), so same-contrast pairs skip ITK's
   costliest levels (:func:`_defer_mode`).

Convention: SimpleITK's transforms map fixed physical points to moving ones; every
conversion goes through :mod:`napari_registration.core.itk`.

Reproducibility: metric sampling always uses a seed: ``seed``, or by default a fixed one
(the samples of ``seed=0``). With ``seed`` set, and by default in 2D, the registration
runs on one thread (SimpleITK's multi-threaded metric sums in a varying order, which
moved 2D results by up to ~1e-5 of a matrix entry between runs with the same samples; a
seeded run sets SimpleITK's process-wide default thread count to 1 and restores it
afterwards), so the same inputs give the identical transform. 3D runs without ``seed``
keep every thread (faster) and agree to the last digits (~1e-8 of a matrix entry
measured). Before issue #15 round 4, a run without a seed drew new samples each time
(ihc_multimodal: 0.035-0.052 px run to run).
"""

from __future__ import annotations

from typing import Literal

import threading
import time

import numpy as np

from ..core.register import BackendResult, RegistrationCancelled, RegistrationError
from ..core.transform import FieldStep, Transform

TRANSFORMS = ("translation", "rigid", "similarity", "affine", "bspline", "demons")
NDIMS = (2, 3)
DESCRIPTION = ("SimpleITK intensity registration: mutual information / mean squares, "
               "multi-resolution linear, B-spline and demons (2D and 3D)")

METRICS = ("auto", "mattes", "mean_squares", "correlation", "ants_correlation")
OPTIMIZERS = ("auto", "regular_step", "gradient_descent", "lbfgsb")
SAMPLINGS = ("random", "regular", "none")
INITS = ("auto", "moments", "geometry", "none")
DEMONS = ("diffeomorphic", "fast_symmetric", "classic")
LINEAR = ("translation", "rigid", "similarity", "affine")
# 2D: the core also hands over a linear (unclipped) rescale of both images; the
# Gauss-Newton polish (blind to gain and offset) runs on it, as auto's and fourier's do,
# so that the three polish the same images; ITK's metric keeps the clipped ones
LINEAR_COPY = True


def _defer_mode(ndim, transform):
    """Where the ITK linear stage pauses for a polish (see :func:`_linear_stage`).
    After the coarse search and before the finest level, except 3D affine: before the
    finest level only (from the rigid search result its polish declines: a 5 % scale or
    shear moves the corners too far for |NCC| 0.98 at the start). In 3D the polish has
    pyramid levels down to 12 voxels per axis (:data:`_MIN_SIDE_3D`), so a start one
    search cell (~13 mm on the MNI brain) away converges; the ITK levels then never run
    on same-contrast pairs (MNI T1 3x2x2 mm rigid, 4 motions: the same TRE, 0.74x the
    CPU time). 3D affine polishes on 2**16 random samples with a level at half
    resolution (5 motions: TRE 0.034 against 0.036 mm, 0.66x the CPU time)."""
    if ndim == 3 and transform == "affine":
        return "finest"
    return "all"


# coarsest polish level in 3D: at least this many voxels per axis (refine's default of
# 48 left a 63-slice volume without any coarser level, so the 3D polish could only start
# within ~2 voxels of the answer and ITK's levels had to run first)
_MIN_SIDE_3D = 12

# the metric-sampling seed of a run without ``seed``: results repeat run to run. 0, the
# value the docs and presets already suggested; chosen, not tuned (on ihc_multimodal it
# happens to be the best of seeds 0-3: 0.027 px against their median 0.043)
_DEFAULT_SEED = 0

# the 2D finest ITK level after coarser ones: first step in pixels, and the stop as a
# multiple of `convergence` (see _linear_stage)
_FINE_FIRST_STEP = 0.25
_FINE_STOP = 5.0

_OUTSIDE = ("All samples map outside", "Too many samples map outside", "samples map outside")


def _sitk():
    import SimpleITK as sitk

    return sitk


class _Stopped(Exception):
    """Internal: the cancel callback asked to stop during an ITK run."""


def _quiet_stops() -> None:
    """SimpleITK prints (through sys.excepthook) any exception raised in an observer
    before turning it into a RuntimeError; a cancel is not an error, so _Stopped is
    not printed. Installed once; every other exception goes to the previous hook."""
    import sys

    if getattr(sys.excepthook, "_napari_registration_quiet", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if kind is _Stopped:
            return
        previous(kind, value, tb)

    hook._napari_registration_quiet = True
    sys.excepthook = hook


# ------------------------------------------------------------------------ validation
def _check_options(transform, ndim, metric, optimizer, sampling, sampling_percentage, init,
                   seed, demons, bins, iterations, shrink_factors, smoothing_sigmas, linear_stage,
                   grid_spacing, mesh_size):
    if ndim not in NDIMS:
        raise ValueError(f"the intensity method works on 2D and 3D images, not {ndim}D; "
                         "take a slice or a sub-volume (fourier handles nD translations)")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    if transform == "demons" and metric not in ("auto", "mean_squares"):
        raise ValueError(
            f"demons compares intensities directly (mean squares); metric={metric!r} cannot be "
            "used with it. For images of different contrast use transform='bspline' with "
            "metric='mattes', or pass metric='auto'/'mean_squares' for demons")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {list(SAMPLINGS)}")
    if sampling_percentage is not None and not (0 < float(sampling_percentage) <= 1):
        raise ValueError(f"sampling_percentage must be in (0, 1] (a fraction of the voxels); "
                         f"got {sampling_percentage}")
    if not (isinstance(init, Transform) or init in INITS):
        raise ValueError(f"init must be one of {list(INITS)} or a Transform; got {init!r}")
    if demons not in DEMONS:
        raise ValueError(f"unknown demons variant {demons!r}; choose one of {list(DEMONS)}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None; got {seed!r}")
    if int(bins) < 4:
        raise ValueError(f"bins must be >= 4; got {bins}")
    if iterations is not None and int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    if shrink_factors is not None:
        try:
            sf = [float(s) for s in shrink_factors]
        except (TypeError, ValueError):
            sf = []  # a string or other non-numbers: reported just below
        if not sf or isinstance(shrink_factors, str) or any(s < 1 or s != int(s) for s in sf):
            raise ValueError(f"shrink_factors must be integers >= 1, coarse to fine, e.g. (4, 2, 1); "
                             f"got {shrink_factors}")
        if smoothing_sigmas is not None and len(list(smoothing_sigmas)) != len(sf):
            raise ValueError(f"smoothing_sigmas needs one value per level ({len(sf)}); "
                             f"got {smoothing_sigmas}")
    if linear_stage not in ("auto", "none", *LINEAR):
        raise ValueError(f"linear_stage must be 'auto', 'none' or one of {list(LINEAR)}; "
                         f"got {linear_stage!r}")
    if grid_spacing is not None and mesh_size is not None:
        raise ValueError("give either grid_spacing (world units) or mesh_size (control "
                         "points per axis) for the B-spline, not both")
    for name, value in (("grid_spacing", grid_spacing), ("mesh_size", mesh_size)):
        if value is not None and np.any(np.asarray(value, float) <= 0):
            raise ValueError(f"{name} must be positive; got {value}")


# --------------------------------------------------------------------------- helpers
def _auto_levels(shape, shrink_factors, smoothing_sigmas, min_size=16, max_factor=8):
    """Coarse-to-fine shrink factors (powers of two until the smallest axis has about
    ``min_size`` voxels) and smoothing sigmas in voxels (half the shrink factor)."""
    if shrink_factors is None:
        s = 1
        while s * 2 <= max_factor and min(shape) / (s * 2) >= min_size:
            s *= 2
        shrink_factors = []
        while s >= 1:
            shrink_factors.append(s)
            s //= 2
    shrink_factors = [int(s) for s in shrink_factors]
    if smoothing_sigmas is None:
        smoothing_sigmas = [0.5 * s if s > 1 else 0.0 for s in shrink_factors]
    return shrink_factors, [float(v) for v in smoothing_sigmas]


def _auto_percentages(shape, shrink_factors, sampling_percentage, target=(4000, 16000)):
    """Sampling fraction per level: the given one, or enough for a few thousand samples
    on coarse levels and ~16k on the finest (every voxel of small images)."""
    if sampling_percentage is not None:
        return [float(sampling_percentage)] * len(shrink_factors)
    out = []
    n = float(np.prod(shape))
    for i, s in enumerate(shrink_factors):
        voxels = n / s ** len(shape)
        want = target[1] if i == len(shrink_factors) - 1 else target[0]
        out.append(float(min(1.0, max(1e-4, want / voxels))))
    return out


def _set_metric(R, metric, bins):
    if metric == "mattes":
        R.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    elif metric == "mean_squares":
        R.SetMetricAsMeanSquares()
    elif metric == "correlation":
        R.SetMetricAsCorrelation()
    elif metric == "ants_correlation":
        R.SetMetricAsANTSNeighborhoodCorrelation(radius=2)
    else:  # pragma: no cover - validated above
        raise ValueError(metric)


def _set_sampling(R, sampling, percentages, seed):
    sitk = _sitk()
    if sampling == "none":
        R.SetMetricSamplingStrategy(R.NONE)
        return
    R.SetMetricSamplingStrategy(R.RANDOM if sampling == "random" else R.REGULAR)
    if seed is None:
        R.SetMetricSamplingPercentagePerLevel(percentages, sitk.sitkWallClock)
    else:
        # SimpleITK reads seed 0 as "use the wall clock": shift by one
        R.SetMetricSamplingPercentagePerLevel(percentages, int(seed) + 1)


def _translate_itk_error(err, stage):
    msg = str(err)
    if any(s in msg for s in _OUTSIDE):
        return RegistrationError(
            f"{stage}: the images stopped overlapping (ITK: all metric samples map outside "
            "the moving image). Try init='moments' (or 'auto'), check fixed_spacing/"
            "moving_spacing and the layers' origins, crop both to a shared region, or pass "
            "an initial transform (init=...) from landmarks or features")
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else msg
    return RegistrationError(f"{stage} failed in SimpleITK ({detail}); try other options, e.g. "
                             "metric='mattes', more smoothing (smoothing_sigmas) or init='moments'")


def _centre(img):
    """Physical centre (ITK order) of an image's grid."""
    size = np.array(img.GetSize(), float)
    return np.array(img.TransformContinuousIndexToPhysicalPoint(list((size - 1) / 2)))


def _starts(fixed_img, moving_img, init, ndim):
    """Candidate start translations (fixed centre, moving centre offset) for ``init``."""
    sitk = _sitk()
    c_fixed = _centre(fixed_img)
    out = []
    if init in ("auto", "geometry"):
        out.append(("geometry", c_fixed, _centre(moving_img) - c_fixed))
    if init in ("auto", "moments"):
        # centres of mass of intensities (inputs are >= 0, normalised to [0, 1])
        def com(img):
            a = sitk.GetArrayViewFromImage(img).astype(np.float64)
            total = a.sum()
            if total <= 0:
                return _centre(img)
            idx = [float((a.sum(axis=tuple(j for j in range(a.ndim) if j != k)) *
                          np.arange(a.shape[k])).sum() / total) for k in range(a.ndim)]
            return np.array(img.TransformContinuousIndexToPhysicalPoint(idx[::-1]))

        cf, cm = com(fixed_img), com(moving_img)
        if not out or np.linalg.norm((cm - cf) - out[0][2]) > 2 * max(fixed_img.GetSpacing()):
            out.append(("moments", cf, cm - cf))
        elif init == "moments":
            out = [("moments", cf, cm - cf)]
    if init == "none":
        out.append(("none", c_fixed, np.zeros(ndim)))
    return out


def _rotations(ndim, rotation_search):
    """Start rotations (radians, ITK Euler parameters) for the coarse search."""
    if rotation_search is False or rotation_search is None:
        angles = [0.0]
    elif rotation_search is True:
        # 2D: a full turn (the start metric is evaluated at every angle on a ~4000-pixel
        # copy, which costs little; only the best few are optimised), so rotations up to
        # 180 degrees are found. 3D: +-20 degrees about each axis (a full 3D grid costs
        # too much by default); pass angles, e.g. (-90, 90, 180), for large 3D turns
        angles = ([0.0, -15.0, 15.0, -30.0, 30.0, -60.0, 60.0, -90.0, 90.0, -120.0, 120.0,
                   -150.0, 150.0, 180.0] if ndim == 2 else [0.0, -20.0, 20.0])
    else:
        angles = [float(a) for a in np.atleast_1d(rotation_search)]
        if 0.0 not in angles:
            angles = [0.0, *angles]
    rad = [np.deg2rad(a) for a in angles]
    if ndim == 2:
        return [(a,) for a in rad]
    out = [(0.0, 0.0, 0.0)]
    for axis in range(3):
        for a in rad:
            if a != 0.0:
                r = [0.0, 0.0, 0.0]
                r[axis] = a
                out.append(tuple(r))
    return out


def _euler(ndim, centre, angles, translation):
    sitk = _sitk()
    tx = sitk.Euler2DTransform() if ndim == 2 else sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in centre])
    if ndim == 2:
        tx.SetAngle(float(angles[0]))
    else:
        tx.SetRotation(*[float(a) for a in angles])
    tx.SetTranslation([float(v) for v in translation])
    return tx


def _as_kind(rigid, kind, ndim):
    """A rigid (Euler) transform re-expressed as the optimisable ``kind``."""
    sitk = _sitk()
    centre = rigid.GetCenter()
    matrix = rigid.GetMatrix()
    translation = rigid.GetTranslation()
    if kind == "translation":
        tx = sitk.TranslationTransform(ndim)
        # a rigid x -> R(x - c) + c + t restricted to its translation at the centre
        tx.SetOffset(translation)
        return tx
    if kind == "rigid":
        return rigid
    if kind == "similarity":
        tx = sitk.Similarity2DTransform() if ndim == 2 else sitk.Similarity3DTransform()
        tx.SetCenter(centre)
        tx.SetMatrix(matrix)
        tx.SetTranslation(translation)
        return tx
    tx = sitk.AffineTransform(ndim)
    tx.SetCenter(centre)
    tx.SetMatrix(matrix)
    tx.SetTranslation(translation)
    return tx


class _Observer:
    """Progress (fraction across levels and stages) and cancel for one ITK run."""

    def __init__(self, obj, progress, cancel, start, span, nlevels, iterations, stage,
                 level_of=None, iteration_of=None, metric_of=None, shown_level=None):
        self.obj, self.progress, self.cancel = obj, progress, cancel
        self.start, self.span, self.nlevels, self.iterations = start, span, nlevels, iterations
        self.stage = stage
        self.shown_level = shown_level  # (index, count) when one run is one level
        self.level_of = level_of or (lambda: obj.GetCurrentLevel())
        self.iteration_of = iteration_of or (lambda: obj.GetOptimizerIteration())
        self.metric_of = metric_of or (lambda: obj.GetMetricValue())
        self.per_level: dict[int, int] = {}
        self.stopped = False
        _quiet_stops()
        self._last = 0.0

    def __call__(self):
        if self.stopped:
            self.obj.StopRegistration()
            raise _Stopped
        level = int(self.level_of())
        it = int(self.iteration_of())
        self.per_level[level] = it + 1
        if self.cancel():
            # StopRegistration alone is not honoured by L-BFGS-B until its level ends
            # (a third of a B-spline run): raising here aborts Execute at once; the
            # caller sees ITK's RuntimeError with `stopped` set and reports a cancel
            self.stopped = True
            self.obj.StopRegistration()
            raise _Stopped
        now = time.perf_counter()
        if now - self._last < 0.05:
            return
        self._last = now
        frac = self.start + self.span * (level + min(1.0, (it + 1) / self.iterations)) / self.nlevels
        shown = self.shown_level or (level, self.nlevels)
        try:
            self.progress(frac, f"{self.stage}: level {shown[0] + 1}/{shown[1]}, "
                                f"iteration {it + 1}, metric {self.metric_of():.5g}")
        except RegistrationCancelled:
            self.stopped = True
            self.obj.StopRegistration()
            raise _Stopped from None

    def levels(self):
        return [self.per_level.get(k, 0) for k in range(self.nlevels)]


# ------------------------------------------------------------------- linear machinery
def _method(fixed_img, moving_img, *, metric, bins, sampling, percentages, seed, shrink,
            sigmas, fixed_mask_img, moving_mask_img, threads):
    sitk = _sitk()
    R = sitk.ImageRegistrationMethod()
    _set_metric(R, metric, bins)
    _set_sampling(R, sampling, percentages, seed)
    R.SetInterpolator(sitk.sitkLinear)
    # gradients by finite differences where sampled, instead of whole gradient images
    # per level: the same result, much less set-up time on small sample counts
    R.SetMetricUseFixedImageGradientFilter(False)
    R.SetMetricUseMovingImageGradientFilter(False)
    R.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    R.SetSmoothingSigmasPerLevel([float(s) for s in sigmas])
    R.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if fixed_mask_img is not None:
        R.SetMetricFixedMask(fixed_mask_img)
    if moving_mask_img is not None:
        R.SetMetricMovingMask(moving_mask_img)
    if threads is not None:
        R.SetNumberOfThreads(int(threads))
    return R


def _set_optimizer(R, optimizer, learning_rate, iterations, convergence, spacing, scales=True,
                   max_step=None):
    """``max_step`` (regular step, estimated learning rate only): the first step in
    pixels (default: ITK's, about one pixel)."""
    step = float(np.mean(spacing))
    lr = float(learning_rate) if learning_rate is not None else 1.0 * step
    if optimizer == "regular_step":
        # without a learning rate, ITK estimates one per level so that the first step
        # moves voxels by about one (shrunk) voxel: big steps coarse, small ones fine
        R.SetOptimizerAsRegularStepGradientDescent(
            learningRate=lr, minStep=float(convergence) * step, numberOfIterations=int(iterations),
            relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
            estimateLearningRate=R.Never if learning_rate is not None else R.Once,
            maximumStepSizeInPhysicalUnits=(lr if learning_rate is not None else
                                            0.0 if max_step is None else float(max_step) * step))
    elif optimizer == "gradient_descent":
        R.SetOptimizerAsGradientDescent(
            learningRate=lr, numberOfIterations=int(iterations),
            convergenceMinimumValue=1e-3 * float(convergence), convergenceWindowSize=20,
            estimateLearningRate=R.EachIteration, maximumStepSizeInPhysicalUnits=lr)
    else:
        # line searches on a sampled metric take many evaluations per iteration, each
        # costly for B-splines: cap them (measured 3D 65^3, 4^3 mesh: 30-60 s uncapped)
        R.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                               numberOfIterations=int(iterations),
                               maximumNumberOfCorrections=5,
                               maximumNumberOfFunctionEvaluations=int(iterations),
                               costFunctionConvergenceFactor=1e7)
        scales = False
    if scales:
        R.SetOptimizerScalesFromPhysicalShift()


def _execute(R, fixed_img, moving_img, stage, obs=None):
    sitk = _sitk()
    try:
        return R.Execute(sitk.Cast(fixed_img, sitk.sitkFloat32), sitk.Cast(moving_img, sitk.sitkFloat32))
    except RuntimeError as err:
        if obs is not None and obs.stopped:  # the observer aborted the run: a cancel
            raise _Stopped from None
        raise _translate_itk_error(err, stage) from None


def _shrink(img, target_spacing, sigma=None, mask=False):
    """An image (or mask) at about ``target_spacing`` per axis: bin-average by whole
    factors, then a small Gaussian on the small image so that the total blur is
    ``sigma`` (world units; default half the target spacing). Averaging bins is much
    cheaper than ITK's pyramid (a Gaussian on the full image per level): on a 1M-voxel
    volume it saved ~0.4 s of a ~2.5 s rigid registration."""
    sitk = _sitk()
    spacing = np.array(img.GetSpacing())
    factors = [int(max(1, round(target_spacing / s))) for s in spacing]
    if max(factors) == 1:
        return img
    if mask:
        return sitk.Shrink(img, factors)
    small = sitk.BinShrink(sitk.Cast(img, sitk.sitkFloat32), factors)
    sigma = 0.5 * target_spacing if sigma is None else float(sigma)
    # a box of width f*s has variance (f*s)^2 / 12; add what is missing
    rest = [float(np.sqrt(max(0.0, sigma ** 2 - (f * sp) ** 2 / 12.0))) for f, sp in zip(factors, spacing)]
    # one axis at a time: with anisotropic voxels some axes are already blurred enough
    # (rest 0), and SmoothingRecursiveGaussian rejects a zero sigma on any axis
    for axis, sg in enumerate(rest):
        if sg > 0:
            small = sitk.RecursiveGaussian(small, sg, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return small


# the coarse search's starts on the cores (see _coarse_search); False: one thread
_SEARCH_THREADS = True


def _coarse_search(fixed_img, moving_img, *, init, ndim, rotation_search, metric, bins,
                   fixed_mask_img, moving_mask_img, threads, cancel, progress, span,
                   target_voxels=4000, keep=3, iterations=30, base=None):
    """Multi-start on a small copy of the images: the metric is evaluated at every start
    (centres x rotations), the ``keep`` best are optimised (rigid, every voxel, so
    deterministic) and the one with the best final metric wins. Returns the Euler
    transform, its metric and a record of the starts."""
    sitk = _sitk()
    t_search = time.perf_counter()
    size = np.array(fixed_img.GetSize(), float)
    spacing = np.array(fixed_img.GetSpacing())
    physical = float(np.prod(size * spacing))
    target = max(float(spacing.min()), (physical / target_voxels) ** (1.0 / ndim))
    target = min(target, float((size * spacing).min()) / 8)
    f_small = sitk.Cast(_shrink(fixed_img, target), sitk.sitkFloat32)
    m_small = sitk.Cast(_shrink(moving_img, target), sitk.sitkFloat32)
    fm_small = None if fixed_mask_img is None else _shrink(fixed_mask_img, target, mask=True)
    mm_small = None if moving_mask_img is None else _shrink(moving_mask_img, target, mask=True)
    if base is not None:
        # an initial rigid transform (e.g. auto's coarse estimate): search rotations about it
        lin0, shift0 = base
        c0 = _centre(fixed_img)
        starts = [("transform", c0, lin0 @ c0 + shift0 - c0)]
    else:
        starts = _starts(fixed_img, moving_img, init, ndim)
    rotations = _rotations(ndim, rotation_search)
    candidates = [(name, centre, offset, angles) for name, centre, offset in starts
                  for angles in rotations]

    def method():
        R = _method(f_small, m_small, metric=metric, bins=bins, sampling="none",
                    percentages=None, seed=None, shrink=[1], sigmas=[0.0],
                    fixed_mask_img=fm_small, moving_mask_img=mm_small, threads=threads)
        return R

    def euler(centre, angles, offset):
        tx = _euler(ndim, centre, angles, offset)
        if base is not None:  # the search rotation first, then the given start's rotation
            rot = base[0] @ np.array(tx.GetMatrix()).reshape(ndim, ndim)
            if ndim == 2:
                tx.SetAngle(float(np.arctan2(rot[1, 0], rot[0, 0])))
            elif not np.allclose(rot, np.array(tx.GetMatrix()).reshape(3, 3), atol=1e-12):
                tx.SetMatrix([float(v) for v in rot.ravel()])
        return tx

    # ITK single-threaded (2D, or a seed): the starts are evaluated, and the best ones
    # optimised, in Python threads on the cores (SimpleITK releases the GIL; every
    # method is separate and runs every voxel, so the results are those of one thread:
    # the same values, combined in the same order), when a core is free
    # (core.parallel.spare_cores). retina_affine at load ~1 on 2 cores: the starts'
    # metric 60 -> 45 ms, the three optimisations 68 -> 37 ms of wall time
    from ..core.parallel import map_parts, n_workers, spare_cores

    workers = n_workers() if (threads == 1 and _SEARCH_THREADS and spare_cores()) else 1

    def score(candidate):  # 1) the metric at a start
        name, centre, offset, angles = candidate
        if cancel():
            raise _Stopped
        R = method()
        R.SetInitialTransform(euler(centre, angles, offset), inPlace=False)
        try:
            value = float(R.MetricEvaluate(f_small, m_small))
        except RuntimeError:
            value = np.inf
        if not np.isfinite(value):
            value = np.inf
        return (value, name, centre, offset, angles)

    scored = map_parts(score, candidates, workers)
    scored.sort(key=lambda c: c[0])
    chosen = [c for c in scored if np.isfinite(c[0])][:keep]

    def optimise(candidate):  # 2) optimise one of the best
        value0, name, centre, offset, angles = candidate
        if cancel():
            raise _Stopped
        R = method()
        # first step: 2 coarse voxels; 1/2 voxel about a given start, which is close
        # already (2 voxels of rotation at the edge jumped a 5-degree error to 47)
        _set_optimizer(R, "regular_step", (0.5 if base is not None else 2.0) * target,
                       iterations, 1e-2, np.full(ndim, target))
        tx = euler(centre, angles, offset)
        R.SetInitialTransform(tx, inPlace=True)
        R.AddCommand(sitk.sitkIterationEvent,
                     lambda R=R: R.StopRegistration() if cancel() else None)
        try:
            R.Execute(f_small, m_small)
            value = float(R.GetMetricValue())
        except RuntimeError as err:
            if not any(s in str(err) for s in _OUTSIDE):
                raise _translate_itk_error(err, "coarse search") from None
            value = np.inf
        return value, tx

    if cancel():
        raise _Stopped
    progress(0.0, f"coarse search: optimising the best {len(chosen)} starts")
    finals = map_parts(optimise, chosen, workers)
    runs = []
    best = None
    for (value0, name, centre, offset, angles), (value, tx) in zip(chosen, finals):
        runs.append({"start": name, "rotation_deg": np.rad2deg(angles).round(3).tolist(),
                     "metric_start": value0, "metric": value if np.isfinite(value) else None})
        if np.isfinite(value) and (best is None or value < best[0]):
            best = (value, tx)
    if cancel():
        raise _Stopped
    if best is None:
        raise RegistrationError(
            "coarse search: no start position gave any overlap between the images. Check "
            "fixed_spacing/moving_spacing and the layers' origins; try init='moments' (or "
            "'auto') instead of a given start, or pass init=... (a Transform from landmarks "
            "or features) that overlaps")
    return best[1], best[0], {"seconds": time.perf_counter() - t_search, "spacing": target, "starts": len(candidates), "runs": runs, "metric": float(best[0])}


def _ncc_through(f_l, m_l, fm_l, mm_l, tx):
    """|NCC| of a fixed image and the moving image through ``tx`` (ITK, fixed -> moving,
    linear interpolation) over their overlap (and masks): tells a caller cheaply whether
    a least-squares polish can apply (a 3D polish that declines costs ~0.1-0.2 s)."""
    sitk = _sitk()
    # on every second voxel per axis of the level (plenty for one correlation): the
    # moving image is resampled onto that sparser grid only. Copies, not views: a view
    # of a temporary image outlives its buffer
    step = [2] * f_l.GetDimension()
    ref = sitk.Shrink(sitk.Cast(f_l, sitk.sitkFloat32), step)
    fixed = sitk.GetArrayFromImage(ref)
    warped = sitk.GetArrayFromImage(
        sitk.Resample(sitk.Cast(m_l, sitk.sitkFloat32), ref, tx, sitk.sitkLinear, float("nan"),
                      sitk.sitkFloat32))
    ok = np.isfinite(warped)
    if fm_l is not None:
        ok &= sitk.GetArrayFromImage(sitk.Shrink(fm_l, step)) > 0
    if mm_l is not None:
        ok &= sitk.GetArrayFromImage(
            sitk.Resample(mm_l, ref, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    if np.count_nonzero(ok) < 100:
        return 0.0
    # metrics.ncc sums with np.sum, not a BLAS dot (which woke OpenBLAS's threads: 24 ms
    # CPU for this 22k-element product on the loaded 2-core machine)
    from ..core.metrics import ncc

    return abs(ncc(fixed, warped, ok))


def _rigid_itk(init):
    """(rotation, shift) of ``init`` in ITK's direction and axis order (fixed -> moving,
    x/y/z) when it is rigid (a rotation and a shift), else None."""
    if not init.is_linear or init.is_projective:
        return None
    inv = np.linalg.inv(init.matrix)
    d = inv.shape[0] - 1
    lin, shift = inv[:d, :d][::-1, ::-1], inv[:d, d][::-1]
    if not np.allclose(lin @ lin.T, np.eye(d), atol=1e-6) or np.linalg.det(lin) <= 0:
        return None
    return lin, shift


def _linear_stage(kind, fixed_img, moving_img, *, ndim, init, rotation_search, metric, bins,
                  optimizer, learning_rate, iterations, convergence, sampling, percentages,
                  seed, shrink, sigmas, fixed_mask_img, moving_mask_img, threads, progress,
                  cancel, span, trim_levels=True, defer=None):
    """Returns (ITK transform fixed->moving, info, resume).

    ``defer`` (for a caller with a full-resolution polish to follow): None runs every
    level and ``resume`` is None; "finest" pauses before the finest level (when there
    are two or more); "all" also pauses before the first level, right after the coarse
    search. ``resume()`` then runs on to the next pause, or to the end, and returns
    (transform, info, more), ``more`` saying whether a pause is left: a caller whose
    polish is accepted at a pause never runs the rest."""
    sitk = _sitk()
    info: dict = {}
    moving_initial = None
    search_metric = "mattes" if metric in ("auto", "mattes") else metric
    search_args = dict(fixed_img=fixed_img, moving_img=moving_img, init=init, ndim=ndim,
                       metric=search_metric, bins=bins, fixed_mask_img=fixed_mask_img,
                       moving_mask_img=moving_mask_img, threads=threads, cancel=cancel,
                       progress=progress)
    if isinstance(init, Transform):
        from ..core.itk import to_sitk_transform

        base = _rigid_itk(init) if (kind != "translation" and rotation_search is not False) else None
        if base is not None:
            # a rigid start: the rotation search runs about it (it used to be skipped, so
            # a start with the right shift but the wrong rotation stayed wrong)
            rigid, value, search = _coarse_search(
                **search_args, rotation_search=rotation_search, span=0.3 * span, base=base)
            info["search"] = search
        else:
            moving_initial = to_sitk_transform(init)
            rigid = _euler(ndim, _centre(fixed_img), [0.0] * (1 if ndim == 2 else 3), np.zeros(ndim))
        start = _as_kind(rigid, kind, ndim)
        info["init"] = "transform"
    elif kind == "translation" or rotation_search is False:
        starts = _starts(fixed_img, moving_img, init, ndim)
        if len(starts) > 1:  # "auto": keep the better of geometry/moments by a coarse run
            rigid, value, search = _coarse_search(
                **search_args, rotation_search=False, span=0.2 * span)
            info["search"] = search
            if kind == "translation":
                centre = np.array(rigid.GetCenter())
                rigid = _euler(ndim, centre, [0.0] * (1 if ndim == 2 else 3),
                               np.array(rigid.GetTranslation()))
        else:
            name, centre, offset = starts[0]
            rigid = _euler(ndim, centre, [0.0] * (1 if ndim == 2 else 3), offset)
        start = _as_kind(rigid, kind, ndim)
        info["init"] = init
    else:
        rigid, value, search = _coarse_search(
            **search_args, rotation_search=rotation_search, span=0.3 * span)
        info["search"] = search
        info["init"] = init
        start = _as_kind(rigid, kind, ndim)
    offset = span * (0.3 if "search" in info else 0.0)
    if trim_levels and "search" in info:
        # levels coarser than the search's grid only add noise after a good search
        factor = info["search"]["spacing"] / float(min(fixed_img.GetSpacing()))
        keep = [i for i, s in enumerate(shrink) if 2 * s < factor] or [len(shrink) - 1]
        shrink = [shrink[i] for i in keep]
        sigmas = [sigmas[i] for i in keep]
        percentages = None if percentages is None else [percentages[i] for i in keep]
    info["shrink_factors"] = list(shrink)
    info["smoothing_sigmas"] = list(sigmas)
    info["sampling_percentages"] = percentages
    opt = "regular_step" if optimizer == "auto" else optimizer
    # one Execute per level (ITK restarts the optimiser at each level anyway). Stopping
    # coarse levels early was tried: the finest level then ended further from the truth
    # (3D brain TRE 0.16-0.43 mm instead of 0.04-0.1 mm), so every level converges fully
    n = len(shrink)
    per_level, level_seconds = [], []
    base = float(min(fixed_img.GetSpacing()))
    state = {}

    def run_level(li):
        s, sg = shrink[li], sigmas[li]
        f_l, m_l, fm_l, mm_l = fixed_img, moving_img, fixed_mask_img, moving_mask_img
        if s > 1:  # our own cheaper pyramid level (see _shrink)
            f_l = _shrink(fixed_img, s * base, sg * base)
            m_l = _shrink(moving_img, s * base, sg * base)
            fm_l = None if fixed_mask_img is None else _shrink(fixed_mask_img, s * base, mask=True)
            mm_l = None if moving_mask_img is None else _shrink(moving_mask_img, s * base, mask=True)
        elif sg > 0:
            sig = sg * base
            f_l = _sitk().SmoothingRecursiveGaussian(sitk.Cast(fixed_img, sitk.sitkFloat32), sig)
            m_l = _sitk().SmoothingRecursiveGaussian(sitk.Cast(moving_img, sitk.sitkFloat32), sig)
        # a level that would sample half its voxels or more uses all of them: random
        # sampling at 100 % still draws with repeats and moves the result between seeds
        level_sampling = sampling
        if sampling == "random" and percentages is not None and percentages[li] >= 0.5:
            level_sampling = "none"
        R = _method(f_l, m_l, metric="mattes" if metric == "auto" else metric,
                    bins=bins, sampling=level_sampling,
                    percentages=None if percentages is None else [percentages[li]], seed=seed,
                    shrink=[1], sigmas=[0.0], fixed_mask_img=fm_l,
                    moving_mask_img=mm_l, threads=threads)
        if ndim == 2 and 0 < li == n - 1 and opt == "regular_step" and learning_rate is None:
            # 2D finest level after coarser ones (multi-modal pairs: same-contrast ones
            # end in the polish before it): the start is within a fraction of a pixel, so
            # the first step is a quarter pixel instead of one and the level stops at
            # steps below 5x `convergence`: ~10 iterations instead of ~14 (the level's
            # random samples limit the precision: over seeds 0-3 on six 2D multi-modal
            # pairs the median TRE rose 0-8 % on five, 0.008 -> 0.010 px on one)
            _set_optimizer(R, opt, learning_rate, iterations, _FINE_STOP * convergence,
                           fixed_img.GetSpacing(), max_step=_FINE_FIRST_STEP)
        else:
            _set_optimizer(R, opt, learning_rate, iterations, convergence, fixed_img.GetSpacing())
        if moving_initial is not None:
            R.SetMovingInitialTransform(moving_initial)
        R.SetInitialTransform(start, inPlace=True)
        obs = _Observer(R, progress, cancel, offset + (span - offset) * li / n,
                        (span - offset) / n, 1, int(iterations), kind,
                        level_of=lambda: 0, shown_level=(li, n))
        R.AddCommand(sitk.sitkIterationEvent, obs)
        t_stage = time.perf_counter()
        _execute(R, f_l, m_l, f"{kind} registration", obs)
        level_seconds.append(time.perf_counter() - t_stage)
        state["images"] = (f_l, m_l, fm_l, mm_l)
        if obs.stopped:
            raise _Stopped
        per_level.append(obs.levels()[0])
        state.update(metric=float(R.GetMetricValue()),
                     stop_condition=R.GetOptimizerStopConditionDescription())

    def finish():
        info.update(seconds=float(sum(level_seconds)), level_seconds=list(level_seconds),
                    metric=state["metric"], iterations=list(per_level),
                    stop_condition=state["stop_condition"], optimizer=opt)
        final = start
        if moving_initial is not None:
            final = sitk.CompositeTransform([moving_initial, start])
        return final, info

    pauses = []
    if defer == "all" and "search" in info:
        pauses.append(0)
    if defer in ("finest", "all") and n > 1:
        pauses.append(n - 1)
    # no ITK level has run at a pause at 0: the metric is the search's (on its small copy)
    state.update(metric=float(info.get("search", {}).get("metric", np.nan)),
                 stop_condition="paused before the first level (a polish follows)")
    done = [0]

    def run_to(stop):
        for li in range(done[0], stop):
            run_level(li)
        done[0] = stop
        info["levels_run"] = stop
        info["finest_level"] = "run" if stop == n else "deferred"
        if 0 < stop < n and ndim == 3:
            # on the last level run (1/8 of the voxels): cheap, and blurred, so it reads
            # higher than the polish's full-resolution |NCC| (T1 vs white-matter map 0.83,
            # T1 vs 1 - sqrt(T1) + noise 0.99 where the polish saw 0.97); below 0.9 the
            # polish would surely decline
            info["ncc_coarse"] = _ncc_through(*state["images"], finish()[0])
        return finish()

    if not pauses:
        return (*run_to(n), None)

    def resume():
        later = [p for p in pauses if p > done[0]]
        return (*run_to(later[0] if later else n), bool(later))

    return (*run_to(pauses[0]), resume)


# -------------------------------------------------------------------- deformable stages
def _bspline_stage(fixed_img, moving_img, linear_tx, *, ndim, metric, bins, optimizer,
                   learning_rate, iterations, convergence, sampling, percentages, seed, shrink,
                   sigmas, fixed_mask_img, moving_mask_img, threads, grid_spacing, mesh_size,
                   progress, cancel, start, span):
    sitk = _sitk()
    size = np.array(fixed_img.GetSize(), float)
    extent = (size - 1) * np.array(fixed_img.GetSpacing())
    if mesh_size is not None:
        mesh = np.broadcast_to(np.asarray(mesh_size, int), (ndim,))[::-1]  # napari -> ITK
    elif grid_spacing is not None:
        gs = np.broadcast_to(np.asarray(grid_spacing, float), (ndim,))[::-1]
        mesh = np.maximum(1, np.round(extent / gs)).astype(int)
    else:
        # ITK's Mattes gradient costs grow with the number of B-spline parameters:
        # measured 0.5 s per iteration for an 8^3 mesh on 5000 samples, 0.14 s for 4^3
        mesh = np.full(ndim, 8 if ndim == 2 else 4)
    mesh = [int(max(1, m)) for m in mesh]
    if ndim in (2, 3) and optimizer == "auto" and metric in ("auto", "mean_squares", "correlation"):
        out = _spline_engine(fixed_img, moving_img, linear_tx, fixed_mask_img, moving_mask_img,
                             grid_spacing=grid_spacing, mesh_size=mesh_size, extent=extent,
                             iterations=iterations, progress=progress, cancel=cancel,
                             start=start, span=span, metric=metric, threads=threads)
        if out is not None:
            return out
    tx = sitk.BSplineTransformInitializer(fixed_img, mesh, 3)
    if linear_tx is not None:
        # resample the moving image through the linear stage once, instead of passing it
        # as ITK's moving initial transform: with a composite moving transform ITK's
        # metric loses the B-spline's local support and computes dense Jacobians
        # (measured ~6x slower per iteration in 3D). The same composite results.
        ones = sitk.Image(moving_img.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(moving_img)
        valid = sitk.Resample(ones if moving_mask_img is None else moving_mask_img, fixed_img,
                              linear_tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        moving_img = sitk.Resample(sitk.Cast(moving_img, sitk.sitkFloat32), fixed_img, linear_tx,
                                   sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        moving_mask_img = valid
    R = _method(fixed_img, moving_img, metric="mattes" if metric == "auto" else metric,
                bins=bins, sampling=sampling, percentages=percentages, seed=seed, shrink=shrink,
                sigmas=sigmas, fixed_mask_img=fixed_mask_img, moving_mask_img=moving_mask_img,
                threads=threads)
    opt = "lbfgsb" if optimizer == "auto" else optimizer
    _set_optimizer(R, opt, learning_rate, iterations, convergence, fixed_img.GetSpacing())
    R.SetInitialTransform(tx, inPlace=True)
    obs = _Observer(R, progress, cancel, start, span, len(shrink), int(iterations), "bspline")
    R.AddCommand(sitk.sitkIterationEvent, obs)
    t_stage = time.perf_counter()
    _execute(R, fixed_img, moving_img, "bspline registration", obs)
    if obs.stopped:
        raise _Stopped
    info = {"seconds": time.perf_counter() - t_stage, "metric": float(R.GetMetricValue()), "iterations": obs.levels(),
            "stop_condition": R.GetOptimizerStopConditionDescription(), "optimizer": opt,
            "mesh_size": [int(m) for m in mesh[::-1]],
            "grid_spacing": (extent / np.array(mesh))[::-1].tolist()}
    return tx, info


def _spline_engine(fixed_img, moving_img, linear_tx, fixed_mask_img, moving_mask_img, *,
                   grid_spacing, mesh_size, extent, iterations, progress, cancel, start, span,
                   metric, threads=0):
    """The 2D and 3D B-spline stage by Gauss-Newton on the spline coefficients
    (:mod:`core.deform`: :func:`register_bspline` in 2D, :func:`register_bspline_3d` in
    3D); None when the images are not related by a linear intensity change (|NCC| < 0.5
    after the linear stage: ITK's mutual information then runs, so multi-modal 2D and
    3D pairs stay on ITK)."""
    from ..core.deform import register_bspline, register_bspline_3d

    sitk = _sitk()
    t_stage = time.perf_counter()
    fixed = sitk.GetArrayFromImage(fixed_img).astype(np.float64)
    nd = fixed.ndim
    ident = sitk.Transform(nd, sitk.sitkIdentity)
    tx_lin = linear_tx if linear_tx is not None else ident
    ones = sitk.Image(moving_img.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving_img)
    valid = sitk.GetArrayFromImage(sitk.Resample(
        ones if moving_mask_img is None else moving_mask_img, fixed_img, tx_lin,
        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    moving = sitk.GetArrayFromImage(sitk.Resample(
        sitk.Cast(moving_img, sitk.sitkFloat32), fixed_img, tx_lin, sitk.sitkBSpline, 0.0,
        sitk.sitkFloat32)).astype(np.float64)
    use = valid.copy()
    if fixed_mask_img is not None:
        use &= sitk.GetArrayFromImage(fixed_mask_img) > 0
    if use.sum() < 64:
        return None
    a, b = fixed[use] - fixed[use].mean(), moving[use] - moving[use].mean()
    ncc = float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-30))
    if abs(ncc) < 0.5:
        return None
    sp = np.array(fixed_img.GetSpacing(), float)[::-1]          # napari order
    ext = np.asarray(extent, float)[::-1]
    if mesh_size is not None:
        final = ext / np.broadcast_to(np.asarray(mesh_size, float), (nd,)) / sp
    elif grid_spacing is not None:
        final = np.broadcast_to(np.asarray(grid_spacing, float), (nd,)) / sp
    elif nd == 3:
        # one world spacing on every axis: the geometric mean extent over 16 (MNI T1 at
        # 3x2x2 mm: 12.4 mm, 16 x 19 x 16 cells), at least two voxels
        final = np.full(3, float(np.exp(np.mean(np.log(np.maximum(ext, 1e-9))))) / 16.0) / sp
    else:
        # 14 px: stereo_motorcycle 1.66 px TRE (12: 1.65, 18: 1.93), camera_deformable
        # 0.18 (12: 0.28, 18: 0.45); a coarser grid on big images bounds the unknowns
        final = np.full(2, max(14.0, min(fixed.shape) / 24.0))
    final = np.maximum(final, 2.0)
    fmask = None if fixed_mask_img is None else sitk.GetArrayFromImage(fixed_mask_img) > 0

    def prog(frac, msg):
        progress(start + span * frac, msg)

    if nd == 3:
        # the engine samples the moving volume on its own grid through the linear stage
        # when that stage is affine in voxel indices (one interpolation instead of two:
        # brain_deformable_3d 1.124 -> 1.064 mm TRE)
        aff = _index_affine(fixed_img, moving_img, tx_lin)
        if aff is not None:
            moving = sitk.GetArrayFromImage(moving_img).astype(np.float64)
            valid = (np.ones(moving.shape, bool) if moving_mask_img is None
                     else sitk.GetArrayFromImage(moving_mask_img) > 0)
        field, einfo = register_bspline_3d(fixed, moving, valid=valid, fixed_mask=fmask,
                                           grid_spacing=final, spacing=sp, moving_affine=aff,
                                           iterations=min(int(iterations), 20), progress=prog,
                                           cancel=cancel, threads=threads or 0)
    else:
        field, einfo = register_bspline(fixed, moving, valid=valid, fixed_mask=fmask,
                                        grid_spacing=final, iterations=min(int(iterations), 20),
                                        progress=prog, cancel=cancel)
    field_img = sitk.GetImageFromArray((field * sp)[..., ::-1].astype(np.float64), isVector=True)
    field_img.CopyInformation(fixed_img)
    tx = sitk.DisplacementFieldTransform(field_img)
    shape = np.array(fixed.shape)
    info = {"seconds": time.perf_counter() - t_stage, "metric": float(einfo["rms"]),
            "iterations": einfo["iterations"], "engine": "spline Gauss-Newton",
            "stop_condition": "step below tolerance or iteration cap per level",
            "optimizer": "gauss_newton", "levels": einfo["levels"], "ncc_linear": ncc,
            "grid_shapes": einfo["grid_shapes"],
            "mesh_size": [int(m) for m in einfo["grid_shapes"][-1]],
            "grid_spacing": ((shape - 1) * sp / np.array(einfo["grid_shapes"][-1])).tolist()}
    return tx, info


def _index_affine(fixed_img, moving_img, tx):
    """The 4 x 4 matrix taking a fixed voxel index to the moving voxel index that ``tx``
    (fixed -> moving physical points) sends it to, napari axis order; None when ``tx``
    is not affine in the indices (checked at a few other points)."""
    nd = fixed_img.GetDimension()

    def through(idx):
        p = fixed_img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx[::-1]))
        q = moving_img.TransformPhysicalPointToContinuousIndex(tx.TransformPoint(p))
        return np.array(q[::-1], float)

    size = np.array(fixed_img.GetSize(), float)[::-1]
    o = through(np.zeros(nd))
    m = np.eye(nd + 1)
    m[:nd, nd] = o
    for a in range(nd):
        e = np.zeros(nd)
        e[a] = 1.0
        m[:nd, a] = through(e) - o
    for frac in ((1.0, 0.5, 0.25), (0.3, 1.0, 0.7), (0.8, 0.2, 1.0)):
        x = (size - 1) * np.asarray(frac[:nd])
        if np.abs(through(x) - (m[:nd, :nd] @ x + m[:nd, nd])).max() > 1e-4:
            return None
    return m


def _demons_stage(fixed_img, moving_img, linear_tx, *, ndim, variant, iterations, smoothing,
                  shrink, progress, cancel, start, span, threads):
    sitk = _sitk()
    fixed32 = sitk.Cast(fixed_img, sitk.sitkFloat32)
    ident = sitk.Transform(ndim, sitk.sitkIdentity)
    warped = sitk.Resample(sitk.Cast(moving_img, sitk.sitkFloat32), fixed32,
                           linear_tx if linear_tx is not None else ident, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    filters = {
        "diffeomorphic": sitk.DiffeomorphicDemonsRegistrationFilter,
        "fast_symmetric": sitk.FastSymmetricForcesDemonsRegistrationFilter,
        "classic": sitk.DemonsRegistrationFilter,
    }
    field = None
    per_level = []
    rms = None
    for level, s in enumerate(shrink):
        if cancel():
            raise _Stopped
        if s > 1:
            sig = [0.5 * s * sp for sp in fixed32.GetSpacing()]
            f_l = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed32, sig), [int(s)] * ndim)
            m_l = sitk.Shrink(sitk.SmoothingRecursiveGaussian(warped, sig), [int(s)] * ndim)
        else:
            f_l, m_l = fixed32, warped
        if field is not None:
            field = sitk.Resample(field, f_l, ident, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        flt = filters[variant]()
        flt.SetNumberOfIterations(int(iterations))
        flt.SetStandardDeviations(float(smoothing))
        if threads is not None:
            flt.SetNumberOfThreads(int(threads))
        obs = _Observer(flt, progress, cancel, start + span * level / len(shrink),
                        span / len(shrink), 1, int(iterations), f"demons ({variant})",
                        level_of=lambda: 0, iteration_of=flt.GetElapsedIterations,
                        metric_of=flt.GetMetric, shown_level=(level, len(shrink)))
        flt.AddCommand(sitk.sitkIterationEvent, obs)
        try:
            field = flt.Execute(f_l, m_l, field) if field is not None else flt.Execute(f_l, m_l)
        except RuntimeError as err:
            if obs.stopped or cancel():
                raise _Stopped from None
            raise _translate_itk_error(err, "demons registration") from None
        if obs.stopped:
            raise _Stopped
        per_level.append(int(flt.GetElapsedIterations()))
        rms = float(flt.GetRMSChange())
        metric = float(flt.GetMetric())
    if tuple(field.GetSize()) != tuple(fixed32.GetSize()):
        field = sitk.Resample(field, fixed32, ident, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    info = {"metric": metric, "iterations": per_level, "rms_change": rms, "variant": variant,
            "stop_condition": "maximum number of iterations or RMS change below tolerance"}
    return tx, info


def _jacobian_stats(transform: Transform) -> dict:
    for step in transform.steps:
        if isinstance(step, FieldStep):
            det = step.jacobian_determinant()
            return {"min": float(det.min()), "max": float(det.max()),
                    "folded_voxels": int(np.count_nonzero(det <= 0)),
                    "mean": float(det.mean())}
    return {}


# --------------------------------------------------------------------------- backend
def _scaled(value, factor):
    """A world-unit option times ``factor`` (left as it is when it is not numbers: the
    option check then reports it)."""
    if value is None:
        return None
    try:
        return tuple(np.atleast_1d(np.asarray(value, float)) * factor)
    except (TypeError, ValueError):
        return value


def _unit_scale(fixed_spacing, moving_spacing) -> float:
    """1.0 for pixel sizes within 1e-2..1e2 (geometric mean of the fixed image's);
    otherwise the power of ten that brings them near 1."""
    mean = float(np.exp(np.mean(np.log(np.asarray(fixed_spacing, float)))))
    if 1e-2 <= mean <= 1e2:
        return 1.0
    return float(10.0 ** np.round(np.log10(mean)))


def register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress, cancel,
             fixed_mask=None, moving_mask=None,
             metric: Literal["auto", "mattes", "mean_squares", "correlation",
                             "ants_correlation"] = "auto",
             bins: int = 32,
             sampling: Literal["random", "regular", "none"] = "random",
             sampling_percentage: float | None = None,
             seed: int | None = None,
             optimizer: Literal["auto", "regular_step", "gradient_descent", "lbfgsb"] = "auto",
             learning_rate: float | None = None,
             iterations: int | None = None,
             convergence: float = 1e-3,
             shrink_factors: tuple | None = None,
             smoothing_sigmas: tuple | None = None,
             init: Literal["auto", "moments", "geometry", "none"] | Transform = "auto",
             rotation_search: bool | tuple = True,
             linear_stage: Literal["auto", "none", "translation", "rigid", "similarity",
                                   "affine"] = "auto",
             grid_spacing: float | tuple | None = None,
             mesh_size: int | tuple | None = None,
             demons: Literal["diffeomorphic", "fast_symmetric", "classic"] = "diffeomorphic",
             demons_iterations: int = 50,
             demons_smoothing: float = 2.0,
             threads: int | None = None,
             polish: bool = True, linear_copy=None) -> BackendResult:
    """Intensity-based registration with SimpleITK.

    Options
    -------
    metric : str
        "auto" (Mattes mutual information; mean squares for demons), "mattes" (works
        across contrasts), "mean_squares", "correlation", "ants_correlation".
    bins : int
        Histogram bins of Mattes mutual information.
    sampling : str
        Metric sampling: "random", "regular" or "none" (every voxel).
    sampling_percentage : float or None
        Fraction of voxels sampled per level; None: a few thousand on coarse levels and
        ~16k on the finest.
    seed : int or None
        Sampling seed: another seed draws another random sample set (a slightly
        different, equally good answer). The same inputs with the same seed give the
        identical transform: SimpleITK's sums repeat only on one thread, so a seeded run
        sets SimpleITK's process-wide default thread count to 1 while it runs (restored
        afterwards). None: the samples of seed 0; in 2D also on one thread (identical
        run to run); in 3D on every thread (faster; equal to the last digits).
    optimizer : str
        "auto" (regular-step gradient descent for linear; for B-splines in 2D and 3D
        a Gauss-Newton on the spline coefficients, :mod:`core.deform`, when the images
        are linearly related in intensity, |NCC| >= 0.5 after the linear stage, else
        ITK's L-BFGS-B on Mattes MI), "regular_step", "gradient_descent" (learning rate
        estimated each iteration), "lbfgsb" (a named optimizer keeps ITK's B-spline).
    learning_rate : float or None
        Initial step in world units (None: estimated per level, about one voxel of
        that level).
    iterations : int or None
        Maximum optimiser iterations per level (None: 200 for linear stages; for the
        B-spline stage, whose metric evaluations cost far more, 50 in 2D and 25 in 3D,
        and L-BFGS-B may evaluate the metric at most that many times per level; the 2D
        Gauss-Newton takes at most 20 steps per level, 5 above 2**17 pixels).
    convergence : float
        Regular step: stop when the step is below this fraction of a pixel; gradient
        descent: when the metric changes by less than ``convergence / 1000`` over 20
        iterations. In 2D the finest ITK level that follows coarser ones (estimated
        learning rate) starts with a quarter-pixel step and stops below 5x this: its
        start is already within a fraction of a pixel.
    shrink_factors, smoothing_sigmas : sequence or None
        Multi-resolution pyramid, coarse to fine (sigmas in pixels); None: powers of two
        until the smallest axis has ~16 pixels (at most 8), e.g. (8, 4, 2, 1) for
        512 x 512; after the coarse search, levels coarser than half its grid are skipped.
    init : "auto", "moments", "geometry", "none" or Transform
        Start: "auto" tries geometric centres and intensity centres of mass; a Transform
        (moving -> fixed, e.g. from features or landmarks) starts from it.
    rotation_search : bool or sequence of float
        Coarse multi-start over rotations (degrees) before the fine stage. True: in 2D
        a full turn (0, +-15, +-30, then every 30 degrees to 180), in 3D +-20 degrees
        about each axis; for larger 3D rotations pass angles (each tried about each
        axis), e.g. ``(-90, 90, 180)``, or use ``method="auto"``.
    linear_stage : str
        For bspline/demons: the linear stage run first ("auto" = affine, or "none").
    grid_spacing, mesh_size :
        B-spline control grid: spacing in world units or number of mesh cells per axis
        (default: 2D Gauss-Newton 14 pixels, or 1/24 of the shortest side if larger,
        refined from 8x that over 4 levels; ITK's path 8 cells per axis in 2D, 4 in 3D).
    demons : str
        "diffeomorphic" (Vercauteren et al., fold-free by construction), "fast_symmetric"
        (symmetric forces) or "classic" (Thirion).
    demons_iterations, demons_smoothing :
        Demons iterations per level and field smoothing (sigma in pixels).
    threads : int or None
        SimpleITK threads (None: SimpleITK's default in 3D; 1 in 2D and whenever
        ``seed`` is set).
    polish : bool
        Linear transforms: a final Gauss-Newton pass on a cubic-spline pyramid at full
        resolution (least squares up to a gain and offset, :mod:`core.refine`), kept
        only when the images are linearly related in intensity (|NCC| >= 0.9 after the
        ITK stage) and the residual drops; it removes most of the random-sampling
        noise of the ITK stage (3D brain rigid: ~0.03 mm -> < 0.01 mm). In 3D, images
        of different contrast (|NCC| < 0.98) get it on intensity-remapped images (one
        image's intensities replaced by the other's conditional means), so multi-modal
        results gain too (MNI T1 vs grey-matter map: ~0.1 mm -> ~0.07 mm).
        When the polish is on, the ITK linear stage first stops short (after the coarse
        search and again before its finest level; 3D affine: before its finest level
        only) and the polish is tried from there; ITK's remaining levels run only when
        it declines. ``info["stage"]``
        records ``levels_run`` and ``finest_level`` ("deferred" or "run"),
        ``info["polish"]["declined_before"]`` the attempts that declined. So with the
        polish on, options of the ITK stage (metric, optimizer, sampling, iterations)
        matter only for pairs the polish declines; ``polish=False`` (or explicit
        ``shrink_factors``) runs ITK's stage in full as configured.

    The core's ``fixed_mask`` / ``moving_mask`` become ITK metric masks (only pixels
    inside count); demons has no masks, so there they restrict its linear stage only.
    ``result.info`` holds the final metric, iterations per level, the optimiser's stop
    condition, seconds per stage, the coarse search's starts, and for deformable
    transforms the Jacobian determinant's min/max/mean and count of folded pixels.
    """
    unit = _unit_scale(fixed_spacing, moving_spacing)
    if unit != 1.0:
        # ITK's tolerances (B-spline support, optimiser steps, Gaussian sigmas) assume
        # pixel sizes near 1: register in units of `unit` and convert back
        from ..core.transform import rescale_world

        out = register(
            fixed, moving, transform=transform,
            fixed_spacing=tuple(float(v) / unit for v in fixed_spacing),
            moving_spacing=tuple(float(v) / unit for v in moving_spacing),
            progress=progress, cancel=cancel, fixed_mask=fixed_mask, moving_mask=moving_mask,
            metric=metric, bins=bins, sampling=sampling, sampling_percentage=sampling_percentage,
            seed=seed, optimizer=optimizer,
            learning_rate=None if learning_rate is None else float(learning_rate) / unit,
            iterations=iterations, convergence=convergence, shrink_factors=shrink_factors,
            smoothing_sigmas=smoothing_sigmas,
            init=rescale_world(init, 1.0 / unit) if isinstance(init, Transform) else init,
            rotation_search=rotation_search, linear_stage=linear_stage,
            grid_spacing=_scaled(grid_spacing, 1.0 / unit),
            mesh_size=mesh_size, demons=demons, demons_iterations=demons_iterations,
            demons_smoothing=demons_smoothing, threads=threads, polish=polish,
            linear_copy=linear_copy)
        info = dict(out.info, world_unit_scale=unit)
        return BackendResult(rescale_world(out.transform, unit), info, out.extras)
    sitk = _sitk()
    from ..core.itk import to_sitk_image

    t0 = time.perf_counter()
    ndim = fixed.ndim
    reached = [0.0]  # the furthest fraction reported: a polish message repeats it
    report = progress

    def progress(fraction, message):
        reached[0] = max(reached[0], float(fraction))
        report(fraction, message)
    _check_options(transform, ndim, metric, optimizer, sampling, sampling_percentage, init,
                   seed, demons, bins, iterations, shrink_factors, smoothing_sigmas, linear_stage,
                   grid_spacing, mesh_size)
    if isinstance(init, Transform) and init.ndim != ndim:
        raise ValueError(f"init is a {init.ndim}D transform but the images are {ndim}D")
    # the metric's random samples are drawn with a seed in every run: ``seed``, or a fixed
    # default, so the same inputs give the same answer (round 4 of issue #15; before, an
    # unseeded run drew new samples each time: ihc_multimodal 0.035-0.052 px run to run).
    # SimpleITK's multi-threaded metric sums in a varying order, which moved 2D results by
    # up to ~1e-5 of a matrix entry between runs with the same samples: a given seed, and
    # the default in 2D, run single-threaded (bit-identical); 3D keeps every thread by
    # default (its same-sample runs agreed to ~1e-8 in the measurements; see the docstring)
    sample_seed = _DEFAULT_SEED if seed is None else int(seed)
    if seed is not None or (ndim == 2 and threads is None):
        threads = 1

    fixed_img = to_sitk_image(np.ascontiguousarray(fixed, np.float32), fixed_spacing)
    moving_img = to_sitk_image(np.ascontiguousarray(moving, np.float32), moving_spacing)
    f_mask = None if fixed_mask is None else to_sitk_image(fixed_mask.astype(np.uint8), fixed_spacing)
    m_mask = None if moving_mask is None else to_sitk_image(moving_mask.astype(np.uint8), moving_spacing)

    shrink, sigmas = _auto_levels(fixed.shape, shrink_factors, smoothing_sigmas)
    # 2D: up to 65k samples on the finest level (every pixel of a 256^2 image): with
    # ~16k the random sample set alone moved multi-modal results by 0.02-0.05 px
    # (MNI T1 vs grey matter slice: 0.022-0.049 px over 3 seeds; every pixel: 0.006)
    percentages = _auto_percentages(fixed.shape, shrink, sampling_percentage,
                                    target=(4000, 65536 if ndim == 2 else 16000))
    info: dict = {"shrink_factors": shrink, "smoothing_sigmas": sigmas,
                  "sampling": sampling, "sampling_percentages": percentages,
                  "seed": seed, "sampling_seed": sample_seed,
                  "threads": threads or sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}
    common = dict(metric=metric, bins=bins, sampling=sampling, percentages=percentages,
                  seed=sample_seed, fixed_mask_img=f_mask, moving_mask_img=m_mask, threads=threads)

    # SimpleITK's random sampling repeats only on one thread: the method's own
    # SetNumberOfThreads does not reach every filter it runs (measured: runs differed),
    # so a seeded run sets the process-wide default and restores it afterwards
    # with a polish to follow, the ITK linear stage pauses: the polish's Gauss-Newton
    # pass at full resolution replaces the rest whenever it is accepted (same-contrast
    # pairs), and the rest runs only when the polish declines. It pauses right after the
    # coarse search (the polish then starts on its own coarser levels, and a decline
    # there costs ~5 ms in 2D, a block-mean pyramid and one interpolation in 3D) and
    # again before the finest level; 3D affine only before the finest (_defer_mode)
    defer = None
    if polish and transform in LINEAR and shrink_factors is None:
        defer = _defer_mode(ndim, transform)
    with _global_threads(sitk, threads):
        result, resume = _run(sitk, fixed, moving, fixed_img, moving_img, transform=transform, ndim=ndim,
                    init=init, rotation_search=rotation_search, optimizer=optimizer,
                    learning_rate=learning_rate, iterations=iterations,
                    convergence=convergence, shrink_factors=shrink_factors, shrink=shrink,
                    sigmas=sigmas, percentages=percentages, metric=metric, common=common,
                    sampling_percentage=sampling_percentage,
                    info=info, linear_stage=linear_stage, grid_spacing=grid_spacing,
                    mesh_size=mesh_size, demons=demons, demons_iterations=demons_iterations,
                    demons_smoothing=demons_smoothing, threads=threads, progress=progress,
                    cancel=cancel, t0=t0, defer=defer)
    # 2D: the polish runs on the core's linear copy when it made one (see LINEAR_COPY)
    polish_pair = (tuple(linear_copy) if linear_copy is not None and ndim == 2
                   else (fixed, moving))
    declined = []
    more = resume is not None
    while more:
        stage = result.info["stage"]
        # after the search alone the start may be off by about one search cell: the
        # polish gets pyramid levels for that; after ITK levels, 2 px
        err_px = 2.0
        if stage.get("levels_run") == 0:
            err_px = max(2.0, stage["search"]["spacing"] / float(min(fixed_spacing)))
        if stage.get("ncc_coarse", 1.0) < 0.9:
            # 3D, clearly not linearly related (the plain polish needs |NCC| 0.98 at full
            # resolution): skip an attempt that would decline. A wrong guess costs time
            # only: the finest level and the full polish follow either way
            declined.append({"accepted": False, "itk_levels_run": stage.get("levels_run"),
                             "reason": f"skipped: |NCC| {stage['ncc_coarse']:.3f} < 0.9 on "
                                       "the last ITK level"})
            with _global_threads(sitk, threads):
                result, more = resume()
            continue
        if ndim == 2 and _clearly_declined(declined):
            declined.append(_skip_record(declined, stage))
            with _global_threads(sitk, threads):
                result, more = resume()
            continue
        progress(reached[0], f"polish: Gauss-Newton on a cubic-spline pyramid, full resolution "
                             f"last (after {stage.get('levels_run')} of "
                             f"{len(stage['shrink_factors'])} ITK levels)")
        polished = _polish(result, *polish_pair, transform, fixed_spacing, moving_spacing,
                           fixed_mask, moving_mask, cancel, remap=False, start_error_px=err_px)
        if polished.info["polish"].get("accepted"):
            if declined:
                polished.info["polish"]["declined_before"] = declined
            if stage.get("levels_run") == 0:  # the polish made the result: say so
                polished.info.update(iterations=list(polished.info["polish"].get("iterations") or []),
                                     stop_condition="Gauss-Newton polish after the coarse "
                                     f"search: {polished.info['polish'].get('reason')}")
            progress(1.0, "done")
            return polished
        declined.append(dict(polished.info["polish"], itk_levels_run=stage.get("levels_run")))
        with _global_threads(sitk, threads):
            result, more = resume()
    if polish and transform in LINEAR and ndim == 2 and _clearly_declined(declined):
        # 2D: the images were clearly not linearly related after ITK's coarser levels;
        # the finest level moves the result by a fraction of a pixel, which does not
        # bring |NCC| up to the polish's 0.9: the last attempt would decline too
        skip = _skip_record(declined, result.info["stage"])
        result.info["polish"] = {"accepted": False, "reason": skip["reason"],
                                 "declined_before": declined}
    elif polish and transform in LINEAR:
        result = _polish(result, *polish_pair, transform, fixed_spacing, moving_spacing,
                         fixed_mask, moving_mask, cancel)
        if declined:
            result.info["polish"]["declined_before"] = declined
    return result


# a 2D polish attempt after one or more ITK levels that declined at |NCC| below this is
# not tried again later in the same run (the polish needs 0.9; ITK's remaining levels
# move the result by well under a pixel: ihc_multimodal 0.37 after the search, 0.28 after
# two levels). Attempts after the search alone are not counted:
# there the start may be a search cell (~8 px) off, and a same-contrast pair can read low
_SKIP_NCC = 0.8


def _clearly_declined(declined) -> bool:
    for d in declined:
        ncc = d.get("ncc_start")
        if (not d.get("accepted") and (d.get("itk_levels_run") or 0) >= 1
                and ncc is not None and ncc < _SKIP_NCC):
            return True
    return False


def _skip_record(declined, stage) -> dict:
    ncc = min(d["ncc_start"] for d in declined if d.get("ncc_start") is not None)
    return {"accepted": False, "itk_levels_run": stage.get("levels_run"),
            "reason": f"skipped: an earlier attempt after ITK levels declined at |NCC| "
                      f"{ncc:.2f} < {_SKIP_NCC}"}


def _polish(result, fixed, moving, transform, fixed_spacing, moving_spacing, fixed_mask,
            moving_mask, cancel, remap=True, start_error_px=2.0):
    """Final Gauss-Newton pass (see the ``polish`` option); the ITK result when declined.
    3D images related by a non-linear or many-to-one intensity change get it on
    intensity-remapped images instead (:func:`_remapped_polish`)."""
    from ..core.refine import refine_linear

    t = time.perf_counter()
    # 3D affine: 2**16 random samples of all non-flat voxels. Refine's default, the
    # stronger-gradient half, biased the 12-parameter fit whatever its subset (evenly
    # spread or random, 2**15 to 2**17: MNI T1 3x2x2 mm 0.076 mm); every non-flat voxel
    # (the former cap of 2**19 took all ~260k) or 2**16 random ones of them: 0.033-0.036,
    # the latter at a quarter of the cost. Rigid keeps the strong half: 2**15 random
    # samples of all were worse there (MNI brain, 4 motions: up to 2x the TRE)
    affine3d = fixed.ndim == 3 and transform == "affine"
    max_samples = 2 ** 16 if affine3d else None
    levels = None
    if fixed.ndim == 3:
        from ..core.refine import auto_levels

        levels = auto_levels(tuple(min(a, b) for a, b in zip(fixed.shape, moving.shape)),
                             start_error_px, min_side=_MIN_SIDE_3D)

    def plain(min_ncc):
        try:
            return refine_linear(fixed, moving, result.transform, model=transform,
                                 fixed_spacing=fixed_spacing, moving_spacing=moving_spacing,
                                 fixed_mask=fixed_mask, moving_mask=moving_mask,
                                 start_error_px=start_error_px, min_ncc=min_ncc, cancel=cancel,
                                 max_samples=max_samples, levels=levels,
                                 samples="random" if affine3d else "strong")
        except (ValueError, np.linalg.LinAlgError) as err:
            return result.transform, {"accepted": False, "reason": f"failed: {err}"}

    # 3D, below |NCC| 0.98 (at the start): the images are remapped first, then the same
    # pass runs (ITK's mutual information saw ~16k sampled voxels there; the remapped
    # pass averages that noise away). 2D keeps ITK's result or the plain pass: ITK's
    # finest level uses every pixel up to 65k, and remapping was not reliably better
    # (MNI slice T1 vs grey matter: 0.006 px from ITK, 0.017 remapped; moon with
    # 1 - I^2 + noise: worse in 3 of 3 noise levels, with 1 - sqrt(I): better in 2 of 3)
    out, rinfo = plain(0.98 if fixed.ndim == 3 else 0.9)
    ncc = rinfo.get("ncc_start")
    remapped = None
    if (remap and fixed.ndim == 3 and not rinfo.get("accepted")
            and str(rinfo.get("reason", "")).startswith("declined")
            and ncc is not None and not (cancel is not None and cancel())):
        out, remapped = _remapped_polish(fixed, moving, result.transform, transform,
                                         fixed_spacing, moving_spacing, fixed_mask,
                                         moving_mask, cancel)
        if remapped.get("accepted"):
            rinfo = dict(remapped, reason="converged on remapped intensities")
        elif ncc >= 0.9:  # as before the remapped pass existed
            out, rinfo = plain(0.9)
    info = dict(result.info)
    info["polish"] = {k: v for k, v in rinfo.items() if k in
                      ("accepted", "reason", "iterations", "levels", "rms_start", "rms", "ncc",
                       "ncc_start")}
    if remapped is not None:
        info["polish"]["remapped"] = remapped
    info["polish"]["seconds"] = time.perf_counter() - t
    return BackendResult(out, info)


def _intensity_map(source, target, bins=64, min_count=5):
    """Conditional means of ``target`` in ``bins`` equal-width bins of ``source`` (1D
    arrays of paired samples) as a piecewise-linear function, and the correlation ratio
    eta^2 = 1 - E[Var(target | source)] / Var(target) (1: target is a function of
    source)."""
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    lo, hi = float(source.min()), float(source.max())
    width = (hi - lo) / bins if hi > lo else 1.0
    k = np.clip(((source - lo) / width).astype(np.int64), 0, bins - 1)
    count = np.bincount(k, minlength=bins)
    total = np.bincount(k, target, minlength=bins)
    mean = total / np.maximum(count, 1)
    within = float(np.bincount(k, (target - mean[k]) ** 2, minlength=bins).sum())
    spread = float(target.var()) * target.size
    eta2 = 1.0 - within / spread if spread > 0 else 0.0
    good = count >= min_count
    centres = lo + (np.flatnonzero(good) + 0.5) * width
    values = mean[good]

    def apply(a):
        return np.interp(np.asarray(a, np.float64), centres, values).astype(np.float32)

    return apply, eta2


def _remapped_polish(fixed, moving, start, transform, fixed_spacing, moving_spacing,
                     fixed_mask, moving_mask, cancel):
    """Gauss-Newton pass on images made linearly related: with the moving image warped
    through ``start``, the fixed image's intensities are replaced by the mean moving
    intensity seen at each (or the other way round, whichever direction predicts better
    by the correlation ratio), then :func:`core.refine.refine_linear` runs as for one
    contrast. Removes most of the sampling noise of ITK's mutual information in 3D (MNI
    T1 vs grey-matter map, 3x2x2 mm, rigid: 0.09-0.13 mm -> 0.064-0.072 mm over 6 seeds).
    Returns (transform, record); the start when declined."""
    from ..core.refine import refine_linear
    from ..core.resample import resample

    rec: dict = {"accepted": False}
    geom = dict(output_spacing=fixed_spacing, input_spacing=moving_spacing)
    try:
        # NaN outside the moving image marks the overlap (no second resampling)
        warped = resample(np.asarray(moving, np.float32), start, fixed.shape, order=1,
                          cval=np.nan, **geom)
        ok = np.isfinite(warped)
        if moving_mask is not None:
            ok &= resample(np.asarray(moving_mask, bool), start, fixed.shape, labels=True, **geom)
        if fixed_mask is not None:
            ok &= np.asarray(fixed_mask, bool)
        idx = np.flatnonzero(ok)
        if idx.size < 1000:
            rec["reason"] = "too little overlap to map intensities"
            return start, rec
        if idx.size > 2 ** 18:  # plenty for 64 conditional means
            idx = idx[np.random.default_rng(0).choice(idx.size, 2 ** 18, replace=False)]
        f_ok, w_ok = np.asarray(fixed, np.float32).ravel()[idx], warped.ravel()[idx]
        to_moving, eta_f = _intensity_map(f_ok, w_ok)   # moving ~ g(fixed)
        to_fixed, eta_m = _intensity_map(w_ok, f_ok)    # fixed ~ h(moving)
        if eta_f >= eta_m:
            f2, m2, rec["remapped"] = to_moving(fixed), moving, "fixed"
        else:
            f2, m2, rec["remapped"] = fixed, to_fixed(moving), "moving"
        rec["correlation_ratio"] = max(eta_f, eta_m)
        out, rinfo = refine_linear(f2, m2, start, model=transform,
                                   fixed_spacing=fixed_spacing, moving_spacing=moving_spacing,
                                   fixed_mask=fixed_mask, moving_mask=moving_mask,
                                   start_error_px=2.0, min_ncc=0.5, cancel=cancel,
                                   max_samples=2 ** 19 if fixed.ndim == 3 and transform == "affine" else None)
    except (ValueError, np.linalg.LinAlgError) as err:
        rec["reason"] = f"failed: {err}"
        return start, rec
    rec.update({k: v for k, v in rinfo.items() if k in
                ("accepted", "reason", "iterations", "rms_start", "rms", "ncc")})
    return out, rec


# registrations running at the same time in threads share SimpleITK's process-wide
# thread count: the first override saves the original, the last one to finish restores
# it (a plain save/restore per call leaked the override: run A saved 2 and set 1, run B
# saved 1, A restored 2, B restored 1 -> the process stayed single-threaded)
_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "saved": None}


class _global_threads:
    def __init__(self, sitk, threads):
        self.sitk, self.threads = sitk, threads

    def __enter__(self):
        if self.threads is None:
            return self
        with _THREADS_LOCK:
            if _THREADS_STATE["users"] == 0:
                _THREADS_STATE["saved"] = self.sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            _THREADS_STATE["users"] += 1
            self.sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(self.threads))
        return self

    def __exit__(self, *exc):
        if self.threads is None:
            return False
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                self.sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_THREADS_STATE["saved"])
        return False


def _run(sitk, fixed, moving, fixed_img, moving_img, *, transform, ndim, init, rotation_search,
         optimizer, learning_rate, iterations, convergence, shrink_factors, shrink, sigmas,
         percentages, metric, common, info, sampling_percentage, linear_stage, grid_spacing, mesh_size, demons,
         demons_iterations, demons_smoothing, threads, progress, cancel, t0, defer=None):
    """Runs the ITK stages; returns (BackendResult, resume). ``resume`` is None unless
    ``defer`` paused the linear stage (see :func:`_linear_stage`); then ``resume()`` runs
    it on to its next pause or end and returns (BackendResult, more)."""
    from ..core.itk import from_sitk_transform

    deformable = transform in ("bspline", "demons")
    kind = transform
    if deformable:
        kind = "affine" if linear_stage == "auto" else linear_stage
    try:
        linear_tx = None
        resume = None
        lin_span = 0.4 if deformable else 1.0
        if kind != "none":
            linear_tx, lin_info, resume = _linear_stage(
                kind, fixed_img, moving_img, ndim=ndim, init=init,
                rotation_search=rotation_search, optimizer="auto" if deformable else optimizer,
                learning_rate=None if deformable else learning_rate,
                iterations=200 if deformable or iterations is None else iterations,
                convergence=1e-3 if deformable else convergence,
                shrink=shrink, sigmas=sigmas, progress=progress, cancel=cancel, span=lin_span,
                trim_levels=shrink_factors is None, defer=None if deformable else defer,
                **{k: v for k, v in common.items() if k not in ("metric",)},
                metric="mattes" if (metric == "auto" or transform == "demons") and metric != "mean_squares" else metric)
            info["linear" if deformable else "stage"] = lin_info
        elif isinstance(init, Transform):
            from ..core.itk import to_sitk_transform

            linear_tx = to_sitk_transform(init)
        if transform == "bspline":
            def_shrink = shrink[-min(len(shrink), 2 if shrink_factors is None else 3):]
            def_sigmas = sigmas[-len(def_shrink):]
            # B-spline metric gradients cost ~10x a rigid one per sample: fewer samples
            def_pct = _auto_percentages(fixed.shape, def_shrink, sampling_percentage,
                                        target=(4000, 8000 if ndim == 3 else 16000))
            tx, def_info = _bspline_stage(
                fixed_img, moving_img, linear_tx, ndim=ndim, optimizer=optimizer,
                learning_rate=learning_rate,
                iterations=(50 if ndim == 2 else 25) if iterations is None else iterations,
                convergence=convergence, shrink=def_shrink, sigmas=def_sigmas, grid_spacing=grid_spacing,
                mesh_size=mesh_size, progress=progress, cancel=cancel, start=lin_span,
                span=1 - lin_span, **{**common, "percentages": def_pct})
        elif transform == "demons":
            def_shrink = shrink[-min(len(shrink), 3):]
            tx, def_info = _demons_stage(
                fixed_img, moving_img, linear_tx, ndim=ndim, variant=demons,
                iterations=demons_iterations, smoothing=demons_smoothing, shrink=def_shrink,
                progress=progress, cancel=cancel, start=lin_span, span=1 - lin_span,
                threads=threads)
        else:
            tx, def_info = linear_tx, None
    except _Stopped:
        raise RegistrationCancelled("registration cancelled") from None

    def result_of(tx, def_info, done=True):
        if deformable:
            final = tx if linear_tx is None else sitk.CompositeTransform([linear_tx, tx])
            info["deformable"] = def_info
            info.update(metric=def_info["metric"], iterations=def_info["iterations"],
                        stop_condition=def_info["stop_condition"])
        else:
            final = tx
            info.update(metric=info["stage"]["metric"], iterations=info["stage"]["iterations"],
                        stop_condition=info["stage"]["stop_condition"])
        result = from_sitk_transform(final, ndim=ndim, reference=fixed_img)
        if deformable:
            info["jacobian_determinant"] = _jacobian_stats(result)
        info["sitk_seconds"] = time.perf_counter() - t0
        if done:
            progress(1.0, "done")
        return BackendResult(result, dict(info))

    if resume is None:
        return result_of(tx, def_info), None

    spent = {}

    def run_on():
        t1 = time.perf_counter()
        try:
            tx2, lin_info2, more = resume()
        except _Stopped:
            raise RegistrationCancelled("registration cancelled") from None
        info["stage"] = lin_info2
        out = result_of(tx2, None, done=not more)
        spent["sitk"] += time.perf_counter() - t1
        out.info["sitk_seconds"] = info["sitk_seconds"] = spent["sitk"]
        return out, more

    first = result_of(tx, def_info, done=False)
    spent["sitk"] = info["sitk_seconds"]
    return first, run_on
