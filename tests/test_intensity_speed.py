"""The intensity backend's cheaper path when a polish follows: the ITK linear stage's
finest level waits for the Gauss-Newton polish and runs only when the polish declines.

What could go wrong, and is checked: the skipped level costing accuracy (TRE against a
known transform, and against ITK's full stage), a multi-modal pair (polish declines)
losing its finest level, ``polish=False`` still skipping it, cancel during the level that
runs late, progress going backwards, and the rescaled-units path dropping ``polish``.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_registration import register
from napari_registration.core.register import RegistrationCancelled
from napari_registration.core.transform import Transform
from napari_registration.data import _warp_by_truth, grid_points, tre_against_truth

pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def camera256():
    from skimage import data, transform as skt

    cam = data.camera().astype(np.float32) / 255
    return skt.downscale_local_mean(cam, 2).astype(np.float32)  # 256 x 256


def _pair(img, contrast=None):
    centre = (np.array(img.shape) - 1) / 2
    truth = Transform.from_rotation(11.0, center=centre, shift=(9.3, -6.7))
    moving = np.clip(_warp_by_truth(img, truth), 0, 1).astype(np.float32)
    if contrast == "folded":
        # many-to-one: mid-grey maps to black, both ends to white (|NCC| far below 0.9,
        # so least squares does not apply; mutual information still does)
        moving = (4 * (moving - 0.5) ** 2).astype(np.float32)
    return moving, truth


def _tre(r, truth, shape):
    return tre_against_truth(r.transform, truth, grid_points(shape))["mean"]


def test_same_contrast_2d_skips_itk_levels_without_losing_accuracy(camera256):
    """2D, same contrast: the polish is accepted right after the coarse search, so no ITK
    level runs, and the result is at least as close as ITK's full stage."""
    moving, truth = _pair(camera256)
    before = moving.copy()
    fast = register(camera256, moving, method="intensity", transform="rigid", seed=0,
                    warp=False, score=False)
    full = register(camera256, moving, method="intensity", transform="rigid", seed=0,
                    polish=False, warp=False, score=False)
    assert np.array_equal(moving, before)
    stage = fast.info["stage"]
    assert stage["finest_level"] == "deferred" and stage["levels_run"] == 0
    assert stage["level_seconds"] == [] and len(stage["shrink_factors"]) >= 2
    assert fast.info["polish"]["accepted"], fast.info["polish"]
    # the result's iterations and stop condition are the polish's, which made it
    assert fast.info["iterations"] and "polish" in fast.info["stop_condition"]
    assert full.info["stage"]["finest_level"] == "run" and "polish" not in full.info
    assert len(full.info["stage"]["iterations"]) == len(full.info["stage"]["shrink_factors"])
    e_fast, e_full = _tre(fast, truth, camera256.shape), _tre(full, truth, camera256.shape)
    assert e_fast < 0.02 and e_fast <= e_full, (e_fast, e_full)


def test_same_contrast_3d_skips_itk_levels_after_the_search():
    """3D rigid, same contrast: the polish (with its own pyramid levels down to 12 voxels
    per axis) is accepted right after the coarse search, so no ITK level runs, and the
    result is as close as before (when the coarser ITK level ran first)."""
    from napari_registration.data import volume_pair

    fixed, moving, truth, spacing = volume_pair()
    r = register(fixed, moving, method="intensity", transform="rigid", fixed_spacing=spacing,
                 moving_spacing=spacing, seed=0, warp=False, score=False)
    stage = r.info["stage"]
    assert len(stage["shrink_factors"]) >= 2 and stage["levels_run"] == 0
    assert stage["finest_level"] == "deferred" and r.info["polish"]["accepted"]
    assert len(r.info["polish"]["levels"]) >= 2  # a start one search cell away needs them
    # ITK's full stage alone ends at 0.009-0.018 mm here (seeds 0-2); the polish from
    # the coarser level at 0.001-0.02 (it sometimes stops after one step at its noise
    # floor, from either start): a fiftieth of the 1 mm in-plane voxel is the bar
    grid = grid_points(fixed.shape, spacing)
    assert tre_against_truth(r.transform, truth, grid)["mean"] < 0.03


def test_same_contrast_3d_affine_defers_only_the_finest_level():
    """3D affine: from the rigid search result the polish would decline (scale and shear
    move the corners), so the coarser ITK level runs first; the finest waits for the
    polish, which samples a random subset of every non-flat voxel."""
    from napari_registration.data import volume_pair

    fixed, _, _, spacing = volume_pair()
    centre = (np.array(fixed.shape) - 1) / 2 * np.array(spacing)
    lin = np.array([[1.03, 0.02, 0.0], [0.0, 0.97, 0.03], [-0.02, 0.0, 1.02]])
    truth = Transform.from_linear(lin, centre, shift=(2.0, -3.0, 1.5))
    moving = _warp_by_truth(fixed, truth, output_spacing=spacing,
                            input_spacing=spacing).astype(np.float32)
    r = register(fixed, moving, method="intensity", transform="affine", fixed_spacing=spacing,
                 moving_spacing=spacing, seed=0, warp=False, score=False)
    stage = r.info["stage"]
    n = len(stage["shrink_factors"])
    assert n >= 2 and stage["levels_run"] == n - 1 == len(stage["iterations"])
    assert stage["finest_level"] == "deferred" and r.info["polish"]["accepted"]
    grid = grid_points(fixed.shape, spacing)
    assert tre_against_truth(r.transform, truth, grid)["mean"] < 0.05


def test_polish_declines_then_the_finest_level_runs(camera256):
    moving, truth = _pair(camera256, "folded")
    seen = []
    r = register(camera256, moving, method="intensity", transform="rigid", seed=0,
                 progress=lambda f, m: seen.append(f), warp=False, score=False)
    stage, polish = r.info["stage"], r.info["polish"]
    assert stage["finest_level"] == "run"
    assert len(stage["iterations"]) == len(stage["shrink_factors"]) >= 2
    assert not polish["accepted"] and "declined" in polish["reason"]
    # declined twice on the way: after the coarse search (2D) and before the finest level
    assert [d["itk_levels_run"] for d in polish["declined_before"]] == [0, len(stage["shrink_factors"]) - 1]
    assert not any(d["accepted"] for d in polish["declined_before"])
    assert _tre(r, truth, camera256.shape) < 0.25
    # one progress bar: never backwards, ends at 1
    assert seen[-1] == 1.0 and np.all(np.diff(seen) >= -1e-9)
    # the same as a run that never deferred (same seed, same samples per level)
    full = register(camera256, moving, method="intensity", transform="rigid", seed=0,
                    polish=False, warp=False, score=False)
    assert np.allclose(r.transform.matrix, full.transform.matrix, atol=1e-9)


def test_cancel_during_the_late_finest_level(camera256):
    moving, _ = _pair(camera256, "folded")
    state = {"cancel": False, "messages": []}

    def progress(fraction, message):
        state["messages"].append(message)
        n = message.split("level ")[-1].split(",")[0] if "level " in message else ""
        if n and n.split("/")[0] == n.split("/")[-1]:  # the finest level has started
            state["cancel"] = True

    with pytest.raises(RegistrationCancelled):
        register(camera256, moving, method="intensity", transform="rigid", seed=0,
                 progress=progress, cancel=lambda: state["cancel"], warp=False, score=False)
    assert state["cancel"]


def test_polish_false_is_honoured_in_rescaled_units(camera256):
    """Pixel sizes far from 1 register in rescaled units (a second call inside the
    backend): ``polish=False`` must reach it, and the finest level then runs."""
    moving, _ = _pair(camera256)
    sp = (1e-3, 1e-3)
    r = register(camera256, moving, method="intensity", transform="rigid", seed=0,
                 fixed_spacing=sp, moving_spacing=sp, polish=False, warp=False, score=False)
    assert r.info["world_unit_scale"] == pytest.approx(1e-3)
    assert "polish" not in r.info and r.info["stage"]["finest_level"] == "run"
    r2 = register(camera256, moving, method="intensity", transform="rigid", seed=0,
                  fixed_spacing=sp, moving_spacing=sp, warp=False, score=False)
    assert r2.info["polish"]["accepted"] and r2.info["stage"]["finest_level"] == "deferred"


def test_3d_different_contrast_skips_the_attempt_and_matches_the_full_run():
    """3D, contrast folded (many-to-one): the attempt after the search declines at the
    polish's coarsest level; |NCC| on the last ITK level is far below 0.9, so no polish
    is tried before the finest level (an attempt at full resolution that declines costs
    ~0.1-0.2 s); the finest level then runs, and the result is the one ITK's full stage
    gives."""
    from napari_registration.backends import intensity
    from napari_registration.data import volume_pair

    fixed, moving, truth, spacing = volume_pair()
    lo, hi = float(moving.min()), float(moving.max())
    folded = (4 * ((moving - lo) / (hi - lo) - 0.5) ** 2).astype(np.float32)
    kw = dict(method="intensity", transform="rigid", fixed_spacing=spacing,
              moving_spacing=spacing, seed=0, warp=False, score=False)
    r = register(fixed, folded, **kw)
    stage, polish = r.info["stage"], r.info["polish"]
    assert stage["ncc_coarse"] < 0.9 and stage["finest_level"] == "run"
    # after the search: tried on the polish's coarsest level and declined there (cheap);
    # before the finest ITK level: not tried at all
    first, second = polish["declined_before"]
    assert first["itk_levels_run"] == 0 and first["reason"].startswith("declined")
    assert second["reason"].startswith("skipped")
    grid = grid_points(fixed.shape, spacing)
    assert tre_against_truth(r.transform, truth, grid)["mean"] < 0.5
    original = intensity._defer_mode
    intensity._defer_mode = lambda ndim, transform: None  # ITK's full stage, no pause
    try:
        full = register(fixed, folded, **kw)
    finally:
        intensity._defer_mode = original
    assert "ncc_coarse" not in full.info["stage"]
    assert np.allclose(r.transform.matrix, full.transform.matrix, atol=1e-9)
