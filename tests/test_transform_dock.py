"""The Apply / save / load transform dock, opened as the Plugins menu opens it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.qt


def test_a_stack_transforms_file_is_sent_to_the_stack_dock(open_widget, notifications, qtbot,
                                                           tmp_path):
    from qtpy.QtCore import Qt

    from napari_registration import Transform, save_transforms

    path = save_transforms(tmp_path / "drift.json",
                           [Transform.from_translation((1.0, 2.0))] * 3)
    w = open_widget("Apply / save / load transform")
    w.load_file.value = path
    qtbot.mouseClick(w.load_button.native, Qt.MouseButton.LeftButton)
    assert w.transform is None
    assert "per-frame transforms" in notifications["error"][-1]
    assert "Register stack" in notifications["error"][-1]
    # a plain transform file still loads
    from napari_registration import save_transform

    single = save_transform(Transform.from_translation((1.0, 2.0)), tmp_path / "t.json")
    w.load_file.value = single
    qtbot.mouseClick(w.load_button.native, Qt.MouseButton.LeftButton)
    assert w.transform is not None and np.allclose(w.transform.matrix[:2, 2], [1.0, 2.0])


def test_apply_honours_a_layer_napari_rotates(viewer, open_widget, qtbot):
    """A target layer with ``rotate`` set (a manual alignment, a file's orientation) is
    transformed where napari shows it: points land at transform(shown position), and a
    resampled copy on an unrotated reference shows the same picture as the rotated layer."""
    from qtpy.QtCore import Qt

    from napari_registration import Transform
    from napari_registration.widgets.transform import RESAMPLE

    rng = np.random.default_rng(0)
    image = rng.random((40, 40)).astype(np.float32)
    fixed = viewer.add_image(np.zeros((40, 40), np.float32), name="fixed")
    # rotated 90 degrees about the origin, then moved back into view
    rotated = viewer.add_image(image, name="rotated", rotate=90, translate=(39.0, 0.0))
    pts = viewer.add_points(np.array([[5.0, 7.0], [20.0, 30.0]]), name="spots", rotate=90,
                            translate=(39.0, 0.0))
    w = open_widget("Apply / save / load transform")
    shift = Transform.from_translation((2.0, -3.0))
    w.transform = shift
    w.target.value = viewer.layers["spots"]
    qtbot.mouseClick(w.apply_button.native, Qt.MouseButton.LeftButton)
    out = viewer.layers["spots transformed"]
    shown_before = np.array([pts.data_to_world(p) for p in pts.data])
    shown_after = np.array([out.data_to_world(p) for p in out.data])
    np.testing.assert_allclose(shown_after, shown_before + [2.0, -3.0], atol=1e-9)

    w.transform = Transform(np.eye(3))
    w.target.value = viewer.layers["rotated"]
    w.reference.value = viewer.layers["fixed"]
    w.mode.value = RESAMPLE
    qtbot.mouseClick(w.apply_button.native, Qt.MouseButton.LeftButton)
    copy = viewer.layers["rotated transformed"]
    assert np.allclose(copy.rotate, np.eye(2))
    # the copy shows at (r, c) what the rotated layer shows there (looked up through napari)
    for r, c in [(3, 5), (17, 30), (36, 12)]:
        data_idx = np.round(rotated.world_to_data((r, c))).astype(int)
        assert abs(float(copy.data[r, c]) - float(image[tuple(data_idx)])) < 1e-4
    assert fixed.data.max() == 0  # inputs untouched
