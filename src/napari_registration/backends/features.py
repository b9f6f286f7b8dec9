"""Feature backend: OpenCV keypoints (ORB, SIFT, AKAZE, BRISK), descriptor matching
(brute force or FLANN, Lowe's ratio test, optional cross-check) and a robust model fit
(RANSAC, MAGSAC++ or LMedS) refined by least squares on the inliers. 2D only.

Conventions pinned here (and tested):

* OpenCV reports a keypoint as ``(x, y)`` = (column, row) in pixels. napari uses
  ``(row, col)``; :func:`xy_to_rowcol` is the one place that swaps the axes, and
  :func:`keypoints_to_world` is the one place that applies the spacing
  (world = index * spacing; the core adds origins).
* Every model is fitted to world points (moving world -> fixed world, napari order), so
  anisotropic pixels and different pixel sizes in the two images are respected. OpenCV's
  estimators see (row, col) points scaled by one number (the fixed image's smallest
  pixel side), so the RANSAC threshold stays in fixed pixels and the numbers stay near 1.
* Anisotropic images are detected on a copy resampled to square pixels
  (:func:`square_pixels`), so descriptors see undistorted shapes.
* Failures are :class:`RegistrationError` naming the counts and what to try; a fit that
  is degenerate (collinear inliers, a homography sending the image to infinity, a mirror,
  an absurd scale) is reported, not returned; ``cv2.error`` never escapes.
"""

from __future__ import annotations

from typing import Literal

import contextlib
import threading
import time

import numpy as np

from ..core.parallel import n_workers, run_all, spare_cores, split
from ..core.preprocess import prepare_uint8
from ..core.register import BackendResult, RegistrationCancelled, RegistrationError
from ..core.transform import Transform

TRANSFORMS = ("translation", "rigid", "similarity", "affine", "homography")
NDIMS = (2,)
DESCRIPTION = ("OpenCV keypoints (SIFT, ORB, AKAZE, BRISK) matched and fitted robustly "
               "(RANSAC/MAGSAC/LMedS): large motions, perspective; 2D")

# the core hands this backend its 0.5/99.5-percentile stretch as uint8 (what the
# detectors read), made in one pass, instead of a float32 image to convert here
UINT8_INPUT = True
# ... and makes that stretch itself, in each image's detection thread (the core passes its
# finite float32 grey images with stretch_uint8=True): one image's stretch then overlaps
# the other's detection instead of both running before either detection starts
UINT8_STRETCH = True
# ... and, where an image has an 8-bit scale of its own (uint8, or floating point within
# [0, 1]: the core passes uint8_native), ORB detects on that scale unless FAST (ORB's
# corner test, same threshold) finds fewer than NATIVE_MIN_CORNERS corners there at full
# resolution (~6 % of an ORB detection's time, benchmarks/bench_orb_scale.py); then it
# detects on the stretch. ORB's FAST threshold
# is in grey levels (20), so a stretch acts as a lower threshold: on the moon photograph
# (0.5-99.5 percentiles 29..158 of 255, a gain of ~2) ORB found 1908 keypoints on the
# stretched image against 680 on its own scale, at the same TRE (0.073 px), and the
# extra keypoints cost ~1.4x the time of detection and matching. A dim image still
# needs the stretch: the retina's own scale gives 70 FAST corners (ORB: 371 keypoints,
# TRE 0.18 px against 0.09 stretched). The photographs of the report give 299-2888 on
# their own scale; 200 was picked between the two kinds. SIFT, AKAZE and BRISK always
# detect on the stretch (measured for ORB only; SIFT's precision grows with its keypoints)
UINT8_NATIVE = True
NATIVE_DETECTORS = ("orb",)
NATIVE_MIN_CORNERS = 200
# OpenCV's default FAST threshold of ORB (grey levels): the detector's and the corner count's
ORB_FAST_THRESHOLD = 20

DETECTORS = ("sift", "orb", "akaze", "brisk")
MATCHERS = ("auto", "bf", "flann")
ESTIMATORS = ("ransac", "usac_magsac", "lmeds")
# point pairs that determine each model
MIN_POINTS = {"translation": 1, "rigid": 2, "similarity": 2, "affine": 3, "homography": 4}
# above this many descriptor comparisons, matcher="auto" uses FLANN instead of brute
# force (measured on 1 MP photos, 2 cores: FLANN k-d trees beat brute-force L2 from ~2000
# SIFT keypoints per image, LSH beats brute-force Hamming from ~4000 binary ones, with
# the same number of matches within 1%)
_AUTO_FLANN_PAIRS = {"float": 2000 * 2000, "binary": 4000 * 4000}

# fixed + moving pixels up to which both images are detected at once (two threads): the
# detectors' memory (SIFT ~230 bytes per pixel) then stays at what one tiled image needs
CONCURRENT_DETECT_PIXELS = 2 * 1024 * 1024
# SIFT's pyramids take ~230 bytes per pixel: both at once only up to about what one
# tile of detect_tiled holds (1.5 x 1024^2), so its peak stays at one tile's
CONCURRENT_SIFT_PIXELS = 1_600_000

_SIMPLER = {"homography": "transform='affine' or 'similarity'",
            "affine": "transform='similarity' or 'rigid'", "similarity": "transform='rigid'",
            "rigid": "transform='translation'"}


def _advice(detector: str) -> str:
    """What to try when matching fails, without suggesting the detector already used."""
    others = " or ".join(f"detector={d!r}" for d in ("sift", "akaze", "orb") if d != detector)
    return (f"try {others}, more keypoints (n_features) or a lower threshold, "
            "equalize='clahe', masks around the shared region, or method='intensity'")


# ----------------------------------------------------------------- conventions
def xy_to_rowcol(xy) -> np.ndarray:
    """OpenCV ``(x, y)`` pixel positions -> napari ``(row, col)`` indices, as (N, 2) floats.

    OpenCV's x runs along columns and y along rows, and a keypoint at ``(x, y)`` sits on
    array element ``[y, x]``; both use pixel centres at integers, so no half-pixel shift.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return xy[:, ::-1].copy()


def keypoints_to_world(xy, spacing) -> np.ndarray:
    """OpenCV ``(x, y)`` pixel positions -> napari world ``(row, col)`` (zero origin)."""
    return xy_to_rowcol(xy) * np.asarray(spacing, dtype=np.float64)


def to_uint8(image, mask=None) -> np.ndarray:
    """A grey image as uint8 for OpenCV's detectors.

    Images in [0, 1] (what the core hands over) are scaled by 255; anything else (e.g.
    ``normalize=False`` with raw intensities) is first rescaled by its 0.5/99.5
    percentiles (inside ``mask`` if given). NaNs become 0."""
    a = np.asarray(image, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if 0.0 <= lo and hi <= 1.0:
        # the core's [0, 1] images (NaN or inf would have failed the test): the values
        # below in three passes instead of six; x * 255 + 0.5 <= 255.5 truncates to 255
        out = np.multiply(a, np.float32(255.0))
        out += np.float32(0.5)
        return out.astype(np.uint8)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
        lo, hi = float(a.min()), float(a.max())
    del finite
    offset, gain = 0.0, 255.0
    if lo < 0.0 or hi > 1.0:
        sample = a[mask] if mask is not None and mask.any() else a
        lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
        offset, gain = (lo, 255.0 / (hi - lo)) if hi > lo else (0.0, 0.0)
    # in blocks of rows: float temporaries of a few MB instead of two image-sized ones
    out = np.empty(a.shape, dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, int(np.prod(a.shape[1:]))))
    for r in range(0, a.shape[0], rows):
        block = (a[r:r + rows] - np.float32(offset)) * np.float32(gain) + np.float32(0.5)
        out[r:r + rows] = np.clip(block, 0, 255)
    return out


def native_uint8(image, gain: float) -> np.ndarray:
    """A finite, non-negative grey image on its own 8-bit scale: ``image * gain`` rounded
    to the nearest integer (ties to even, as np.rint) and clipped to 0..255 (gain 1 for
    a uint8 image's grey values, 255 for an image in [0, 1]). One OpenCV pass
    (convertScaleAbs; the values are >= 0, so its absolute value changes nothing): 0.44x
    the time of numpy's four passes on 704^2, one thread (benchmarks/bench_orb_scale.py)."""
    import cv2

    with _cv2_errors("8-bit conversion"):
        return cv2.convertScaleAbs(np.asarray(image, dtype=np.float32), alpha=float(gain))


def count_corners(image_u8, mask=None, threshold=None) -> int:
    """FAST corners (ORB's test: 9 of 16, non-maximum suppression, ORB's threshold) in a
    uint8 image at full resolution, inside ``mask`` if given."""
    import cv2

    fast = cv2.FastFeatureDetector_create(
        threshold=ORB_FAST_THRESHOLD if threshold is None else int(threshold))
    with _cv2_errors("FAST corners"):
        return len(fast.detect(image_u8, _cv_mask(mask)))


def _cv_mask(mask):
    """A boolean mask as OpenCV's detectors take it (uint8, 255 inside), or None."""
    return None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8) * 255


def _square_shape(shape, spacing, tolerance: float = 1.05) -> tuple[int, ...] | None:
    """Shape of :func:`square_pixels`' result for an image of ``shape``, or None when its
    pixels are square within ``tolerance`` (the image is used as it is)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() / spacing.min() <= tolerance:
        return None
    ratio = spacing / float(spacing.min())  # >= 1: how many new pixels per old one, per axis
    return tuple(int(np.floor((n - 1) * r + 1e-9)) + 1 for n, r in zip(shape, ratio))


def _square_size(shape, spacing) -> int:
    """Pixels of :func:`square_pixels`' result for an image of ``shape`` (no resampling)."""
    square = _square_shape(shape, spacing)
    return int(np.prod(shape if square is None else square, dtype=float))


def square_pixels(image, spacing, mask=None, tolerance: float = 1.05):
    """Resample an image with anisotropic pixels onto square pixels of its smallest side,
    so that descriptors see undistorted shapes: ``(image, mask, new_spacing)``.

    Index ``j`` of the result sits at world ``j * new_spacing`` (like index ``i`` of the
    input at ``i * spacing``): keypoints found on it convert to world with
    :func:`keypoints_to_world` and ``new_spacing``. Images whose pixels are square within
    ``tolerance`` are returned unchanged."""
    import cv2

    spacing = np.asarray(spacing, dtype=np.float64)
    shape = _square_shape(image.shape, spacing, tolerance)
    if shape is None:
        return image, mask, spacing
    side = float(spacing.min())
    ratio = spacing / side
    if max(shape) > 32767 or np.prod(shape, dtype=float) > max(2 ** 24, 4 * image.size):
        # OpenCV cannot warp beyond 32767 px per side, and such a stretch is almost
        # surely a spacing in the wrong units
        raise ValueError(
            f"pixels of {float(spacing.max() / side):.3g}:1 aspect ratio (spacing "
            f"{spacing.tolist()}) would make a {shape} image on square pixels; check the "
            "spacing units, or pass isotropic=False to detect on the pixels as they are")
    # pull-back in OpenCV (x, y): input index = output index / ratio
    m_xy = np.array([[1 / ratio[1], 0.0, 0.0], [0.0, 1 / ratio[0], 0.0]])
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    with _cv2_errors("resampling to square pixels"):
        out = cv2.warpAffine(np.ascontiguousarray(image), m_xy, shape[::-1], flags=flags,
                             borderMode=cv2.BORDER_REPLICATE)
        # cubic interpolation overshoots at edges: keep the input's range (e.g. [0, 1])
        out = np.clip(out, np.min(image), np.max(image))
        if mask is not None:
            mask = cv2.warpAffine(np.ascontiguousarray(mask, dtype=np.uint8), m_xy, shape[::-1],
                                  flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) > 0
    return out, mask, np.full(2, side)


# -------------------------------------------------------------------- OpenCV calls
@contextlib.contextmanager
def _cv2_errors(stage: str):
    """Turn OpenCV's exceptions into RegistrationError that says which stage failed."""
    import cv2

    try:
        yield
    except cv2.error as err:
        msg = str(err).strip().splitlines()
        detail = msg[-1] if msg else repr(err)
        raise RegistrationError(f"OpenCV failed while {stage}: {detail}; {_advice('')}") from None


def _make_detector(detector: str, n_features: int, threshold):
    import cv2

    n = int(n_features)
    if detector == "sift":
        return cv2.SIFT_create(nfeatures=max(n, 0),
                               contrastThreshold=0.04 if threshold is None else float(threshold),
                               enable_precise_upscale=True)
    if detector == "orb":
        return cv2.ORB_create(nfeatures=n if n > 0 else 100_000,
                              fastThreshold=ORB_FAST_THRESHOLD if threshold is None else int(threshold))
    if detector == "akaze":
        return cv2.AKAZE_create(threshold=0.001 if threshold is None else float(threshold),
                                max_points=n if n > 0 else -1)
    if detector == "brisk":
        return cv2.BRISK_create(thresh=30 if threshold is None else int(threshold))
    raise ValueError(f"detector must be one of {DETECTORS}; got {detector!r}")  # pragma: no cover


def detect(image_u8, mask, detector: str, n_features: int, threshold=None, *,
           with_response: bool = False):
    """Keypoints and descriptors of one uint8 image: ``(xy, descriptors)`` with ``xy``
    (N, 2) in OpenCV pixel ``(x, y)`` (convert with :func:`keypoints_to_world`) and
    ``descriptors`` None when nothing was found. ``mask`` (bool, image shape) limits
    where keypoints are taken. ``with_response``: also each keypoint's detector
    response (strength), as a third value."""
    det = _make_detector(detector, n_features, threshold)
    kps, desc = _detect_and_describe(det, image_u8, _cv_mask(mask), detector, n_features)
    if not kps or desc is None:
        return (np.empty((0, 2)), None) + ((np.empty(0),) if with_response else ())
    import cv2

    xy = np.asarray(cv2.KeyPoint_convert(kps), dtype=np.float64).reshape(-1, 2)
    if with_response:
        return xy, desc, np.fromiter((k.response for k in kps), np.float64, len(kps))
    return xy, desc


def _detect_and_describe(det, image_u8, cv_mask, detector: str, budget: int):
    """OpenCV keypoints and descriptors of one image (or tile), at most ``budget``."""
    with _cv2_errors(f"detecting {detector} keypoints"):
        if detector == "brisk" and budget > 0:
            # BRISK has no feature budget: keep the strongest responses, then describe
            kps = det.detect(image_u8, cv_mask)
            if len(kps) > budget:
                kps = sorted(kps, key=lambda k: -k.response)[:budget]
            return det.compute(image_u8, kps)
        return det.detectAndCompute(image_u8, cv_mask)


def detect_tiled(image_u8, mask, detector: str, n_features: int, threshold=None, *,
                 tile_size: int = 1024, margin: int = 64, stop=None,
                 with_response: bool = False):
    """:func:`detect` on an image of any size with bounded memory: OpenCV's detectors
    build float pyramids (SIFT: ~230 bytes per input pixel, since it doubles the image
    first), so an image larger than ~1.5 tiles is cut into ``tile_size`` squares, each
    detected with ``margin`` pixels of context; a keypoint is kept by the tile whose core
    holds it, and the strongest ``n_features`` of all tiles are returned. Locations are
    full-resolution ones (no precision is lost); features larger than a tile are not
    found. ``stop()`` is called between tiles (cancel)."""
    h, w = image_u8.shape
    tile = int(tile_size)
    if tile <= 0 or h * w <= 1.5 * tile * tile:
        return detect(image_u8, mask, detector, n_features, threshold, with_response=with_response)
    import cv2

    det_all = []
    n_tiles = int(np.ceil(h / tile)) * int(np.ceil(w / tile))
    # each tile may keep twice its share of the budget: strong features cluster
    per_tile = 0 if n_features <= 0 else int(np.ceil(2 * n_features / n_tiles))
    for r0 in range(0, h, tile):
        for c0 in range(0, w, tile):
            if stop is not None:
                stop()
            r1, c1 = min(r0 + tile, h), min(c0 + tile, w)
            R0, C0 = max(r0 - margin, 0), max(c0 - margin, 0)
            R1, C1 = min(r1 + margin, h), min(c1 + margin, w)
            sub_mask = None if mask is None else mask[R0:R1, C0:C1]
            if sub_mask is not None and not sub_mask.any():
                continue
            det = _make_detector(detector, per_tile, threshold)
            sub = np.ascontiguousarray(image_u8[R0:R1, C0:C1])
            kps, desc = _detect_and_describe(det, sub, _cv_mask(sub_mask), detector, per_tile)
            if not kps or desc is None:
                continue
            xy = np.asarray(cv2.KeyPoint_convert(kps), dtype=np.float64).reshape(-1, 2)
            xy += (C0, R0)
            core = ((xy[:, 0] >= c0 - 0.5) & (xy[:, 0] < c1 - 0.5)
                    & (xy[:, 1] >= r0 - 0.5) & (xy[:, 1] < r1 - 0.5))
            if core.any():
                response = np.array([k.response for k in kps])[core]
                det_all.append((xy[core], desc[core], response))
    if not det_all:
        return (np.empty((0, 2)), None) + ((np.empty(0),) if with_response else ())
    xy = np.concatenate([d[0] for d in det_all])
    desc = np.concatenate([d[1] for d in det_all])
    response = np.concatenate([d[2] for d in det_all])
    if 0 < n_features < len(xy):
        keep = np.sort(np.argsort(-response, kind="stable")[:n_features])
        xy, desc, response = xy[keep], desc[keep], response[keep]
    return (xy, desc, response) if with_response else (xy, desc)


def _norm_for(detector: str):
    import cv2

    return cv2.NORM_L2 if detector == "sift" else cv2.NORM_HAMMING


def _knn(matcher, query, train, k):
    """knnMatch as an (N, k) index array and (N, k) distances; missing neighbours -> -1/inf."""
    raw = matcher.knnMatch(query, train, k=k)
    idx = np.full((len(raw), k), -1, dtype=np.int64)
    dist = np.full((len(raw), k), np.inf)
    for i, ms in enumerate(raw):
        for j, m in enumerate(ms[:k]):
            idx[i, j] = m.trainIdx
            dist[i, j] = m.distance
    return idx, dist


def _knn_bf(detector, query, train, k):
    """Brute-force :func:`_knn`: ``cv2.batchDistance``, the function OpenCV's BFMatcher
    runs for one train set, hence the same neighbours and distances (ties included),
    returned as arrays instead of one DMatch object per neighbour (converting those cost
    ~1 ms per 1000 queries)."""
    import cv2

    if len(query) == 0 or len(train) < k:
        return _knn(_matcher("bf", detector), query, train, k)
    sift = detector == "sift"
    dist, idx = cv2.batchDistance(query, train, cv2.CV_32F if sift else cv2.CV_32S,
                                  normType=_norm_for(detector), K=int(k))
    idx = np.asarray(idx, dtype=np.int64).reshape(len(query), k)
    dist = np.asarray(dist, dtype=np.float64).reshape(len(query), k)
    missing = idx < 0
    if missing.any():
        idx[missing], dist[missing] = -1, np.inf
    return idx, dist


def _matcher(kind: str, detector: str):
    import cv2

    if kind == "bf":
        return cv2.BFMatcher(_norm_for(detector), crossCheck=False)
    if detector == "sift":
        index = {"algorithm": 1, "trees": 4}  # FLANN_INDEX_KDTREE
    else:
        index = {"algorithm": 6, "table_number": 6, "key_size": 12, "multi_probe_level": 1}  # LSH
    return cv2.FlannBasedMatcher(index, {"checks": 64})


def _knn_parallel(kind, detector, query, train, k, workers):
    """:func:`_knn` with the queries cut into ``workers`` blocks matched at once (brute
    force only: each query's neighbours do not depend on the other queries, so the result
    is the one of a single call; OpenCV releases the GIL while it matches)."""
    if kind != "bf":
        return _knn(_matcher(kind, detector), query, train, k)
    if workers <= 1 or len(query) < 2 * MIN_QUERIES_PER_THREAD:
        return _knn_bf(detector, query, train, k)
    parts = split(len(query), min(workers, len(query) // MIN_QUERIES_PER_THREAD))
    out = run_all([lambda a=a, b=b: _knn_bf(detector, query[a:b], train, k) for a, b in parts])
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


# below this many query descriptors per thread, starting a thread costs more than it saves
MIN_QUERIES_PER_THREAD = 256


def match(desc_moving, desc_fixed, *, detector: str, ratio: float = 0.75,
          cross_check: bool = False, matcher: str = "auto", seed: int = 0, workers: int = 1):
    """Match moving descriptors to fixed ones: ``(moving_idx, fixed_idx, matcher_used)``.

    Lowe's ratio test keeps a match whose best distance is below ``ratio`` times the
    second best; ``cross_check`` also requires the fixed descriptor's best match to be
    the same moving one. FLANN builds its random trees/hash tables from OpenCV's RNG,
    seeded with ``seed`` so that the matches are reproducible. Brute-force matching runs
    on ``workers`` threads (same matches as one)."""
    import cv2

    n_m, n_f = len(desc_moving), len(desc_fixed)
    kind = matcher
    if kind == "auto":
        limit = _AUTO_FLANN_PAIRS["float" if detector == "sift" else "binary"]
        kind = "flann" if n_m * n_f > limit else "bf"
    if kind == "flann" and detector == "sift":
        desc_moving = np.asarray(desc_moving, np.float32)
        desc_fixed = np.asarray(desc_fixed, np.float32)
    with _cv2_errors(f"matching descriptors ({kind})"):
        cv2.setRNGSeed(int(seed))
        k = 2 if n_f >= 2 else 1
        if kind == "bf":
            idx, dist = _knn_parallel(kind, detector, desc_moving, desc_fixed, k, int(workers))
            if cross_check:
                back, _ = _knn_parallel(kind, detector, desc_fixed, desc_moving, 1, int(workers))
        else:
            m = _matcher(kind, detector)
            idx, dist = _knn(m, desc_moving, desc_fixed, k)
            if cross_check:
                back, _ = _knn(m, desc_fixed, desc_moving, 1)
    q = np.arange(n_m)
    keep = idx[:, 0] >= 0
    if k == 2:
        # a missing second neighbour (FLANN/LSH) counts as "no competitor"
        keep &= dist[:, 0] < ratio * dist[:, 1]
    if cross_check:
        best = idx[:, 0]
        ok = best >= 0
        keep &= ok & (back[np.where(ok, best, 0), 0] == q)
    return q[keep], idx[keep, 0], kind


# above this many descriptor comparisons (moving x fixed keypoints), guided matching
# (below) replaces all-against-all matching of binary descriptors: under it a full match
# costs ~1-2 ms (ORB on 512^2 photos: 600 keypoints per image)
GUIDED_MIN_PAIRS = 600 * 600
# strongest keypoints per image matched all-against-all first (300^2 comparisons, ~0.6 ms
# for ORB); the larger seed only when the smaller gives no fit
GUIDED_SEEDS = (300, 1000)
GUIDED_NEIGHBOURS = 8   # fixed keypoints examined around each predicted position
GUIDED_RADIUS = 2.0     # search radius around each prediction, in reproj_threshold units


def descriptor_distance(a, b, detector: str) -> np.ndarray:
    """Row-wise distance between two (N, D) descriptor arrays, as OpenCV's matcher
    measures it: Hamming bits for binary descriptors, L2 for SIFT."""
    if detector == "sift":
        d = np.asarray(a, np.float32) - np.asarray(b, np.float32)
        return np.sqrt(np.einsum("ij,ij->i", d, d, dtype=np.float64))
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.ndim == 2 and a.shape[1] % 8 == 0 and a.dtype == b.dtype == np.uint8:
        # ORB's 32 bytes as four 64-bit words: an eighth of the elements to count
        a, b = a.view(np.uint64), b.view(np.uint64)
    return _popcount_rows(np.bitwise_xor(a, b)).astype(np.float64)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_rows(x, table: bool = False) -> np.ndarray:
    """Set bits per row of an unsigned integer array (np.bitwise_count needs numpy >= 2;
    a lookup table on the bytes otherwise, or with ``table=True``)."""
    if not table and hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).sum(axis=1, dtype=np.int64)
    x = np.ascontiguousarray(x)
    return _POPCOUNT8[x.view(np.uint8).reshape(len(x), -1)].sum(axis=1, dtype=np.int64)


def _guided_seed(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, *, detector, transform, ratio,
                 estimator, threshold, confidence, max_iters, seed, workers=1):
    """Step 1 of :func:`match_guided`: the seed fit from the strongest keypoints, and the
    seed inliers' farthest descriptor distance (the cap of step 2); None when no seed
    size gives a fit."""
    order_m = np.argsort(-np.asarray(m_resp), kind="stable")
    order_f = np.argsort(-np.asarray(f_resp), kind="stable")
    need = max(3 * MIN_POINTS[transform], 12)
    m0 = None
    for size in GUIDED_SEEDS:
        # the strongest `size` of each image; a larger seed only when a smaller one failed
        ms, fs = np.sort(order_m[:size]), np.sort(order_f[:size])
        a, b, _ = match(m_desc[ms], f_desc[fs], detector=detector, ratio=ratio, matcher="bf",
                        seed=seed, workers=workers)
        if len(a) >= need:
            a, b = ms[a], fs[b]
            order = np.lexsort((m_pts[a, 1], m_pts[a, 0], f_pts[b, 1], f_pts[b, 0]))
            a, b = a[order], b[order]
            m0, inl, _ = fit(m_pts[a], f_pts[b], transform, estimator=estimator,
                             threshold=threshold, confidence=confidence, max_iters=max_iters,
                             refine=False, seed=seed)
            if m0 is not None and inl.sum() >= need and np.all(np.isfinite(m0)):
                break
            m0 = None
        if size >= min(len(m_pts), len(f_pts)):
            break
    if m0 is None:
        return None
    return m0, float(descriptor_distance(m_desc[a[inl]], f_desc[b[inl]], detector).max())


def match_guided(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, *, detector: str, transform: str,
                 ratio: float, radius: float, estimator: str, threshold: float,
                 confidence: float, max_iters: int, seed: int, workers: int = 1):
    """Guided matching: ``(moving_idx, fixed_idx)``, or None when the seed fit fails.

    1. The ``GUIDED_SEEDS[0]`` strongest keypoints of each image are matched all against
       all (Lowe's ratio test) and ``transform`` is fitted robustly to them (without the
       least-squares refits: it only predicts where to look); if that fails, the next
       seed size is tried.
    2. Every moving keypoint is then compared only with the fixed keypoints within
       ``radius`` of where that fit puts it (at most ``GUIDED_NEIGHBOURS``); it keeps the
       nearest descriptor if that passes the ratio test against the second nearest there
       and is no farther than the seed inliers' farthest descriptor distance.
    3. Each fixed keypoint keeps its closest moving one (one-to-one).

    The caller fits the model to these matches as it does to all-against-all ones, so a
    poor seed cannot bias the result beyond which pairs are offered. Points are (N, 2)
    in fitting units (about fixed pixels), like ``radius``; descriptors and responses
    per keypoint. Costs ~GUIDED_SEEDS[0]^2 + N * GUIDED_NEIGHBOURS comparisons instead of
    N_moving * N_fixed."""
    from scipy.spatial import cKDTree

    seeded = _guided_seed(m_pts, f_pts, m_desc, f_desc, m_resp, f_resp, detector=detector,
                          transform=transform, ratio=ratio, estimator=estimator,
                          threshold=threshold, confidence=confidence, max_iters=max_iters,
                          seed=seed, workers=workers)
    if seeded is None:
        return None
    m0, cap = seeded
    pred = _project(m0, m_pts)
    ok = np.all(np.isfinite(pred), axis=1)
    k = min(GUIDED_NEIGHBOURS, len(f_pts))
    # an unbalanced tree builds in half the time; the neighbours found are the same
    tree = cKDTree(f_pts, balanced_tree=False, compact_nodes=False)
    # (scipy's workers=2 for these queries lost ~0.5 ms on moon, idle: thread starts)
    _, nb = tree.query(np.where(ok[:, None], pred, 1e300), k=k,
                       distance_upper_bound=float(radius))
    nb = nb.reshape(len(m_pts), k)
    # the descriptor distance of every (moving, neighbour) pair found, in one flat pass
    # (no 2D scatter); missing neighbours stay at inf
    found = np.flatnonzero(nb < len(f_pts))
    rows = found // k
    dist = np.full(nb.size, np.inf)
    dist[found] = descriptor_distance(m_desc[rows], f_desc[nb.ravel()[found]], detector)
    dist = dist.reshape(nb.shape)
    q = np.arange(len(m_pts))
    # the nearest descriptor (the first of equals, as a stable sort puts it) and the
    # distance of the runner-up: the ratio test needs no full sort of each row
    nearest = np.argmin(dist, axis=1)
    best = dist[q, nearest]
    if k >= 2:
        dist[q, nearest] = np.inf
        second = dist.min(axis=1)
    else:
        second = np.full(len(q), np.inf)
    keep = np.isfinite(best) & (best <= cap) & (best < ratio * second)
    mi = q[keep]
    fi = nb[mi, nearest[keep]]
    # one-to-one: each fixed keypoint keeps its closest moving descriptor
    order = np.lexsort((mi, best[mi], fi))
    first = np.ones(len(order), bool)
    first[1:] = fi[order][1:] != fi[order][:-1]
    sel = np.sort(order[first])
    return mi[sel], fi[sel]


# ------------------------------------------------------------------ model fitting
def _umeyama(src, dst, with_scale: bool) -> np.ndarray:
    """Least-squares rotation (+ uniform scale) + translation mapping src -> dst (3x3).

    Umeyama's solution written out for 2D: with centred points and their cross
    covariance C, the best proper rotation has angle atan2(C10 - C01, C00 + C11) and the
    best scale is the length of that vector over the variance of src (the SVD form's
    values to rounding, at a fifth of its cost; the fit runs up to six times per call)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    n = len(src)
    c00, c01 = float(d[:, 0] @ s[:, 0]) / n, float(d[:, 0] @ s[:, 1]) / n
    c10, c11 = float(d[:, 1] @ s[:, 0]) / n, float(d[:, 1] @ s[:, 1]) / n
    x, y = c00 + c11, c10 - c01
    norm = float(np.hypot(x, y))
    cos, sin = (x / norm, y / norm) if norm > 0 else (1.0, 0.0)
    rot = np.array([[cos, -sin], [sin, cos]])
    scale = 1.0
    if with_scale:
        var = float((s * s).sum()) / n
        scale = norm / var if var > 0 else 1.0
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


def _lstsq_affine(src, dst) -> np.ndarray:
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    m = np.eye(3)
    m[:2, :] = sol.T
    return m


def _project(m, pts) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    out = pts @ m[:2, :2].T + m[:2, 2]
    if m[2, 0] == 0.0 and m[2, 1] == 0.0 and m[2, 2] == 1.0:
        return out
    return out / (pts @ m[2, :2] + m[2, 2])[:, None]


def _translation_consensus(src, dst, estimator, threshold, max_iters, confidence, rng):
    """Robust translation: each match's displacement is a one-point hypothesis, tried in
    random order. RANSAC keeps the one with most displacements within ``threshold``,
    LMedS the one with the smallest median distance; both stop once ``confidence`` says
    a better one is unlikely (the usual adaptive rule; LMedS presumes half are inliers)."""
    disp = dst - src
    n = len(disp)
    cand = rng.permutation(n)[:max_iters]
    best_score, best = None, None
    for start in range(0, len(cand), 128):
        c = disp[cand[start:start + 128]]
        d = np.linalg.norm(disp[None, :, :] - c[:, None, :], axis=2)
        score = -np.median(d, axis=1) if estimator == "lmeds" else (d < threshold).sum(1)
        i = int(np.argmax(score))
        if best_score is None or score[i] > best_score:
            best_score, best = score[i], c[i]
        # LMedS presumes at least half the matches are inliers
        w = 0.5 if estimator == "lmeds" else min(best_score / n, 1 - 1e-12)
        needed = np.log(1 - confidence) / np.log(1 - w) if w > 0 else np.inf
        if start + len(c) >= needed:
            break
    inl = np.linalg.norm(disp - best, axis=1) < threshold
    m = np.eye(3)
    m[:2, 2] = best
    return m, inl


def _refit(src, dst, transform):
    if transform == "translation":
        m = np.eye(3)
        m[:2, 2] = (dst - src).mean(0)
        return m
    if transform in ("rigid", "similarity"):
        return _umeyama(src, dst, with_scale=transform == "similarity")
    if transform == "affine":
        return _lstsq_affine(src, dst)
    import cv2

    h, _ = cv2.findHomography(src.astype(np.float64), dst.astype(np.float64), 0)
    return h


def fit(src, dst, transform: str, *, estimator: str = "ransac", threshold: float = 3.0,
        confidence: float = 0.999, max_iters: int = 5000, refine: bool = True, seed: int = 0):
    """Robust fit of ``transform`` mapping ``src`` -> ``dst`` ((N, 2) points, same
    units as ``threshold``): ``(matrix 3x3, inlier mask, refit rounds)``.

    The robust estimator picks the inliers; with ``refine`` the model is then refitted
    by least squares on them (Umeyama for rigid/similarity, linear least squares for
    affine, DLT + Levenberg-Marquardt for homography) and the inliers re-selected with
    the same threshold, until they stop changing (at most 5 rounds); a last fit then
    uses the inliers within TIGHT_SIGMAS robust standard deviations (:func:`_tight_refit`).

    OpenCV has no MAGSAC++ for rotation + scale models: with ``estimator="usac_magsac"``,
    rigid and similarity fits take their inliers from MAGSAC++ on an affine model."""
    import cv2

    cv2.setRNGSeed(int(seed))
    method = {"ransac": cv2.RANSAC, "usac_magsac": cv2.USAC_MAGSAC, "lmeds": cv2.LMEDS}[estimator]
    src32 = np.ascontiguousarray(src, dtype=np.float32)
    dst32 = np.ascontiguousarray(dst, dtype=np.float32)
    with _cv2_errors(f"fitting a {transform} model ({estimator})"):
        if transform == "translation":
            m, inl = _translation_consensus(src, dst, estimator, threshold, int(max_iters),
                                            float(confidence), np.random.default_rng(seed))
        elif transform == "homography":
            m, mask = cv2.findHomography(src32, dst32, method, float(threshold),
                                         maxIters=int(max_iters), confidence=float(confidence))
            inl = None if mask is None else mask.ravel().astype(bool)
        else:
            # OpenCV's partial-affine estimator has no USAC variant: MAGSAC++ then picks the
            # inliers of an affine model and the similarity/rigid refit below replaces it
            partial = transform != "affine" and estimator != "usac_magsac"
            est = cv2.estimateAffinePartial2D if partial else cv2.estimateAffine2D
            # OpenCV polishes its model on the inliers (Levenberg-Marquardt, ~0.15 ms on 600
            # pairs) after choosing them; the inlier mask does not depend on it, and when the
            # least-squares refit below replaces the model anyway, that polish is skipped
            replaced = refine or transform == "rigid" or (transform == "similarity"
                                                          and estimator == "usac_magsac")
            a, mask = est(src32, dst32, method=method, ransacReprojThreshold=float(threshold),
                          maxIters=int(max_iters), confidence=float(confidence),
                          refineIters=0 if replaced else 10)
            if a is None:
                m = None
            else:
                m = np.vstack([a, [0.0, 0.0, 1.0]])
            inl = None if mask is None else mask.ravel().astype(bool)
        if m is None or inl is None or not inl.any():
            return None, np.zeros(len(src), bool), 0
        m = np.asarray(m, dtype=np.float64)
        rounds = 0
        # rigid always needs one least-squares refit (OpenCV's partial affine has a scale),
        # and so does a similarity picked by MAGSAC++ on an affine model
        must = transform == "rigid" or (transform == "similarity" and estimator == "usac_magsac")
        max_rounds = 5 if refine else (1 if must else 0)
        if max_rounds:
            need = MIN_POINTS[transform]
            for rounds in range(1, max_rounds + 1):
                if inl.sum() < need:
                    break
                m_new = _refit(src[inl], dst[inl], transform)
                if m_new is None:
                    break
                m = m_new
                res = np.linalg.norm(_project(m, src) - dst, axis=1)
                new = res < threshold
                if np.array_equal(new, inl) or new.sum() < need:
                    break
                inl = new
        if refine:
            m = _tight_refit(m, src, dst, inl, transform)
    return m, inl, rounds


# the final least-squares fit uses the inliers whose residual is within this many robust
# standard deviations (1.4826 x median residual) of the consensus model
TIGHT_SIGMAS = 2.5


def _tight_refit(m, src, dst, inl, transform):
    """Refit on the inliers that agree best with the model: those within TIGHT_SIGMAS
    robust standard deviations of it. The RANSAC threshold (3 px) lets in matches that
    are right but imprecise (a keypoint found a pixel or two off at a coarse pyramid
    level); least squares weighs them as much as the precise ones. Kept only when at
    least half the inliers (and 20) remain, so that few, clustered points never decide."""
    n = int(inl.sum())
    if n < 40:
        return m
    res = np.linalg.norm(_project(m, src) - dst, axis=1)
    sigma = 1.4826 * float(np.median(res[inl]))
    if not sigma > 0:
        return m
    tight = inl & (res <= TIGHT_SIGMAS * sigma)
    if tight.sum() < max(20, n // 2):
        return m
    m_new = _refit(src[tight], dst[tight], transform)
    return m if m_new is None or not np.all(np.isfinite(m_new)) else np.asarray(m_new, float)


def check_model(m, transform, src_inliers, corners, max_scale: float):
    """Reasons a fitted model is not a usable registration (empty list if fine).

    ``src_inliers`` are the inlier moving points and ``corners`` the moving image's
    corners, in the fitting units (about fixed pixels)."""
    problems = []
    need = MIN_POINTS[transform]
    if need >= 3:
        c = src_inliers - src_inliers.mean(0)
        sv = np.linalg.svd(c, compute_uv=False) / np.sqrt(max(len(c), 1))
        if sv[-1] < 1.0:
            problems.append(f"the {len(c)} inlier keypoints lie nearly on one line (spread "
                            f"{sv[-1]:.2g} px across it), which cannot fix a {transform}")
    elif transform != "translation":
        spread = np.ptp(src_inliers, axis=0).max() if len(src_inliers) else 0.0
        if spread < 2.0:
            problems.append(f"the inlier keypoints all sit within {spread:.2g} px: rotation "
                            "and scale are undetermined")
    if not np.all(np.isfinite(m)):
        return problems + ["the fitted matrix is not finite"]
    pts = np.vstack([corners, corners.mean(0)])
    if transform == "homography":
        m = m if pts.mean(0) @ m[2, :2] + m[2, 2] > 0 else -m  # H and -H are one map
        w = pts @ m[2, :2] + m[2, 2]
        if np.any(w <= 0) or w.max() / w.min() > 10:
            problems.append("the homography is near-singular over the image (it sends part of "
                            "the moving image towards infinity)")
            return problems
        jac = []
        for (x, y), wi in zip(pts, w):
            p = (m[:2, :2] @ [x, y] + m[:2, 2]) / wi
            jac.append((m[:2, :2] - np.outer(p, m[2, :2])) / wi)
    else:
        jac = [m[:2, :2]]
    for j in jac:
        sv = np.linalg.svd(j, compute_uv=False)
        det = float(np.linalg.det(j))
        if det <= 0:
            problems.append("the fitted model mirrors or folds the image (determinant "
                            f"{det:.3g}), which a real view change does not do")
            break
        if sv.max() > max_scale or sv.min() < 1.0 / max_scale:
            problems.append(f"the fitted model scales by {sv.min():.3g}..{sv.max():.3g} "
                            f"(allowed 1/{max_scale:g}..{max_scale:g}: max_scale)")
            break
    return problems


# ------------------------------------------------------------------------- backend
_CV_THREADS_LOCK = threading.Lock()
_CV_THREADS_STATE = {"users": 0, "saved": None}


@contextlib.contextmanager
def _opencv_threads(n: int):
    """OpenCV's worker threads set to ``n`` while the block runs (0: left alone). The
    setting is process-wide, so every overlapping user (register_stack's workers, calls
    from several threads) shares one save/restore: the first one in saves the setting,
    each one sets its own count on entry (while calls overlap, the latest request holds:
    OpenCV has no per-call count), and the last one out puts the saved setting back."""
    if not n:
        yield
        return
    import cv2

    with _CV_THREADS_LOCK:
        if _CV_THREADS_STATE["users"] == 0:
            _CV_THREADS_STATE["saved"] = cv2.getNumThreads()
        _CV_THREADS_STATE["users"] += 1
        cv2.setNumThreads(int(n))
    try:
        yield
    finally:
        with _CV_THREADS_LOCK:
            _CV_THREADS_STATE["users"] -= 1
            if _CV_THREADS_STATE["users"] == 0:
                cv2.setNumThreads(_CV_THREADS_STATE["saved"])


def _threads(n: int):
    """The user's ``threads=`` for OpenCV during the call (0 = OpenCV's setting)."""
    return _opencv_threads(int(n))


def _share_cores(parts: int):
    """OpenCV's own worker threads cut to the cores each of ``parts`` concurrent calls
    has (cores // parts, at least 1) while they run, then restored. Two ORB detections
    at once on 2 cores, each also handing work to OpenCV's 2-thread pool, cost ~4 ms more
    CPU (22 vs 18 ms for moon's pair under report timing) than with one OpenCV thread
    each on a busy machine: the pool can only compete with the other detection."""
    return _opencv_threads(max(1, n_workers() // max(1, int(parts))))


def _validate(transform, detector, matcher, estimator, ratio, reproj_threshold, confidence,
              max_iters, n_features, min_inliers, max_scale, ndim):
    if ndim != 2:
        raise ValueError(f"method 'features' works on 2D images, not {ndim}D; use "
                         "method='intensity' or method='fourier' for volumes")
    if transform not in TRANSFORMS:
        raise ValueError(f"method 'features' supports transforms {list(TRANSFORMS)}; got {transform!r}")
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {list(DETECTORS)}; got {detector!r}")
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {list(MATCHERS)}; got {matcher!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}; got {estimator!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio (Lowe's test) must be in (0, 1]; got {ratio}")
    if not reproj_threshold > 0:
        raise ValueError(f"reproj_threshold (pixels) must be > 0; got {reproj_threshold}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.999; got {confidence}")
    if int(max_iters) < 1:
        raise ValueError(f"max_iters must be >= 1; got {max_iters}")
    if int(n_features) < 0:
        raise ValueError(f"n_features must be >= 0 (0 = no limit); got {n_features}")
    if int(min_inliers) < 1:
        raise ValueError(f"min_inliers must be >= 1; got {min_inliers}")
    if not max_scale > 1:
        raise ValueError(f"max_scale must be > 1; got {max_scale}")


def register(fixed, moving, *, transform, fixed_spacing, moving_spacing, progress, cancel,
             fixed_mask=None, moving_mask=None,
             detector: Literal["sift", "orb", "akaze", "brisk"] = "sift", n_features: int = 5000,
             threshold: float | None = None, ratio: float = 0.75, cross_check: bool = False,
             matcher: Literal["auto", "bf", "flann"] = "auto",
             estimator: Literal["ransac", "usac_magsac", "lmeds"] = "ransac", reproj_threshold: float = 3.0,
             confidence: float = 0.999, max_iters: int = 5000, refine: bool = True,
             min_inliers: int = 10, max_scale: float = 10.0, isotropic: bool = True,
             seed: int = 0, threads: int = 0, tile_size: int = 1024,
             guided: bool = True, stretch_uint8: bool = False,
             uint8_native: tuple | None = None) -> BackendResult:
    """Detect keypoints in both images, match their descriptors and fit ``transform``
    robustly, in world coordinates.

    ``fixed`` and ``moving`` as uint8 are detected as they are (the core's stretched
    images, see ``UINT8_INPUT``); any other dtype goes through :func:`to_uint8`. With
    ``stretch_uint8`` (set by the core, not a user option: ``UINT8_STRETCH``) they are the
    core's finite float32 grey images, and each image's detection thread first makes the
    core's uint8 stretch of it (``preprocess.prepare_uint8``, bit for bit the same).
    ``uint8_native`` (also the core's): per image, the gain to its own 8-bit scale or
    None; ORB detects there when FAST finds at least ``NATIVE_MIN_CORNERS`` corners on
    it, on the stretch otherwise (``info["uint8_scale"]`` says which scale each image
    used).

    Options
    -------
    detector : {"sift", "orb", "akaze", "brisk"}
        SIFT is the most precise; ORB the fastest; AKAZE and BRISK in between.
    n_features : int
        Keypoint budget per image (strongest kept); 0 = no limit.
    threshold : float or None
        The detector's own threshold (None = OpenCV default): SIFT contrastThreshold
        (0.04), ORB FAST threshold (20), AKAZE response threshold (0.001), BRISK AGAST
        threshold (30). Lower finds more keypoints in low-contrast images. The detectors
        see the image stretched to its 0.5-99.5 percentiles; ORB sees a uint8 image or
        one within [0, 1] on its own 8-bit scale unless FAST finds fewer than 200 corners
        there (``info["uint8_scale"]``).
    ratio : float
        Lowe's ratio test: keep a match if best < ratio * second best distance.
    cross_check : bool
        Also require the match to be mutual (fixed -> moving best is the same pair).
    matcher : {"auto", "bf", "flann"}
        Brute force (Hamming for ORB/AKAZE/BRISK, L2 for SIFT) or FLANN (k-d trees for
        SIFT, LSH for binary descriptors); "auto" uses FLANN for large keypoint counts.
    estimator : {"ransac", "usac_magsac", "lmeds"}
        Robust estimator choosing the inliers.
    reproj_threshold : float
        Inlier distance in fixed pixels (the smallest side of an anisotropic pixel).
    confidence, max_iters :
        RANSAC's stopping rule.
    refine : bool
        Refit the model by least squares on the inliers (more accurate).
    min_inliers : int
        Fewer inliers than this (or than the model needs) is reported as a failure.
    max_scale : float
        A fit scaling by more than this (or less than 1/max_scale) is reported as
        degenerate rather than returned.
    isotropic : bool
        Detect on a copy resampled to square pixels (of the smallest side) when pixels
        are anisotropic: descriptors then see the real shapes. The fit is always in
        world units.
    seed : int
        Seed for the random sampling (OpenCV's RNG and the translation consensus).
    threads : int
        OpenCV worker threads for this call (0 = leave OpenCV's setting); also how many
        threads share the brute-force matching and (ORB, AKAZE, BRISK) detect the two
        images at once (0 = one per core). The result does not depend on it.
    tile_size : int
        Images larger than ~1.5 tiles of this side (pixels) are detected tile by tile at
        full resolution, which bounds memory (SIFT needs ~230 bytes per pixel it sees at
        once); 0 = the whole image at once.
    guided : bool
        Binary descriptors (ORB, AKAZE, BRISK), many keypoints, matcher="auto", no
        cross_check: match the strongest 300 of each image first (1000 if those give no
        fit), fit, then compare each keypoint only with the fixed keypoints near where that
        fit puts it (2 x reproj_threshold) instead of with all of them; the final fit is made
        to these matches as usual. Falls back to matching all against all when no seed fit
        succeeds. False = always all against all. (SIFT's detection costs far more than its
        matching, and all-against-all was more accurate there.)
    """
    _validate(transform, detector, matcher, estimator, ratio, reproj_threshold, confidence,
              max_iters, n_features, min_inliers, max_scale, np.ndim(fixed))
    if np.ndim(moving) != 2:
        raise ValueError(f"method 'features' works on 2D images; moving is {np.ndim(moving)}D")

    def stop():
        if cancel():
            raise RegistrationCancelled("registration cancelled")

    f_sp = np.asarray(fixed_spacing, dtype=np.float64)
    m_sp = np.asarray(moving_spacing, dtype=np.float64)
    unit = float(f_sp.min())  # fitting units: world / unit ~ fixed pixels
    timings = {}
    # ORB, AKAZE, BRISK on a busy machine (no core free by the load average): what runs
    # in parallel here (the two detections, the brute-force matching) is split over two
    # threads of our own, so each gets half the cores for OpenCV's threads (keypoints and
    # matches do not depend on it, tested). With a core free OpenCV's pool can take over
    # when one detection ends first (moon, idle: ~0.4 ms less wall, ~0.8 ms more CPU).
    # SIFT keeps OpenCV's setting (its detection is OpenCV's threads' work), as does an
    # explicit `threads=`
    share = (_share_cores(2) if not threads and detector != "sift" and not spare_cores()
             else contextlib.nullcontext())
    with _threads(threads), share:
        t = time.perf_counter()
        progress(0.0, f"{detector}: keypoints")
        if int(tile_size) < 0:
            raise ValueError(f"tile_size must be >= 0 (0 = no tiles); got {tile_size}")
        workers = n_workers(threads)

        def keypoints(u8, msk, sp):
            if isotropic:
                u8, msk, sp = square_pixels(u8, sp, msk)
            # uint8 (the image on its own 8-bit scale, or the core's stretch: UINT8_INPUT)
            # is detected as it is
            u8 = u8 if u8.dtype == np.uint8 else to_uint8(u8, msk)
            return detect_tiled(u8, msk, detector, n_features, threshold, tile_size=int(tile_size),
                                stop=stop, with_response=True) + (sp,)

        def detect_one(img, msk, sp, gain):
            """One image's chain, on its own thread when both run at once: the image on
            its own 8-bit scale (``gain``, ORB) or the core's stretch (stretch_uint8),
            square pixels, keypoints; ``(xy, desc, resp, sp, scale)``."""
            if stretch_uint8 and gain is not None and detector in NATIVE_DETECTORS:
                u8 = native_uint8(img, gain)
                if count_corners(u8, msk, threshold) >= NATIVE_MIN_CORNERS:
                    return keypoints(u8, msk, sp) + ("native",)
            if stretch_uint8:
                img = prepare_uint8(img, mask=msk, finite=True)
            return keypoints(img, msk, sp) + ("stretched" if stretch_uint8 else "given",)

        gains = tuple(uint8_native) if uint8_native is not None else (None, None)

        limit = CONCURRENT_SIFT_PIXELS if detector == "sift" else CONCURRENT_DETECT_PIXELS
        sizes = [_square_size(np.shape(img), sp) if isotropic else np.size(img)
                 for img, sp in ((fixed, f_sp), (moving, m_sp))]
        if workers > 1 and sum(sizes) <= limit:
            # both images at once: OpenCV releases the GIL while it detects; larger images
            # go one after the other (tiled), which bounds the detector's memory. SIFT too:
            # OpenCV spreads only parts of it over its threads (the upscale and the first
            # octave's blurs run on one), so two at once took 19 % less wall time for the
            # same CPU on 2 cores at load ~1 (retina 704^2; at load 10, round 3, they cost
            # 10-20 % more: a busy machine has no idle core to give)
            # With stretch_uint8 each thread first makes its image's uint8 stretch, so one
            # image's stretch overlaps the other's detection (~1.3 ms a 512^2 image)
            (f_xy, f_desc, f_resp, f_det_sp, f_scale), (m_xy, m_desc, m_resp, m_det_sp, m_scale) = (
                run_all([lambda: detect_one(fixed, fixed_mask, f_sp, gains[0]),
                         lambda: detect_one(moving, moving_mask, m_sp, gains[1])]))
        else:
            f_xy, f_desc, f_resp, f_det_sp, f_scale = detect_one(fixed, fixed_mask, f_sp, gains[0])
            stop()
            m_xy, m_desc, m_resp, m_det_sp, m_scale = detect_one(moving, moving_mask, m_sp, gains[1])
        stop()
        timings["detect"] = time.perf_counter() - t
        f_pts = keypoints_to_world(f_xy, f_det_sp)
        m_pts = keypoints_to_world(m_xy, m_det_sp)
        info = {"detector": detector, "keypoints_fixed": len(f_xy), "keypoints_moving": len(m_xy),
                "uint8_scale": {"fixed": f_scale, "moving": m_scale}}
        extras = {"fixed_keypoints": f_pts, "moving_keypoints": m_pts}
        need = max(int(min_inliers), MIN_POINTS[transform])
        if min(len(f_xy), len(m_xy)) < need:
            raise RegistrationError(
                f"{detector} found {len(f_xy)} keypoints in fixed and {len(m_xy)} in moving; a "
                f"{transform} fit needs at least {need} matching ones (min_inliers). The images may "
                f"be too smooth or low in contrast: {_advice(detector)}")
        progress(0.4, "matching")
        stop()
        t = time.perf_counter()
        guided_res = None
        if (guided and matcher == "auto" and not cross_check and detector != "sift"
                and len(m_xy) * len(f_xy) > GUIDED_MIN_PAIRS):
            guided_res = match_guided(
                m_pts / unit, f_pts / unit, m_desc, f_desc, m_resp, f_resp, detector=detector,
                transform=transform, ratio=float(ratio), radius=max(GUIDED_RADIUS * reproj_threshold, 3.0),
                estimator=estimator, threshold=float(reproj_threshold),
                confidence=float(confidence), max_iters=int(max_iters), seed=int(seed),
                workers=workers)
        if guided_res is not None:
            (mi, fi), used = guided_res, "guided"
        else:
            mi, fi, used = match(m_desc, f_desc, detector=detector, ratio=float(ratio),
                                 cross_check=bool(cross_check), matcher=matcher, seed=int(seed),
                                 workers=workers)
        timings["match"] = time.perf_counter() - t
        info.update(matcher=used, matches=len(mi))
        if len(mi) < need:
            raise RegistrationError(
                f"only {len(mi)} matches passed the ratio test (keypoints: {len(f_xy)} fixed, "
                f"{len(m_xy)} moving); a {transform} fit needs at least {need}. Loosen the ratio test "
                f"(ratio=0.8-0.9, cross_check=False), or {_advice(detector)}")
        progress(0.6, f"fitting {transform} ({estimator})")
        stop()
        t = time.perf_counter()
        src = m_pts[mi] / unit
        dst = f_pts[fi] / unit
        # the robust estimators see the pairs in a fixed order, whatever order OpenCV's
        # threads produced the keypoints in: reproducible for a given seed
        order = np.lexsort((src[:, 1], src[:, 0], dst[:, 1], dst[:, 0]))
        src, dst, mi, fi = src[order], dst[order], mi[order], fi[order]
        m, inl, rounds = fit(src, dst, transform, estimator=estimator,
                             threshold=float(reproj_threshold), confidence=float(confidence),
                             max_iters=int(max_iters), refine=bool(refine), seed=int(seed))
        timings["fit"] = time.perf_counter() - t
        n_inl = int(inl.sum())
        info.update(estimator=estimator, inliers=n_inl,
                    inlier_ratio=float(n_inl / len(mi)), refit_rounds=rounds,
                    stop_reason=f"{estimator} consensus, {rounds} least-squares refit(s)")
        if m is None or n_inl < need:
            raise RegistrationError(
                f"{estimator} found {n_inl} inliers among {len(mi)} matches ({len(f_xy)} fixed / "
                f"{len(m_xy)} moving keypoints); a {transform} fit needs at least {need}. The "
                f"matches do not agree on one {transform}: raise reproj_threshold (now "
                f"{reproj_threshold} px), choose a simpler or more flexible transform, or "
                f"{_advice(detector)}")
        h, w = np.asarray(moving).shape
        corners = keypoints_to_world([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], m_sp) / unit
        problems = check_model(m, transform, src[inl], corners, float(max_scale))
        if problems:
            raise RegistrationError(
                f"the {transform} fitted to {n_inl} inliers is degenerate: " + "; ".join(problems)
                + f". Try {_SIMPLER.get(transform, 'another transform')}, or {_advice(detector)}")
        diff_world = (_project(m, src[inl]) - dst[inl]) * unit
        err_px = np.linalg.norm(diff_world / f_sp, axis=1)  # in fixed pixels, per axis
        info.update(rms_world=float(np.sqrt(np.mean((diff_world ** 2).sum(1)))),
                    rms_px=float(np.sqrt(np.mean(err_px ** 2))),
                    max_residual_px=float(err_px.max()), timings=timings)
    # back from fitting units to world: M_world = U M U^-1
    u = np.diag([unit, unit, 1.0])
    matrix = u @ m @ np.linalg.inv(u)
    if transform == "homography":
        matrix = matrix / matrix[2, 2]
    else:
        matrix[2] = (0.0, 0.0, 1.0)
    extras.update(fixed_matches=f_pts[fi[inl]], moving_matches=m_pts[mi[inl]])
    progress(1.0, "done")
    return BackendResult(Transform(matrix), info, extras)
