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
