"""``method="auto"`` round 3: what auto does NOT compute on cheap pairs (its overhead
is what made it cost 2-3x the method it keeps), checked by making the skipped work fail."""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration import Transform, register
from napari_registration.data import _warp_by_truth, grid_points, tre_against_truth


def _camera(factor=2):
    from skimage import data
    from skimage.transform import downscale_local_mean

    return downscale_local_mean(data.camera().astype(np.float32) / 255,
                                (factor, factor)).astype(np.float32)


def test_a_clear_shift_never_builds_the_spline_judge(monkeypatch):
    """Fourier at full resolution reaches |NCC| >= stop_ncc on its own overlap: the
    cubic-spline judge (spline coefficients of the moving image, as costly as the
    Fourier stage) is neither needed to stop nor to rank a single candidate."""
    from napari_registration.core import refine

    def boom(*a, **kw):
        raise AssertionError("LinearJudge built on a clear shift")

    monkeypatch.setattr(refine, "LinearJudge", boom)
    fixed = _camera(1)
    truth = Transform.from_translation([7.3, -11.6])
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    r = register(fixed, moving, method="auto", transform="translation", warp=False, score=False)
    chosen = r.info["stages"][r.info["chosen"]["stage"]]
    assert (chosen["method"], chosen["model"]) == ("fourier", "translation")
    assert chosen["aligned_ncc"] >= 0.98
    assert tre_against_truth(r.transform, truth, grid_points(fixed.shape))["mean"] < 0.01


def test_auto_gets_clipped_images_equal_to_the_clipped_pipeline(monkeypatch):
    """The core makes auto's clipped images from its linear copies (one percentile pass
    per image instead of two): they must equal what prepare(clip=True) gives, bit for
    bit, with and without a mask; and with smoothing the two are made separately."""
    from napari_registration.backends import auto
    from napari_registration.core.preprocess import prepare

    seen = {}
    original = auto.register

    def spy(fixed, moving, **kw):
        seen["images"] = (fixed.copy(), moving.copy(), kw.get("linear_copy"))
        return original(fixed, moving, **kw)

    monkeypatch.setattr(auto, "register", spy)
    rng = np.random.default_rng(1)
    fixed = (rng.gamma(2.0, 30.0, (96, 120)) + 40 * _camera(4)[:96, :120]).astype(np.uint16)
    moving = np.roll(fixed, (3, -2), axis=(0, 1))
    mask = np.zeros(fixed.shape, bool)
    mask[8:-8, 10:-10] = True
    for kw in ({}, {"fixed_mask": mask}, {"smooth": 1.0}):
        register(fixed, moving, method="auto", transform="translation", warp=False,
                 score=False, **kw)
        f, m, linear = seen["images"]
        sm = kw.get("smooth", 0.0)
        want_f = prepare(fixed, mask=kw.get("fixed_mask"), smooth_=sm, clip=True)
        want_m = prepare(moving, smooth_=sm, clip=True)
        assert f.dtype == np.float32 and np.array_equal(f, want_f)
        assert np.array_equal(m, want_m)
        assert linear is not None
        if not sm:  # bright detail beyond the 99.5th percentile kept in the linear copy
            assert linear[0].max() > 1.0 >= f.max()
            np.testing.assert_array_equal(np.clip(linear[0], 0, 1), f)


def test_an_affine_request_takes_the_similarity_start_without_polishing_it(monkeypatch):
    """For an affine request the Fourier similarity is only the start of the affine
    Gauss-Newton pass: its own spline polish (a similarity fitted to a sheared pair,
    declined) and the full-resolution re-search that a declined polish triggers cost
    0.3 s on the report's retina pair and gave the same affine result."""
    from napari_registration.backends import fourier

    def boom(*a, **kw):
        raise AssertionError("fourier polished a start that the affine pass replaces")

    monkeypatch.setattr(fourier, "_refine_spline", boom)
    fixed = _camera(2)
    c = (np.array(fixed.shape) - 1) / 2
    lin = np.array([[1.04, 0.06], [-0.05, 0.96]])  # shear: no similarity fits it
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = c - lin @ c + (3.2, -2.1)
    truth = Transform(m)
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    r = register(fixed, moving, method="auto", transform="affine", warp=False, score=False)
    searched = [s for s in r.info["stages"] if (s["method"], s["model"]) == ("fourier", "similarity")]
    assert searched and searched[0]["error"] is None
    chosen = r.info["stages"][r.info["chosen"]["stage"]]
    assert (chosen["method"], chosen["model"]) == ("polish", "affine")
    assert tre_against_truth(r.transform, truth, grid_points(fixed.shape))["mean"] < 0.01


def test_3d_rigid_runs_intensity_first_and_skips_the_shift_when_it_is_aligned(monkeypatch):
    """3D rigid: intensity from scratch (its own start search) goes before the Fourier
    shift; when it ends clearly aligned the shift, its scoring and the cubic-spline judge
    are not computed (they cost half the intensity run on a 3D brain and never changed
    the choice), and the result is intensity's."""
    from napari_registration.core import refine
    from napari_registration.data import volume_pair

    def boom(*a, **kw):
        raise AssertionError("LinearJudge built for a clearly aligned 3D result")

    monkeypatch.setattr(refine, "LinearJudge", boom)
    fixed, moving, truth, spacing = volume_pair()
    geo = dict(fixed_spacing=spacing, moving_spacing=spacing, seed=0, warp=False, score=False)
    r = register(fixed, moving, method="auto", transform="rigid", **geo)
    ran = [(s["method"], s["model"]) for s in r.info["stages"]]
    assert ran == [("none", "identity"), ("intensity", "rigid")]
    skipped = [(s["method"], s["on"]) for s in r.info["skipped"]]
    assert ("fourier", "intensities") in skipped and ("fourier", "gradient magnitude") in skipped
    assert tre_against_truth(r.transform, truth, grid_points(fixed.shape, spacing))["mean"] < 0.05


def test_3d_rigid_still_runs_the_shift_after_intensity_when_not_aligned():
    """With no early stop (stop_ncc=None) every stage runs: the Fourier shifts follow the
    intensity run from scratch in 3D, on coarse copies, and auto still ends precise."""
    from napari_registration.data import volume_pair

    fixed, moving, truth, spacing = volume_pair()
    geo = dict(fixed_spacing=spacing, moving_spacing=spacing, seed=0, warp=False, score=False)
    r = register(fixed, moving, method="auto", transform="rigid", stop_ncc=None, **geo)
    ran = [(s["method"], s["model"], s["on"]) for s in r.info["stages"]]
    assert ran[1] == ("intensity", "rigid", "intensities")
    assert ("fourier", "translation", "intensities") in ran[2:]
    assert ("fourier", "translation", "gradient magnitude") in ran[2:]
    # 3D coarse shifts run on copies of at most 64 voxels per axis (a quarter of
    # coarse_size: 64^3 voxels are as many as a 512^2 image), not the 48 x 96 x 96 volume
    shifts = [s for s in r.info["stages"] if s["method"] == "fourier"]
    assert all("at most 64 px per axis" in s["why"] and s["error"] is None for s in shifts)
    assert tre_against_truth(r.transform, truth, grid_points(fixed.shape, spacing))["mean"] < 0.05


def test_a_clear_large_rotation_never_builds_the_spline_judge(monkeypatch):
    """camera turned 150 degrees (rigid): the Fourier fast path clears stop_ncc on its own
    overlap, and the coarse Fourier shift before it is misaligned (|NCC| ~0.26): the
    judge is needed neither to stop, nor to rank the two, nor to pick what to polish."""
    from napari_registration.core import refine

    def boom(*a, **kw):
        raise AssertionError("LinearJudge built on a clear rotation")

    monkeypatch.setattr(refine, "LinearJudge", boom)
    fixed = _camera(2)
    c = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(150.0, center=c, shift=(3.5, -2.5))
    moving = _warp_by_truth(fixed, truth).astype(np.float32)
    r = register(fixed, moving, method="auto", transform="rigid", warp=False, score=False)
    chosen = r.info["stages"][r.info["chosen"]["stage"]]
    assert (chosen["method"], chosen["model"]) == ("fourier", "rigid")
    assert chosen["aligned_ncc"] >= 0.98
    shift = [s for s in r.info["stages"] if (s["method"], s["model"]) == ("fourier", "translation")]
    assert shift and "not rescored" in shift[0]["score"]["footing"]
    assert r.info["metric"] == "ncc" and r.info["score"] == chosen["score"]["ncc"]
    assert tre_against_truth(r.transform, truth, grid_points(fixed.shape))["mean"] < 0.01


def test_hopeless_needs_a_clearly_aligned_anchor_and_lower_mutual_information():
    """Only candidates misaligned next to a clearly aligned one are left out of the
    judge: not without such an anchor, and never the best by mutual information."""
    from napari_registration.backends.auto import _hopeless

    def st(ncc, mi):
        return {"score": {"ncc": ncc, "mi": mi, "overlap": 1.0}}

    ident = Transform.identity(2)
    real = [(0, ident), (1, ident), (2, ident)]
    stages = [st(0.97, 2.0), st(0.3, 0.2), st(-0.2, 0.1)]
    assert _hopeless(stages, real, {}) == {1, 2}
    # the anchor may be clearly aligned by the judge only
    stages[0]["score"]["ncc"] = 0.9
    assert _hopeless(stages, real, {}) == set()
    assert _hopeless(stages, real, {0: 0.99}) == {1, 2}
    # a misaligned-looking candidate with the highest mutual information stays
    stages[2]["score"]["mi"] = 3.0
    assert _hopeless(stages, real, {0: 0.99}) == {1}
    # no anchor: nothing dropped; fine-textured but aligned candidates stay
    assert _hopeless([st(0.91, 1.3), st(0.6, 0.5)], real[:2], {}) == set()
    assert _hopeless([st(0.99, 1.3), st(0.6, 0.5)], real[:2], {}) == set()


def test_the_baseline_score_needs_no_interpolation_and_is_unchanged():
    """On one grid the identity (every baseline) is scored from the moving image's own
    pixels: bit for bit what resampling gives, at every subsampling step."""
    from napari_registration.backends.auto import _warp_with_mask
    from napari_registration.core.resample import overlap_mask, resample

    rng = np.random.default_rng(3)
    for shape in ((64, 80), (33, 20, 27)):
        moving = rng.random(shape).astype(np.float32)
        ident = Transform.identity(len(shape))
        for k in (1, 2, 3):
            sub = tuple(slice(None, None, k) for _ in shape)
            out = moving[sub].shape
            geo = dict(output_spacing=(float(k),) * len(shape), input_spacing=(1.0,) * len(shape))
            warped, mask = _warp_with_mask(moving, ident, out, geo, sub)
            np.testing.assert_array_equal(warped, resample(moving, ident, out, **geo))
            np.testing.assert_array_equal(mask, overlap_mask(moving.shape, ident, out, **geo))
            # any other transform is resampled as before
            shift = Transform.from_translation([0.5] * len(shape))
            w2, m2 = _warp_with_mask(moving, shift, out, geo, sub)
            np.testing.assert_array_equal(w2, resample(moving, shift, out, **geo))
            assert not m2.all()


def test_auto_scores_equal_compare_exactly():
    """auto's stage scores (no MSE, overlap values picked once, identity shortcut) are
    core.metrics.compare's ncc and mi to the last bit, with and without a fixed mask."""
    from napari_registration.backends.auto import _score
    from napari_registration.core.metrics import compare
    from napari_registration.core.resample import overlap_mask, resample

    fixed = _camera(2)
    rng = np.random.default_rng(5)
    moving = _warp_by_truth(fixed, Transform.from_rotation(20.0, center=(127.5, 127.5))).astype(np.float32)
    for tf in (Transform.identity(2), Transform.from_translation([2.3, -4.1]),
               Transform.from_rotation(-20.0, center=(127.5, 127.5))):
        for fmask in (None, rng.random(fixed.shape) > 0.3):
            got = _score(fixed, moving, tf, (1.0, 1.0), (1.0, 1.0), fmask)
            geo = dict(output_spacing=(1.0, 1.0), input_spacing=(1.0, 1.0))
            mask = overlap_mask(moving.shape, tf, fixed.shape, **geo)
            if fmask is not None:
                mask &= fmask
            want = compare(fixed, resample(moving, tf, fixed.shape, **geo), mask, with_ssim=False)
            assert (got["ncc"], got["mi"], got["overlap"]) == (want["ncc"], want["mi"], want["overlap"])
