"""Register coarse, apply fine, bend in the middle: the optional B-spline refinement of a
pyramid registration on a middle level, and lazy warps through displacement fields."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_registration import Transform, apply_transform, register
from napari_registration.bigdata import slide_pair, smooth_deformation
from napari_registration.core.lazy import lazy_resample
from napari_registration.core.resample import resample
from napari_registration.core.transform import FieldStep

SIZE = 2048


@pytest.fixture(scope="module")
def bent_pair():
    # a real slide (scikit-image's IHC + camera detail) rotated, shifted and bent by a
    # smooth deformation of up to 10 px at full resolution
    return slide_pair(SIZE, angle=2.5, shift=(31.7, -18.3), levels=4, chunks=512, deform=10.0)


def _tre(transform, truth):
    g = np.linspace(0.1 * (SIZE - 1), 0.9 * (SIZE - 1), 9)
    pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    d = np.linalg.norm(transform.apply(pts) - truth.apply(pts), axis=1)
    return float(d.mean()), float(d.max())


def test_smooth_deformation_is_smooth_and_sized():
    step = smooth_deformation((1000, 500), 7.0, seed=2, spacing=(1.0, 2.0))
    assert step.direction == "forward"
    assert np.abs(step.field).max() == pytest.approx(7.0, rel=1e-5)
    # it covers the field of view exactly (last node at the far corner)
    far = step.origin + (np.array(step.field.shape[:-1]) - 1) * step.spacing
    np.testing.assert_allclose(far, (999.0, 998.0))
    assert step.jacobian_determinant().min() > 0.9  # no folds, gentle


def test_deformable_refinement_beats_linear_at_full_resolution(bent_pair):
    fixed, moving, truth = bent_pair
    linear = register(fixed, moving, method="fourier", transform="rigid", pixel_budget=300,
                      warp=False)
    bent = register(fixed, moving, method="fourier", transform="rigid", pixel_budget=300,
                    pyramid_deformable=True, deformable_budget=512)
    d = bent.info["pyramid"]["deformable"]
    # estimated on 256^2 (level 3), tiles refine it, the B-spline runs on 512^2 (level 2)
    assert bent.info["pyramid"]["fixed_level"] == 3 and d["level"] == 2
    assert d["jacobian_determinant"]["folded_voxels"] == 0
    lin_mean, lin_max = _tre(linear.transform, truth)
    mean, worst = _tre(bent.transform, truth)
    assert lin_mean > 2.0  # the bend is there: a rigid transform cannot follow it
    assert mean < 0.5 and worst < 1.5
    assert mean < lin_mean / 4
    # the field is stored small, in world units: at most 129 nodes a side
    fields = [s for s in bent.transform.steps if isinstance(s, FieldStep)]
    assert len(fields) == 1 and max(fields[0].field.shape[:-1]) <= 129
    # the transform survives a JSON round trip
    again = Transform.from_dict(bent.transform.to_dict())
    assert _tre(again, truth)[0] == pytest.approx(mean, abs=1e-6)
    # warped lazily at every level; level 1 agrees with the fixed slide (aligned)
    assert isinstance(bent.warped, list) and len(bent.warped) == 4
    w = np.asarray(bent.warped[1][400:700, 400:700]).astype(float)
    ref = np.asarray(fixed[1][400:700, 400:700]).astype(float)
    lin_w = np.asarray(register(fixed, moving, method="fourier", transform="rigid",
                                pixel_budget=300).warped[1][400:700, 400:700]).astype(float)
    assert np.abs(w - ref).mean() < 0.6 * np.abs(lin_w - ref).mean()


def test_deformable_stage_takes_a_level0_mask(bent_pair):
    fixed, moving, truth = bent_pair
    mask = np.zeros((SIZE, SIZE), bool)
    mask[100:-100, 100:-100] = True
    r = register(fixed, moving, method="fourier", transform="rigid", pixel_budget=300,
                 pyramid_refine=None, pyramid_deformable=True, deformable_budget=512,
                 fixed_mask=mask, warp=False)
    assert r.info["pyramid"]["deformable"]["level"] == 2  # finer than the 256^2 estimate
    linear = Transform.from_dict(r.info["pyramid"]["coarse_transform"])
    assert _tre(r.transform, truth)[0] < _tre(linear, truth)[0] / 2


def test_bad_deformable_options(bent_pair):
    fixed, moving, _ = bent_pair
    with pytest.raises(ValueError, match="pyramid_deformable must be"):
        register(fixed, moving, pyramid_deformable="demons")
    with pytest.raises(ValueError, match="refines a linear transform"):
        register(fixed, moving, method="intensity", transform="bspline", pyramid_deformable=True)
    with pytest.raises(ValueError, match="deformable_budget"):
        register(fixed, moving, pyramid_deformable=True, deformable_budget=4)
    with pytest.raises(ValueError, match="applies to pyramids"):
        register(np.asarray(fixed[3]), np.asarray(moving[3]), pyramid_deformable=True)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_lazy_warp_through_a_field_equals_the_eager_warp(labels, direction):
    from skimage import data

    image = data.camera()[::2, ::2].astype(np.uint16 if labels else np.float32)
    if labels:
        image = (image // 32).astype(np.uint16)
    field = smooth_deformation(image.shape, 6.0, seed=4, spacing=0.5)
    if direction == "backward":  # what a registration produces: no inversion when warping
        field = field.inverse()
    bend = Transform(steps=[field])
    transform = bend.then(Transform.from_rotation(3.0, center=(64, 64))).then(
        Transform.from_translation((2.5, -4.0)))
    kw = dict(output_spacing=0.5, input_spacing=0.5, output_origin=(1.0, -2.0), labels=labels)
    eager = resample(image, transform, image.shape, **kw)
    lazy = lazy_resample(da.from_array(image, chunks=48), transform, image.shape, chunks=40, **kw)
    assert isinstance(lazy, da.Array) and lazy.dtype == eager.dtype
    via_api = apply_transform(da.from_array(image, chunks=64), transform, output_shape=image.shape,
                              **kw)
    assert isinstance(via_api, da.Array)
    for out in (np.asarray(lazy), np.asarray(via_api)):
        if direction == "backward":
            np.testing.assert_allclose(out, eager, atol=1e-4)
        else:
            # a forward field is inverted by fixed-point iteration per block, which stops
            # when the block's largest update is below 1e-4 of the field's node spacing:
            # sample positions agree to that, so values to a tiny fraction of a grey level
            # (labels: at most a rare pixel on a boundary)
            if labels:
                assert np.mean(out != eager) < 1e-3
            else:
                np.testing.assert_allclose(out, eager, atol=0.05)
        assert np.count_nonzero(out) > 0.5 * out.size  # not an empty warp
