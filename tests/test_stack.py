"""register_stack: drifting time series cut from real images with known sub-pixel and
pixel drifts, 2D+t and 3D+t, every reference mode, channels, downsampling, dask input,
a dask.distributed cluster, errors, cancel and progress."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_registration import RegistrationCancelled, Transform, register
from napari_registration.core.stack import (
    StackResult,
    _coarse_geometry,
    _downsample,
    iter_register_stack,
    register_stack,
    write_tiff_stack,
)
from napari_registration.data import blobs_volume, grid_points, tre_against_truth


def drifting_series(image, drifts, size, corner, margin=16):
    """Frames cut from ``image`` after a sub-pixel shift: ``frame_i(q) = image(q + corner +
    d_i)``, so the transform mapping frame i onto frame 0 is a translation by
    ``d_i - d_0``."""
    image = np.asarray(image, np.float32)
    corner = np.asarray(corner)
    lo = corner - margin
    region = image[tuple(slice(a, a + s + 2 * margin) for a, s in zip(lo, size))]
    inner = tuple(slice(margin, margin + s) for s in size)
    return np.stack([ndimage.shift(region, -np.asarray(d), order=3, mode="nearest")[inner]
                     for d in drifts])


def smooth_drift(n, ndim=2, seed=0):
    """A slow wander plus whole-pixel jumps plus sub-pixel jitter, starting at 0."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    base = np.hstack([4 * np.sin(t / (11.0 + 2 * k)) + 0.04 * t * (-1) ** k for k in range(ndim)])
    jumps = np.cumsum(rng.integers(-1, 2, size=(n, ndim)) * (rng.random((n, ndim)) < 0.1), axis=0)
    d = base + 0.5 * np.clip(jumps, -4, 4) + rng.uniform(-0.45, 0.45, size=(n, ndim))
    return d - d[0]


def camera():
    from skimage import data

    return data.camera()


def frame_tre(result: StackResult, drifts, ref=0):
    """Mean TRE (px) of each frame's transform, relative to frame ``ref``."""
    shape = result.frame_shape
    pts = grid_points(shape)
    back = result.transforms[ref].inverse()
    out = []
    for i, t in enumerate(result.transforms):
        truth = Transform.from_translation(np.asarray(drifts[i]) - np.asarray(drifts[ref]))
        out.append(tre_against_truth(t.then(back), truth, pts)["mean"])
    return np.array(out)


@pytest.fixture(scope="module")
def series2d():
    drifts = smooth_drift(24)
    return drifting_series(camera(), drifts, (128, 128), (180, 200)), drifts


# ------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("reference", ["first", "mean", 7, "image"])
def test_2d_series_recovered_to_a_tenth_of_a_pixel(series2d, reference):
    frames, drifts = series2d
    if reference == "image":                         # a template image: here frame 0
        reference = frames[0].copy()
    result = register_stack(frames, reference=reference)
    reference = "image" if isinstance(reference, np.ndarray) else reference
    ref = 7 if reference == 7 else 0
    err = frame_tre(result, drifts, ref=ref)
    assert err.max() <= 0.1, err
    assert result.warped.shape == frames.shape and result.warped.dtype == frames.dtype
    assert len(result.transforms) == len(frames)
    if isinstance(reference, int):
        assert np.allclose(result.transforms[7].matrix, np.eye(3))
    # the drift is the content's displacement: minus the true offset
    assert np.allclose(result.drift - result.drift[ref], -(drifts - drifts[ref]), atol=0.15)


def test_previous_chains_100_frames_without_accumulating():
    drifts = smooth_drift(100, seed=3)
    frames = drifting_series(camera(), drifts, (128, 128), (150, 260))
    result = register_stack(frames, reference="previous")
    err = frame_tre(result, drifts)
    assert err[-1] <= 0.5 and err.max() <= 0.5, err
    assert err.mean() <= 0.1
    assert result.info["frames"][0]["registered_to"] is None
    assert result.info["frames"][5]["registered_to"] == 4
    # T_i = t(i -> i-1).then(T_{i-1}): consecutive transforms differ by one step
    step = result.transforms[10].then(result.transforms[9].inverse())
    assert np.allclose(step.matrix[:2, 2], drifts[10] - drifts[9], atol=0.1)


def test_aligned_frames_match_the_reference(series2d):
    frames, _ = series2d
    result = register_stack(frames[:8])
    inner = (slice(16, -16), slice(16, -16))
    before = np.mean([np.abs(frames[i][inner] - frames[0][inner]).mean() for i in range(1, 8)])
    after = np.mean([np.abs(result.warped[i][inner] - frames[0][inner]).mean() for i in range(1, 8)])
    assert after < 0.25 * before


def textured_volume(shape, seed=2):
    """Blurred fine binary blobs. (The coarse blobs of ``data.blobs_volume`` leave the
    fourier backend's sub-pixel shift along a short plane axis 0.3-0.6 px off, and
    scikit-image's phase_cross_correlation 0.7-1.4 px: too smooth for a 0.1 px test.)"""
    from skimage.data import binary_blobs

    vol = binary_blobs(length=max(shape), n_dim=3, blob_size_fraction=0.03, volume_fraction=0.3,
                       rng=seed)[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    return ndimage.gaussian_filter(vol, 1.0)


def test_3d_series_anisotropic():
    volume = textured_volume((60, 94, 94))
    drifts = smooth_drift(6, ndim=3, seed=1) * 0.6
    frames = drifting_series(volume, drifts, (40, 64, 64), (10, 15, 15), margin=6)
    result = register_stack(frames, spacing=(2.0, 1.0, 1.0))
    # world units along the plane axis are 2x pixels: convert the truth to world
    world = drifts * np.array([2.0, 1.0, 1.0])
    pts = grid_points(frames.shape[1:], (1.0, 1.0, 1.0))
    for i, t in enumerate(result.transforms):
        # the error in pixels: scale the world transform back to index units
        px = Transform.from_scale((2.0, 1.0, 1.0)).then(t).then(Transform.from_scale((0.5, 1, 1)))
        truth = Transform.from_translation(drifts[i])
        assert tre_against_truth(px, truth, pts)["mean"] <= 0.1, i
        assert np.allclose(t.matrix[:3, 3], world[i], atol=0.2)
    assert result.warped.shape == frames.shape


# ------------------------------------------------------------------------- channels
def test_two_channels_driven_by_one_stay_aligned(series2d):
    from skimage import data

    frames, drifts = series2d
    n = 12
    other = drifting_series(data.moon(), drifts[:n], (128, 128), (180, 200))
    stack = np.stack([other, frames[:n]], axis=-1)          # (t, y, x, c)
    result = register_stack(stack, channel_axis=-1, driver_channel=1)
    assert result.warped.shape == stack.shape
    err = frame_tre(result, drifts[:n])
    assert err.max() <= 0.1
    # the passenger channel is aligned as well as the driver: what is left between its
    # corrected frames and its first frame is below a tenth of a pixel
    for i in range(1, n):
        left = register(result.warped[0, ..., 0], result.warped[i, ..., 0], score=False,
                        warp=False)
        assert np.linalg.norm(left.transform.matrix[:2, 2]) <= 0.1, i


# --------------------------------------------------------------------- downsampling
def test_coarse_copy_keeps_world_positions():
    spacing = (0.5, 2.0)
    rr, cc = np.mgrid[:120, :90].astype(float)
    blob = np.exp(-((rr - 52.3) ** 2 + (cc - 40.6) ** 2) / 60.0)
    full_c = np.array([np.sum(blob * rr), np.sum(blob * cc)]) / blob.sum() * spacing
    small = _downsample(blob, (2, 3))
    sp, origin = _coarse_geometry(spacing, (2, 3))
    r2, c2 = np.mgrid[:small.shape[0], :small.shape[1]].astype(float)
    coarse_c = (np.array([np.sum(small * r2), np.sum(small * c2)]) / small.sum()
                * np.array(sp) + np.array(origin))
    assert np.allclose(coarse_c, full_c, atol=1e-4)


def test_downsampled_registration_applies_at_full_resolution():
    drifts = smooth_drift(8, seed=5) * 2
    frames = drifting_series(camera(), drifts, (192, 192), (120, 140), margin=24)
    result = register_stack(frames, downsample=2, spacing=(0.5, 0.5))
    assert result.info["downsample"] == [2, 2]
    pts = grid_points(frames.shape[1:], (0.5, 0.5))
    for i, t in enumerate(result.transforms):
        truth = Transform.from_translation(drifts[i] * 0.5)
        # in full-resolution pixels: half a world unit per pixel
        assert tre_against_truth(t, truth, pts)["mean"] / 0.5 <= 0.15, i
    assert result.warped.shape == frames.shape


def test_pyramid_level_is_registered_and_full_resolution_warped():
    from skimage.transform import downscale_local_mean

    drifts = smooth_drift(6, seed=7) * 2
    frames = drifting_series(camera(), drifts, (192, 192), (120, 140), margin=24)
    level1 = np.stack([downscale_local_mean(f, (2, 2)) for f in frames])  # a napari pyramid level
    result = register_stack(frames, coarse=level1, reference="previous")
    assert result.info["coarse_shape"] == [96, 96]
    assert result.info["registration_spacing"] == [2.0, 2.0]
    err = frame_tre(result, drifts)
    assert err.max() <= 0.15, err
    assert result.warped.shape == frames.shape
    with pytest.raises(ValueError, match="as many frames"):
        register_stack(frames, coarse=level1[:3])


# ------------------------------------------------------------------------------ dask
def test_dask_stack_is_warped_lazily_and_matches_numpy(series2d, tmp_path):
    import dask.array as da
    import tifffile

    frames, drifts = series2d
    stack = frames[:10]
    eager = register_stack(stack)
    lazy = register_stack(da.from_array(stack, chunks=(3, 64, 128)))
    assert isinstance(lazy.warped, da.Array) and lazy.info["lazy"]
    for a, b in zip(eager.transforms, lazy.transforms):
        assert np.allclose(a.matrix, b.matrix)
    np.testing.assert_allclose(lazy.warped.compute(), eager.warped, atol=1e-5)
    path = write_tiff_stack(tmp_path / "aligned.tif", lazy.warped, frames_per_batch=4)
    np.testing.assert_allclose(tifffile.imread(path), eager.warped, atol=1e-5)


def test_local_dask_cluster_runs_frames_as_tasks(series2d):
    distributed = pytest.importorskip("distributed")
    frames, drifts = series2d
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        result = register_stack(frames[:16], reference="previous", client=client)
    assert result.info["scheduler"] == "dask.distributed"
    assert frame_tre(result, drifts[:16]).max() <= 0.1
    assert result.warped.shape == (16, 128, 128)


# ------------------------------------------------------------------- errors & control
def test_bad_input_says_what_to_change(series2d):
    frames, _ = series2d
    with pytest.raises(ValueError, match="out of range"):
        register_stack(frames, axis=3)
    with pytest.raises(ValueError, match="reference frame 99"):
        register_stack(frames, reference=99)
    with pytest.raises(ValueError, match="reference must be one of"):
        register_stack(frames, reference="last")
    with pytest.raises(ValueError, match="different axes"):
        register_stack(frames[..., None], channel_axis=0)
    with pytest.raises(ValueError, match="spacing"):
        register_stack(frames, spacing=(1.0, 2.0, 3.0, 4.0))
    with pytest.raises(ValueError, match="downsample"):
        register_stack(frames, downsample=0)
    with pytest.raises(ValueError, match="1D frames"):
        register_stack(frames[:, 0])
    with pytest.raises(ValueError, match="reference image cannot be combined"):
        register_stack(frames[:3], reference=frames[0], coarse=frames[:3, ::2, ::2])
    with pytest.raises(ValueError, match="one frame's shape"):
        register_stack(frames[:3], reference=frames[0, :10])
    with pytest.raises(ValueError, match="unknown option"):
        register_stack(frames[:3], colour="red")


def test_failing_frame_raises_or_is_kept_in_place(series2d):
    frames, drifts = series2d
    stack = frames[:6].copy()
    stack[3] = 0.5                                   # a blank frame cannot be registered
    with pytest.raises(ValueError, match="frame 3"):
        register_stack(stack)
    result = register_stack(stack, on_error="identity")
    assert result.info["failed"] == 1 and "constant" in result.info["frames"][3]["error"]
    assert np.allclose(result.transforms[3].matrix, np.eye(3))
    err = frame_tre(result, drifts[:6])
    assert np.all(np.delete(err, 3) <= 0.1)
    assert np.all(frames[:6] == series2d[0][:6])     # input untouched


def test_progress_cancel_and_generator(series2d):
    frames, _ = series2d
    seen = []
    register_stack(frames[:6], progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any("frame 5" in m for _, m in seen)

    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(RegistrationCancelled):
        register_stack(frames[:20], cancel=cancel)
    assert len(calls) < 20

    gen = iter_register_stack(frames[:4], reference="previous")
    events = []
    with pytest.raises(StopIteration) as stop:
        while True:
            events.append(next(gen))
    assert [e["phase"] for e in events] == ["register"] * 3 + ["warp"] * 4
    assert isinstance(stop.value.value, StackResult)


def test_to_dict_round_trips(series2d):
    frames, _ = series2d
    result = register_stack(frames[:5], spacing=(0.3, 0.3, 0.3))   # napari layer.scale
    assert result.spacing == (0.3, 0.3)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["shape"] == [5, 128, 128] and len(d["transforms"]) == 5
    again = [Transform.from_dict(t) for t in d["transforms"]]
    assert all(a == b for a, b in zip(again, result.transforms))
    assert np.allclose(d["drift"], result.drift)
    first = d["info"]["frames"][1]
    assert first["ncc_after"] > first["ncc_before"] and "metrics" not in first
    scored = register_stack(frames[:3], score=True)
    metrics = scored.info["frames"][2]["metrics"]
    assert metrics["after"]["ncc"] > metrics["before"]["ncc"] and "ssim" in metrics["after"]


def test_time_axis_not_first(series2d):
    frames, drifts = series2d
    moved = np.moveaxis(frames[:6], 0, 2)            # (y, x, t)
    result = register_stack(moved, axis=2)
    assert result.warped.shape == moved.shape
    assert frame_tre(result, drifts[:6]).max() <= 0.1
    eager = register_stack(frames[:6])
    np.testing.assert_allclose(np.moveaxis(result.warped, 2, 0), eager.warped, atol=1e-5)


def test_stack_api_imports_no_dask_or_qt():
    import subprocess
    import sys

    code = ("import sys, napari_registration as n; n.register_stack; "
            "print(sorted(m for m in ('dask', 'distributed', 'napari', 'qtpy', 'magicgui', "
            "'tifffile') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
