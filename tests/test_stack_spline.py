"""The stack's spline engine (core/stack_refine.py): phase correlation against a cached
reference, then Gauss-Newton on cubic splines. Real images (scikit-image data) with
known sub-pixel drifts made by two different interpolators (cubic spline and an exact
Fourier shift), gain/offset changes, noise, 3D, every reference mode; the choice
between the engines; determinism across BLAS thread counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from napari_registration import register_stack
from napari_registration.core.stack_refine import TranslationReference, spline_shift

# off any 1/100 px grid (an upsampled-DFT peak search is exact on its grid)
DRIFTS = np.array([[0.0, 0.0], [0.3712, -0.8147], [-2.6231, 1.1369], [4.4917, 3.7063],
                   [-6.2538, -0.0729], [1.5047, -5.4952], [0.0311, 7.9613], [-3.3333, -3.3359]])


def _image(name, blur=0.0):
    from skimage import color, data

    img = getattr(data, name)()
    if img.ndim == 3:
        img = color.rgb2gray(img)
    img = img.astype(np.float32)
    if blur:
        img = ndimage.gaussian_filter(img, blur)
    return (img - img.min()) / (img.max() - img.min())


def series(name, drifts, size=128, corner=(150, 170), how="spline", margin=16, blur=0.0):
    """frame_i(q) = image(q + corner + d_i): the transform frame i -> frame 0 is a
    translation by d_i - d_0. ``how``: cubic-spline shift, or an exact Fourier shift of
    the image blurred by ``blur`` px (band-limited, as optics make it)."""
    image = _image(name, blur)
    lo = np.asarray(corner) - margin
    region = image[lo[0]:lo[0] + size + 2 * margin, lo[1]:lo[1] + size + 2 * margin]
    out = []
    for d in drifts:
        if how == "spline":
            moved = ndimage.shift(region, -np.asarray(d), order=3, mode="nearest")
        else:  # exact band-limited shift (a different interpolation model)
            moved = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(region), -np.asarray(d))).real
        out.append(moved[margin:margin + size, margin:margin + size])
    return np.stack(out).astype(np.float32)


def errors(transforms, drifts, ref=0):
    """Per frame, the largest per-axis error of the recovered shift (px)."""
    return np.array([float(np.abs(t.matrix[:-1, -1] - (d - drifts[ref])).max())
                     for t, d in zip(transforms, drifts)])


def max_error(transforms, drifts, ref=0):
    return float(errors(transforms, drifts, ref).max())


# ------------------------------------------------------------------------ precision
@pytest.mark.parametrize("name,how,corner", [("camera", "spline", (150, 170)),
                                             ("moon", "spline", (200, 150)),
                                             ("brick", "fourier", (180, 180)),
                                             ("coffee", "fourier", (150, 250)),
                                             ("camera", "fourier", (150, 170))])
def test_reference_recovers_sub_pixel_drifts_of_real_images(name, how, corner):
    frames = series(name, DRIFTS, corner=corner, how=how, blur=1.0 if how == "fourier" else 0.0)
    ref = TranslationReference(frames[0])
    for frame, d in zip(frames[1:], DRIFTS[1:]):
        shift, info = ref.register(frame)
        assert info["stop_reason"] == "converged", info
        # phase correlation alone is ~0.02-0.1 px off; the polish gets within 0.005 px
        assert np.abs(shift - d).max() < 0.005, (shift, d, info)
        assert np.abs(np.array(info["phase_correlation_px"]) - d).max() < 0.5


@pytest.mark.parametrize("how", ["spline", "fourier"])
def test_engine_is_more_precise_than_one_register_per_frame(how):
    frames = series("camera", DRIFTS, how=how, blur=1.0 if how == "fourier" else 0.0)
    spline = register_stack(frames, warp=False)
    plain = register_stack(frames, warp=False, polish="none")
    assert spline.info["polish"] == "spline" and plain.info["polish"] == "none"
    assert max_error(spline.transforms, DRIFTS) < 0.005
    # measured: 0.0017 vs 0.0040 px (spline shifts), 0.0006 vs 0.0059 (Fourier shifts)
    assert errors(spline.transforms, DRIFTS)[1:].mean() < 0.5 * errors(plain.transforms, DRIFTS)[1:].mean()


def test_gain_offset_and_noise():
    rng = np.random.default_rng(3)
    frames = series("camera", DRIFTS)
    gains = np.linspace(1.0, 0.4, len(frames))           # bleaching
    frames = frames * gains[:, None, None] + np.linspace(0, 0.2, len(frames))[:, None, None]
    noisy = (frames + rng.normal(0, 0.02, frames.shape)).astype(np.float32)
    result = register_stack(noisy, warp=False)
    assert max_error(result.transforms, DRIFTS) < 0.03
    info = result.info["frames"][-1]
    assert info["gain"] == pytest.approx(gains[-1], rel=0.05)  # frame = gain * ref + offset
    assert 0.9 < info["ncc_after"] <= 1.0 and info["ncc_before"] < info["ncc_after"]


def test_3d_series_with_anisotropic_spacing():
    from skimage.data import binary_blobs

    # no 3D microscopy volume ships with scikit-image offline: blurred fine blobs
    vol = ndimage.gaussian_filter(binary_blobs(length=128, n_dim=3, blob_size_fraction=0.04,
                                               volume_fraction=0.3, rng=4).astype(np.float32), 1.0)
    drifts = np.array([[0, 0, 0], [0.4137, -1.3291, 2.7093], [-1.2214, 3.4519, -0.6372],
                       [2.1071, 0.2203, -4.8366]])
    size, margin = (40, 96, 96), 8
    corner = np.array([20, 16, 16])
    region = vol[corner[0] - margin:corner[0] + size[0] + margin,
                 corner[1] - margin:corner[1] + size[1] + margin,
                 corner[2] - margin:corner[2] + size[2] + margin]
    inner = tuple(slice(margin, margin + s) for s in size)
    frames = np.stack([ndimage.shift(region, -d, order=3, mode="nearest")[inner] for d in drifts])
    spacing = (0.29, 0.26, 0.26)
    result = register_stack(frames, spacing=spacing, warp=False)
    assert result.info["polish"] == "spline"
    for t, d in zip(result.transforms, drifts):
        np.testing.assert_allclose(t.matrix[:-1, -1], d * spacing, atol=0.01 * 0.26)


@pytest.mark.parametrize("reference", ["previous", "mean", 3])
def test_other_reference_modes_use_the_engine(reference):
    # band-limited frames (as optics make them): with a reference that is itself a
    # shifted, resampled frame, the unblurred camera photo's aliased grass makes any
    # cubic-spline model ~0.01 px off (phase correlation 0.005: docs/benchmarks.md)
    frames = series("camera", DRIFTS, how="fourier", blur=1.0)
    ref = 3 if reference == 3 else 0

    def errs(result):
        back = result.transforms[ref].inverse()
        return np.array([np.abs(t.then(back).matrix[:-1, -1] - (d - DRIFTS[ref])).max()
                         for t, d in zip(result.transforms, DRIFTS)])

    result = register_stack(frames, reference=reference)
    assert result.info["polish"] == "spline"
    # measured: max 0.0012-0.0026 px; one register() per frame: 0.011-0.017
    assert errs(result).max() < 0.005
    assert errs(result).mean() < 0.5 * errs(register_stack(frames, reference=reference,
                                                           polish="none")).mean()


def test_channels_follow_the_driver():
    frames = series("camera", DRIFTS)
    passenger = series("moon", DRIFTS, corner=(200, 150))
    stack = np.stack([frames, passenger], axis=1)
    result = register_stack(stack, channel_axis=1, driver_channel=0)
    assert result.info["polish"] == "spline"
    assert max_error(result.transforms, DRIFTS) < 0.005
    # the passenger channel is aligned to its own first frame (inside, away from edges)
    inner = (slice(12, -12), slice(12, -12))
    diff = np.abs(result.warped[:, 1][(slice(None),) + inner] - passenger[0][inner])
    assert np.median(diff) < 0.01


def test_inputs_not_modified_and_parallel_paths_match_serial():
    frames = series("camera", DRIFTS)
    before = frames.copy()
    serial = register_stack(frames)
    assert np.array_equal(frames, before)
    pool = register_stack(frames, workers=2)
    assert pool.info["polish"] == "spline"
    for a, b in zip(serial.transforms, pool.transforms):
        np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-9)
    np.testing.assert_allclose(pool.warped, serial.warped, atol=1e-6)


def test_dask_cluster_matches_serial():
    distributed = pytest.importorskip("distributed")
    frames = series("camera", DRIFTS)
    serial = register_stack(frames)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        dist = register_stack(frames, client=client)
    for a, b in zip(serial.transforms, dist.transforms):
        np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-9)
    np.testing.assert_allclose(dist.warped, serial.warped, atol=1e-6)


def test_same_shifts_with_one_blas_thread():
    """dask workers run with one BLAS thread: the engine's sums never use BLAS, so a
    frame's shift is the same bit for bit."""
    frames = series("camera", DRIFTS[:4])
    ref = TranslationReference(frames[0])
    here = [ref.register(f)[0].tolist() for f in frames[1:]]
    code = ("import json, sys, numpy as np\n"
            "from napari_registration.core.stack_refine import TranslationReference\n"
            "f = np.load(sys.argv[1])\n"
            "r = TranslationReference(f[0])\n"
            "print(json.dumps([r.register(x)[0].tolist() for x in f[1:]]))\n")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"frames_{os.getpid()}.npy")
    np.save(path, frames)
    try:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                             text=True, check=True, timeout=120)
    finally:
        os.remove(path)
    assert json.loads(out.stdout) == here


# ----------------------------------------------------------------- engine choice
def test_engine_choice_and_fallbacks():
    frames = series("camera", DRIFTS[:3])
    assert register_stack(frames, warp=False).info["polish"] == "spline"
    # options the engine does not take, other methods, tiny frames: one register() per frame
    assert register_stack(frames, warp=False, upsample=20).info["polish"] == "none"
    assert register_stack(frames, warp=False, transform="similarity").info["polish"] == "none"
    assert register_stack(frames[:, :12, :12], warp=False).info["polish"] == "none"
    assert register_stack(frames, warp=False, lowpass=None, window=False).info["polish"] == "spline"
    with pytest.raises(ValueError, match="polish='spline' cannot be used here: .*method='fourier'"):
        register_stack(frames, method="intensity", polish="spline")
    with pytest.raises(ValueError, match="polish must be one of"):
        register_stack(frames, polish="yes")
    with pytest.raises(ValueError, match="lowpass"):
        register_stack(frames, lowpass=-1)


def test_bad_frames_say_what_to_do():
    frames = series("camera", DRIFTS[:4])
    bad = frames.copy()
    bad[2, 5, 5] = np.nan
    with pytest.raises(ValueError, match="frame 2: .*NaN/inf.*nan_to_num"):
        register_stack(bad)
    flat = frames.copy()
    flat[3] = 0.5
    with pytest.raises(ValueError, match="frame 3: .*constant"):
        register_stack(flat)
    kept = register_stack(flat, on_error="identity")
    assert kept.info["failed"] == 1 and "constant" in kept.info["frames"][3]["error"]


def test_polish_declines_a_far_start_and_keeps_it():
    frames = series("camera", DRIFTS[:2])
    ref = TranslationReference(frames[0], max_step=1.5)
    start = DRIFTS[1] + np.array([2.5, -2.5])  # another basin: the polish must not wander off
    shift, info = ref.polish(frames[1], start)
    assert info["stop_reason"].startswith("declined")
    np.testing.assert_array_equal(shift, start)


def test_spline_shift_matches_scipy():
    frames = series("camera", DRIFTS[:1])
    coeffs = ndimage.spline_filter(frames[0], order=3, mode="mirror", output=np.float32)
    s = np.array([1.3, -2.71])
    region = ((4, 120), (6, 110))
    ours = spline_shift(coeffs, s, region)
    rows, cols = np.mgrid[4:120, 6:110].astype(float)
    theirs = ndimage.map_coordinates(frames[0], [rows + s[0], cols + s[1]], order=3, mode="mirror")
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
@pytest.mark.parametrize("shape,spacing", [((60, 70), (1.0, 1.0)), ((60, 70), (0.26, 0.29)),
                                           ((12, 30, 26), (2.0, 1.0, 1.0))])
def test_translation_warp_matches_resample(dtype, shape, spacing):
    """The stack's warp of a translated frame (order 1) takes a shortcut: the same values
    as core.resample, including whole-pixel shifts and samples exactly on the border."""
    from napari_registration import Transform
    from napari_registration.core.resample import resample
    from napari_registration.core.stack import _translation_offset, _warp_frame

    rng = np.random.default_rng(0)
    image = rng.random(shape) * (1000 if dtype == np.uint16 else 1)
    image = image.astype(dtype)
    shifts = [np.zeros(len(shape)), np.arange(1, len(shape) + 1, dtype=float),
              np.full(len(shape), -0.5), np.full(len(shape), 1e-9), np.full(len(shape), 200.0)]
    shifts += [rng.uniform(-8, 8, len(shape)) for _ in range(12)]
    # within rounding of whole pixels (chained "previous" steps make such shifts): x +
    # offset then rounds to either side along one axis
    shifts += [np.full(len(shape), k) + rng.uniform(-1e-13, 1e-13, len(shape))
               for k in (-3.0, -1.0, 2.0, 5.0) for _ in range(4)]
    shifts += [np.full(len(shape), v) for v in (3 - 4e-16, -2 + 1e-15, -2 - 1e-15, -5 - 2e-15,
                                                 1 + 1e-15)]
    for shift in shifts:
        t = Transform.from_translation(shift * np.asarray(spacing))
        assert _translation_offset(t, spacing, 1, image.dtype) is not None
        ours = _warp_frame(image, t, spacing, 1, False)
        theirs = resample(image, t, shape, output_spacing=spacing, input_spacing=spacing, order=1)
        assert ours.dtype == theirs.dtype
        np.testing.assert_allclose(ours.astype(float), theirs.astype(float),
                                   atol=1 if dtype == np.uint16 else 1e-5)
    # channels: each channel moved the same way; not a translation: the general path
    both = np.stack([image, image[::-1].copy()])
    t = Transform.from_translation(rng.uniform(-3, 3, len(shape)))
    np.testing.assert_array_equal(_warp_frame(both, t, spacing, 1, True)[1],
                                  _warp_frame(both[1], t, spacing, 1, False))
    assert _translation_offset(Transform.from_scale([1.01] * len(shape)), spacing, 1, image.dtype) is None
    assert _translation_offset(t, spacing, 3, image.dtype) is None


# ----------------------------------------------------------------------------- rigid
def rotating_series(n=8, size=160, seed=5, big_turn=None):
    """Crops of camera turned about the crop centre (a random walk within +-3 degrees)
    and shifted: frames and truths (frame k world -> frame 0 world)."""
    from napari_registration.data import rigid_drift_stack

    base = _image("camera", blur=0.7)
    rng = np.random.default_rng(seed)
    angles = np.clip(np.cumsum(rng.normal(0, 0.9, n)), -3, 3)
    shifts = np.cumsum(rng.normal(0, 1.2, (n, 2)), axis=0)
    angles[0], shifts[0] = 0.0, 0.0
    if big_turn is not None:
        angles[big_turn] = 40.0
    return rigid_drift_stack(base, angles, shifts, (150.0, 170.0), size)


def rigid_tre(transforms, truths, shape):
    from napari_registration.data import grid_points, tre_against_truth

    pts = grid_points(shape)
    return np.array([tre_against_truth(t, truth, pts)["mean"] for t, truth in zip(transforms, truths)])


def test_rigid_stack_is_polished_and_more_precise():
    frames, truths = rotating_series()
    spline = register_stack(frames, transform="rigid")
    plain = register_stack(frames, transform="rigid", polish="none")
    assert spline.info["polish"] == "spline"
    assert all("spline_declined" not in f for f in spline.info["frames"])
    tre = rigid_tre(spline.transforms, truths, frames.shape[1:])
    assert tre.max() < 0.01, tre
    # the bound this assertion had on main, made absolute: half the per-frame register()
    # path's mean TRE there (5.5e-4 px). register() now ends with a biweight pass on
    # 0.6 px-smoothed copies (core/refine.py) and reaches 1.7e-4 on this series; the
    # stack polish (no pre-blur by default) stays at 2.5e-4, so the ratio no longer holds
    assert tre.mean() < 2.75e-4
    assert rigid_tre(plain.transforms, truths, frames.shape[1:]).mean() < 1e-3
    assert np.abs(spline.info["frames"][3]["angle_deg"]) < 3.5


def test_rigid_with_spacing_and_a_big_turn_falls_back_per_frame():
    frames, truths = rotating_series(n=5, big_turn=3)
    result = register_stack(frames, transform="rigid", spacing=(0.5, 0.5))
    assert result.info["polish"] == "spline"
    assert "spline_declined" in result.info["frames"][3]  # 40 degrees: log-polar search
    assert [("spline_declined" in f) for f in result.info["frames"]].count(True) == 1
    # world units: scale the truth's shift by the pixel size
    from napari_registration import Transform

    px = [Transform.from_scale((0.5, 0.5)).then(t).then(Transform.from_scale((2.0, 2.0)))
          for t in result.transforms]
    tre = rigid_tre(px, truths, frames.shape[1:])
    assert tre.max() < 0.1, tre
    # non-square pixels: rotations are not rigid in index units; one register() per frame
    assert register_stack(frames[:2], transform="rigid", spacing=(1.0, 0.5),
                          warp=False).info["polish"] == "none"


@pytest.mark.parametrize("kind", ["translation", "rigid"])
def test_prepared_reference_travels_as_its_frame(kind):
    """A worker gets the reference frame and its settings (not the ~4x larger prepared
    arrays), prepares it once, and reuses it for its later frames."""
    import pickle

    from napari_registration.core import stack_refine
    from napari_registration.core.stack_refine import RigidReference

    frames = series("camera", DRIFTS[:3])
    cls = TranslationReference if kind == "translation" else RigidReference
    ref = cls(frames[0])
    blob = pickle.dumps(ref)
    assert len(blob) < 1.2 * frames[0].nbytes
    stack_refine._PREPARED.clear()
    try:
        first, again = pickle.loads(blob), pickle.loads(blob)
        assert first is again and first is not ref
        for frame in frames[1:]:
            a, b = ref.register(frame)[0], first.register(frame)[0]
            np.testing.assert_array_equal(a, b)
    finally:
        stack_refine._PREPARED.clear()
