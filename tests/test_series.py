"""Per-frame stack transforms reused: save/load as one file, apply to other channels,
labels movies, tracked points and shapes (core only, no Qt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_registration import (
    Transform,
    TransformSeries,
    apply_stack_transforms,
    load_transforms,
    register_stack,
    save_transforms,
)
from napari_registration.core.series import map_stack_points, map_stack_shapes

DRIFT = np.array([[0.0, 0.0], [2.0, -1.0], [4.0, 1.0], [3.0, 3.0]])


def _drifting(image):
    return np.stack([ndimage.shift(image, -d, order=1, mode="constant") for d in DRIFT])


@pytest.fixture
def movie():
    from skimage import data

    green = data.camera()[100:228, 150:278].astype(np.float32)
    red = np.ascontiguousarray(green[::-1].T)      # another channel: different content
    return _drifting(green), _drifting(red)


def test_transforms_of_one_channel_align_the_other(movie):
    green, red = movie
    stack = register_stack(green, method="fourier", transform="translation")
    red_before = red.copy()
    aligned = apply_stack_transforms(red, stack)   # a StackResult carries axis + spacing
    assert aligned.shape == red.shape and aligned.dtype == red.dtype
    assert np.array_equal(red, red_before)         # input untouched
    inner = (slice(None), slice(8, -8), slice(8, -8))
    truth = np.stack([red[0]] * len(DRIFT))
    err_before = np.abs(red - truth)[inner].mean()
    err_after = np.abs(aligned - truth)[inner].mean()
    assert err_after < 0.1 * err_before
    # the same transforms applied to the registered channel give register_stack's output
    again = apply_stack_transforms(green, stack.transforms)
    np.testing.assert_allclose(again, np.asarray(stack.warped), atol=1e-3)


def test_labels_follow_by_nearest_neighbour_and_keep_their_values():
    labels = np.zeros((64, 64), np.uint16)
    labels[20:30, 20:34] = 7
    labels[40:50, 10:20] = 300
    movie = np.stack([np.roll(labels, tuple(int(v) for v in d), axis=(0, 1)) for d in DRIFT])
    transforms = [Transform.from_translation(-d) for d in DRIFT]
    out = apply_stack_transforms(movie, transforms, labels=True)
    assert out.dtype == np.uint16 and set(np.unique(out)) == {0, 7, 300}
    for frame in out:
        np.testing.assert_array_equal(frame, labels)


def test_frame_axis_channel_axis_and_spacing(movie):
    green, red = movie
    # (C, T, Y, X) with the frames on axis 1, pixels of 0.5 world units
    both = np.stack([green, red])
    transforms = [Transform.from_translation(-d * 0.5) for d in DRIFT]
    out = apply_stack_transforms(both, transforms, frame_axis=1, channel_axis=0,
                                 spacing=(0.5, 0.5))
    expected = apply_stack_transforms(red, [Transform.from_translation(-d) for d in DRIFT])
    np.testing.assert_allclose(out[1], expected, atol=1e-4)
    assert out.shape == both.shape


def test_points_and_shapes_move_with_their_frame():
    transforms = [Transform.from_translation(-d * 2.0) for d in DRIFT]
    # a point on each frame at the spot the content drifted to, in index coordinates
    tracked = np.array([[i, 30.0 + d[0], 40.0 + d[1]] for i, d in enumerate(DRIFT)])
    before = tracked.copy()
    out = map_stack_points(tracked, transforms, spacing=(2.0, 2.0))
    np.testing.assert_allclose(out[:, 0], tracked[:, 0])          # frame column kept
    np.testing.assert_allclose(out[:, 1:], [[30.0, 40.0]] * len(DRIFT), atol=1e-9)
    np.testing.assert_array_equal(tracked, before)
    # frame as the last column
    last = np.roll(tracked, -1, axis=1)
    out_last = map_stack_points(last, transforms, frame_axis=2, spacing=(2.0, 2.0))
    np.testing.assert_allclose(out_last[:, :2], [[30.0, 40.0]] * len(DRIFT), atol=1e-9)
    shapes = map_stack_shapes([tracked[:2], tracked[2:]], transforms, spacing=(2.0, 2.0))
    np.testing.assert_allclose(np.concatenate(shapes)[:, 1:], [[30.0, 40.0]] * 4, atol=1e-9)


def test_points_on_frames_outside_the_series_are_refused():
    transforms = [Transform.identity(2)] * 3
    with pytest.raises(ValueError, match="frames outside 0..2"):
        map_stack_points([[5, 1.0, 1.0]], transforms)
    with pytest.raises(ValueError, match=r"points must be \(N, 3\)"):
        map_stack_points([[1.0, 1.0]], transforms)


def test_save_and_load_one_file_round_trip(tmp_path, movie):
    green, _ = movie
    stack = register_stack(green, method="fourier", transform="rigid", spacing=(0.5, 0.5))
    path = save_transforms(tmp_path / "drift.json", stack)
    assert [p.name for p in tmp_path.iterdir()] == ["drift.json"]   # no temp file left
    series = load_transforms(path)
    assert isinstance(series, TransformSeries) and len(series) == len(DRIFT)
    assert series.frame_axis == 0 and series.spacing == (0.5, 0.5)
    for a, b in zip(series.transforms, stack.transforms):
        np.testing.assert_allclose(a.matrix, b.matrix)
    data = json.loads(path.read_text())
    assert data["type"] == "napari-registration transform series" and data["frame_axis"] == 0
    # explicit list + axis, and overwriting the same file
    save_transforms(path, list(stack.transforms), frame_axis=2, spacing=(1.0, 2.0))
    again = load_transforms(path)
    assert again.frame_axis == 2 and again.spacing == (1.0, 2.0)
    # a stack layer's metadata["registration"] saved as JSON loads too
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(stack.to_dict()))
    assert len(load_transforms(meta)) == len(DRIFT)


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "not a transform series"),
    ('{"type": "something else"}', "not a transform series"),
    ('{"type": "napari-registration transform series", "transforms": []}', "non-empty list"),
    ('{"type": "napari-registration transform series", "transforms": [{"steps": '
     '[{"kind": "matrix", "matrix": [[1, 0, NaN], [0, 1, 0], [0, 0, 1]]}]}]}', "frame 0"),
    ('{"type": "napari-registration transform series", "frame_axis": -1, "transforms": '
     '[{"steps": [{"kind": "matrix", "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}]}]}',
     "frame_axis"),
])
def test_bad_files_raise_value_errors_that_say_what_to_do(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_transforms(path)


def test_bad_calls_raise_value_errors():
    transforms = [Transform.identity(2)] * 3
    with pytest.raises(ValueError, match="3 transforms"):
        apply_stack_transforms(np.zeros((4, 8, 8)), transforms)
    with pytest.raises(ValueError, match="2D but data"):
        apply_stack_transforms(np.zeros((3, 8, 8, 8)), transforms)
    with pytest.raises(ValueError, match=".json"):
        save_transforms("drift.tfm", transforms)
    with pytest.raises(ValueError, match="mix dimensions"):
        save_transforms("x.json", [Transform.identity(2), Transform.identity(3)])
    with pytest.raises(ValueError, match="Transform objects"):
        apply_stack_transforms(np.zeros((1, 8, 8)), ["shift"])
