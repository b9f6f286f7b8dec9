"""method="auto": chains methods, scores every stage, keeps the best; and succeeds
where a single default method fails."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_registration import (RegistrationCancelled, RegistrationError, Transform,
                                 available_methods, register)
from napari_registration.data import _warp_by_truth, grid_points, tre_against_truth


def _camera():
    from skimage import data, transform as sktf

    img = data.camera().astype(np.float32) / 255
    return sktf.rescale(img, 0.5, anti_aliasing=True).astype(np.float32)  # 256 x 256, real photo


@pytest.fixture(scope="module")
def rotated_pair():
    """Camera and a copy turned by 60 degrees and scaled 1.3x (plus a shift)."""
    fixed = _camera()
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(60.0, center=centre, scale=1.3, shift=(10.0, -15.0))
    return fixed, _warp_by_truth(fixed, truth).astype(np.float32), truth


@pytest.fixture(scope="module")
def multimodal_pair():
    """Camera and a shifted, slightly turned copy whose contrast is inverted and
    nonlinearly remapped (1 - sqrt(I)): same structure, different intensities."""
    fixed = _camera()
    centre = (np.array(fixed.shape) - 1) / 2
    truth = Transform.from_rotation(8.0, center=centre, shift=(12.3, -20.6))
    moving = _warp_by_truth(fixed, truth)
    moving = (1.0 - np.sqrt(np.clip(moving, 0, 1))).astype(np.float32)
    return fixed, moving, truth


def _tre(result, truth, shape):
    return tre_against_truth(result.transform, truth, grid_points(shape))["mean"]


def test_auto_succeeds_on_large_rotation_and_scale_where_default_fails(rotated_pair):
    fixed, moving, truth = rotated_pair
    default = register(fixed, moving)  # fourier translation
    assert _tre(default, truth, fixed.shape) > 20.0
    res = register(fixed, moving, method="auto", transform="similarity")
    assert _tre(res, truth, fixed.shape) < 0.5
    assert res.metrics["after"]["ncc"] > 0.95 > default.metrics["after"]["ncc"]
    _check_stages(res)
    assert res.info["chosen"]["model"] in ("similarity",)
    # once a stage is clearly right, the remaining coarse stages are skipped, with reason
    for s in res.info["skipped"]:
        assert s["why"].startswith("skipped:") and "stop_ncc" in s["why"]
    json.dumps(res.to_dict())


def test_auto_succeeds_on_a_multimodal_pair_where_default_fails(multimodal_pair):
    fixed, moving, truth = multimodal_pair
    default = register(fixed, moving)
    assert _tre(default, truth, fixed.shape) > 20.0
    res = register(fixed, moving, method="auto", transform="rigid")
    assert _tre(res, truth, fixed.shape) < 0.5
    _check_stages(res)
    # structure made the difference: the raw-intensity Fourier stages scored lower
    chosen = res.info["stages"][res.info["chosen"]["stage"]]
    raw = [s for s in res.info["stages"] if s["method"] == "fourier" and s["on"] == "intensities"
           and s["score"] is not None and not s.get("rejected")]
    assert all(s["score"]["mi"] < chosen["score"]["mi"] for s in raw)
    # mutual information sees the match; correlation is strongly negative (inverted)
    assert res.metrics["after"]["ncc"] < -0.8
    if "intensity" in available_methods():  # refinement ran with mutual information
        refine = [s for s in res.info["stages"] if s["method"] == "intensity"]
        assert refine and refine[0]["error"] is None and "mutual information" in refine[0]["why"]


def _check_stages(res):
    stages = res.info["stages"]
    assert stages[0]["model"] == "identity"
    for s in stages:
        assert {"method", "model", "why", "transform", "score", "seconds", "error"} <= set(s)
        assert s["error"] is not None or s["score"] is not None
    scored = [s for s in stages if s["score"] is not None and not s.get("rejected")]
    best = max(scored, key=lambda s: s["score"][res.info["metric"]])
    assert stages[res.info["chosen"]["stage"]] is best
    assert res.info["score"] == best["score"][res.info["metric"]] > res.info["baseline_score"]
    np.testing.assert_allclose(best["transform"].matrix, res.transform.matrix)


def test_auto_translation_3d_with_spacing():
    from napari_registration.data import blobs_volume

    fixed = blobs_volume((32, 64, 64))
    spacing = (2.0, 1.0, 1.0)
    truth = Transform.from_translation([5.0, -7.5, 3.2])
    moving = _warp_by_truth(fixed, truth, output_spacing=spacing, input_spacing=spacing)
    res = register(fixed, moving, method="auto", transform="translation",
                   fixed_spacing=spacing, moving_spacing=spacing)
    pts = grid_points(fixed.shape, spacing)
    default = register(fixed, moving, fixed_spacing=spacing, moving_spacing=spacing)
    tre_auto = tre_against_truth(res.transform, truth, pts)["mean"]
    # sub-voxel, and never worse than the plain Fourier default it includes as a stage
    assert tre_auto < 0.5
    assert tre_auto <= tre_against_truth(default.transform, truth, pts)["mean"] + 1e-9
    assert all(s["model"] != "similarity" for s in res.info["stages"])  # 2D-only stage skipped


def test_a_failing_stage_is_recorded_and_the_next_one_used(monkeypatch, rotated_pair):
    from napari_registration.backends import fourier

    original = fourier.register

    def broken(fixed, moving, *, transform, **kw):
        if transform != "translation":
            raise RegistrationError("simulated log-polar failure")
        return original(fixed, moving, transform=transform, **kw)

    monkeypatch.setattr(fourier, "register", broken)
    fixed, moving, truth = rotated_pair
    # a pure shift: translation stages can solve it while the similarity ones fail
    shifted = _warp_by_truth(fixed, Transform.from_translation([6.0, -9.0])).astype(np.float32)
    res = register(fixed, shifted, method="auto", transform="similarity", use_features=False,
                   refine=False, stop_ncc=None)  # run every stage, even after a good one
    failed = [s for s in res.info["stages"] if s["error"]]
    assert len(failed) == 2 and all("simulated log-polar failure" in s["error"] for s in failed)
    assert res.info["chosen"]["model"] == "translation"
    assert len(res.info["stage_errors"]) == 2
    est = res.transform.matrix
    np.testing.assert_allclose(est[:2, 2], [6.0, -9.0], atol=0.1)

    def all_broken(*a, **kw):
        raise RegistrationError("simulated failure")

    monkeypatch.setattr(fourier, "register", all_broken)
    with pytest.raises(RegistrationError, match="no method produced an alignment.*simulated failure"):
        register(fixed, shifted, method="auto", transform="similarity", use_features=False,
                 refine=False, stop_ncc=None)


def test_auto_cancel_and_bad_options(rotated_pair):
    fixed, moving, _ = rotated_pair
    with pytest.raises(RegistrationCancelled):
        register(fixed, moving, method="auto", transform="similarity", cancel=lambda: True)
    with pytest.raises(ValueError, match="stop_ncc must be in"):
        register(fixed, moving, method="auto", stop_ncc=0.0)
    with pytest.raises(ValueError, match="metric must be 'mi'"):
        register(fixed, moving, method="auto", metric="ssd")
    with pytest.raises(ValueError, match="does not support transform 'tps'"):
        register(fixed, moving, method="auto", transform="tps")


@pytest.mark.skipif("features" not in available_methods(), reason="features backend not installed")
def test_auto_homography_uses_features():
    from skimage.transform import rescale

    from napari_registration.data import photo_pair

    fixed, moving, truth = photo_pair()
    # half resolution, same world: skimage puts small pixel i at big pixel 2 i + 0.5
    geo = dict(fixed_spacing=(2.0, 2.0), moving_spacing=(2.0, 2.0),
               fixed_origin=(0.5, 0.5), moving_origin=(0.5, 0.5))
    res = register(rescale(fixed, 0.5), rescale(moving, 0.5), method="auto",
                   transform="homography", **geo)
    assert _tre(res, truth, fixed.shape) < 1.0
    assert any(s["method"] == "features" and s["error"] is None for s in res.info["stages"])


@pytest.mark.skipif("intensity" not in available_methods(), reason="intensity backend not installed")
def test_auto_refines_with_intensity_where_intensity_alone_fails(rotated_pair):
    fixed, moving, truth = rotated_pair
    try:
        alone = register(fixed, moving, method="intensity", transform="similarity")
        alone_tre = _tre(alone, truth, fixed.shape)
    except RegistrationError:
        alone_tre = np.inf
    assert alone_tre > 5.0  # a local optimiser does not reach a 60 degree turn
    res = register(fixed, moving, method="auto", transform="affine")
    refine = [s for s in res.info["stages"] if s["method"] == "intensity"]
    if refine:
        assert refine[0]["error"] is None, refine
    else:  # the Fourier + affine Gauss-Newton fast path was already clearly aligned
        chosen = res.info["stages"][res.info["chosen"]["stage"]]
        assert (chosen["method"], chosen["model"]) in (("polish", "affine"),
                                                       ("fourier", "similarity")), chosen
        assert any("stop_ncc" in s["why"] for s in res.info["skipped"]), res.info["skipped"]
    assert _tre(res, truth, fixed.shape) < 0.5
