"""The transform model: direction, composition, inversion, serialisation."""

import json

import numpy as np
import pytest

from napari_registration import Transform, load_transform, save_transform
from napari_registration.core.transform import FieldStep, MatrixStep


def test_translation_direction_is_moving_to_fixed():
    t = Transform.from_translation([0.0, 3.0])
    np.testing.assert_allclose(t.apply([[10.0, 10.0]]), [[10.0, 13.0]])
    np.testing.assert_allclose(t.apply_inverse([[10.0, 13.0]]), [[10.0, 10.0]])
    assert t.matrix[1, -1] == 3.0


def test_rotation_is_counter_clockwise_on_screen():
    # a point to the right of the centre (+col) goes up (-row) under +90 degrees
    t = Transform.from_rotation(90.0, center=(0.0, 0.0))
    np.testing.assert_allclose(t.apply([[0.0, 1.0]]), [[-1.0, 0.0]], atol=1e-12)


def test_then_and_matmul_order():
    a = Transform.from_translation([1.0, 0.0])
    b = Transform.from_scale([2.0, 2.0])
    p = np.array([[1.0, 1.0]])
    np.testing.assert_allclose(a.then(b).apply(p), b.apply(a.apply(p)))
    np.testing.assert_allclose((b @ a).apply(p), b.apply(a.apply(p)))
    assert not np.allclose(a.then(b).apply(p), b.then(a).apply(p))


def test_inverse_round_trip_projective():
    m = np.array([[1.05, 0.08, -20.0], [-0.06, 0.97, 15.0], [1.2e-4, -0.8e-4, 1.0]])
    t = Transform(m)
    pts = np.random.default_rng(0).uniform(0, 500, (20, 2))
    np.testing.assert_allclose(t.inverse().apply(t.apply(pts)), pts, atol=1e-9)
    assert t.is_projective and t.kind == "projective"


def test_linear_steps_merge_into_one_matrix():
    t = Transform.from_translation([1, 2]).then(Transform.from_rotation(10)).then(Transform.from_scale([2, 2]))
    assert t.is_linear and t.matrix.shape == (3, 3)


@pytest.mark.parametrize("bad", [np.eye(3)[:2], np.zeros((3, 3)), np.full((3, 3), np.nan)])
def test_bad_matrix_rejected(bad):
    with pytest.raises(ValueError):
        Transform(bad)


def test_points_shape_checked():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        Transform.identity(2).apply(np.zeros((4, 3)))


def _field_transform():
    rng = np.random.default_rng(1)
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.normal(0, 30, (40, 50, 2)), (8, 8, 0)).astype(np.float32)
    return Transform(steps=[MatrixStep(Transform.from_translation([2.0, -1.0]).matrix),
                            FieldStep(field, spacing=(2.0, 2.0), origin=(0.0, 0.0))])


def test_field_step_forward_inverts_backward():
    t = _field_transform()
    pts = np.random.default_rng(2).uniform(10, 70, (30, 2))
    back = t.apply_inverse(t.apply(pts))
    np.testing.assert_allclose(back, pts, atol=1e-3)
    assert t.matrix is None and not t.is_linear


def test_json_round_trip_exact(tmp_path):
    for t in (Transform.from_rotation(12.5, center=(3, 4), scale=1.1, shift=(0.25, -7)), _field_transform()):
        path = save_transform(t, tmp_path / "t.json")
        again = load_transform(path)
        assert again == t
        pts = np.random.default_rng(3).uniform(10, 60, (10, 2))
        np.testing.assert_array_equal(again.apply(pts), t.apply(pts))


def test_load_reports_corrupt_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_transform(bad)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a napari-registration transform"):
        load_transform(foreign)
    with pytest.raises(FileNotFoundError):
        load_transform(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown transform file type"):
        save_transform(Transform.identity(2), tmp_path / "t.xyz")


def test_from_linear_acts_about_the_center():
    t = Transform.from_linear([[2.0, 0.0], [0.0, 3.0]], center=(1.0, 1.0), shift=(0.5, 0.0))
    np.testing.assert_allclose(t.apply([[1.0, 1.0], [2.0, 3.0]]), [[1.5, 1.0], [3.5, 7.0]])
