"""The stack dock widget in a real viewer (under Xvfb): a drifting series in, the
corrected stack out with its transforms in metadata and the drift in the table;
cancel stops the worker."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

pytestmark = pytest.mark.qt

DRIFTS = np.array([[0, 0], [1.4, -0.3], [2.6, 0.8], [3.3, 2.1], [2.1, 3.7]])


def series(n_repeat=1, size=96):
    from skimage import data

    image = data.camera().astype(np.float32)
    region = image[140:140 + size + 16, 160:160 + size + 16]
    drifts = np.concatenate([DRIFTS] * n_repeat)
    return np.stack([ndimage.shift(region, -d, order=3, mode="nearest")[8:8 + size, 8:8 + size]
                     for d in drifts]), drifts


@pytest.fixture
def widget(make_napari_viewer):
    from napari_registration.widgets.stack import StackRegistrationWidget

    viewer = make_napari_viewer()
    w = StackRegistrationWidget(viewer)
    viewer.window.add_dock_widget(w)
    return viewer, w


def test_widget_registers_a_layer_and_pushes_the_result_back(widget, qtbot):
    viewer, w = widget
    frames, drifts = series()
    source = viewer.add_image(frames, name="drifting", scale=(1.0, 0.5, 0.5))
    w._layer.reset_choices()
    w._layer.value = source
    w._reference.value = "previous"
    events = []
    worker = w.make_worker()
    worker.yielded.connect(events.append)
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    assert w.result is not None and len(events) >= len(frames)
    out = viewer.layers["drifting registered"]
    assert out.data.shape == frames.shape
    assert tuple(out.scale) == tuple(source.scale)
    meta = out.metadata["registration"]
    assert meta["type"] == "napari-registration stack result" and len(meta["transforms"]) == 5
    # world units are half a pixel: the transform shifts are drift * 0.5
    shifts = np.array([[t["matrix"][0][2], t["matrix"][1][2]] for t in meta["transforms"]])
    assert np.allclose(shifts, drifts * 0.5, atol=0.05)
    table = w._table.to_dict("list")
    columns = w.drift_table(w.result)
    assert list(columns) == ["frame", "drift row", "drift col", "ncc after"]
    assert np.allclose(columns["drift row"], -drifts[:, 0] * 0.5, atol=0.05)
    assert list(table) == list(columns) and len(table["frame"]) == 5
    assert w._progress.value == 100 and "5 frames" in w._status.value
    assert np.all(source.data == frames)          # the input layer is untouched


def test_widget_cancel_stops_the_worker(widget, qtbot):
    viewer, w = widget
    frames, _ = series(n_repeat=20)                # 100 frames
    viewer.add_image(frames, name="long")
    w._layer.reset_choices()
    w._method.value = "fourier"
    worker = w.make_worker()
    seen = []

    def on_yield(event):
        seen.append(event)
        if len(seen) == 3:
            w.cancel()

    worker.yielded.connect(on_yield)
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    assert w.result is None and len(seen) < 50
    assert "long registered" not in viewer.layers
    assert w._run_button.enabled and not w._cancel_button.enabled


def test_widget_opens_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-registration", "Register stack")
    assert type(widget).__name__ == "StackRegistrationWidget"
    assert "fourier" in widget._method.choices


def test_widget_registers_a_pyramid_level_of_a_multiscale_layer(widget, qtbot):
    from skimage.transform import downscale_local_mean

    viewer, w = widget
    frames, drifts = series(size=192)
    level1 = np.stack([downscale_local_mean(f, (2, 2)) for f in frames]).astype(np.float32)
    viewer.add_image([frames, level1], multiscale=True, name="pyramid")
    w._layer.reset_choices()
    w._layer.value = viewer.layers["pyramid"]
    assert not w._level.native.isHidden() and w._level.max == 1
    w._level.value = 1
    worker = w.make_worker()
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    assert w.result.info["coarse_shape"] == [96, 96]
    shifts = np.array([t.matrix[:2, 2] for t in w.result.transforms])
    assert np.allclose(shifts, drifts, atol=0.15)
    assert viewer.layers["pyramid registered"].data.shape == frames.shape


def test_widget_aligns_an_rgb_time_series(widget, qtbot):
    from skimage import data

    viewer, w = widget
    image = data.astronaut()[100:300, 150:350]
    frames = np.stack([np.stack([ndimage.shift(image[..., c].astype(np.float32), -d, order=3,
                                               mode="nearest")[20:180, 20:180]
                                 for c in range(3)], axis=-1) for d in DRIFTS[:3]])
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    layer = viewer.add_image(frames, rgb=True, name="colour")
    w._layer.reset_choices()
    w._layer.value = layer
    assert w._channels.value and w._channel_axis.value == 3 and w._driver.value == 1
    worker = w.make_worker()
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    out = viewer.layers["colour registered"]
    assert out.rgb and out.data.shape == frames.shape and out.data.dtype == np.uint8
    shifts = np.array([t.matrix[:2, 2] for t in w.result.transforms])
    assert np.allclose(shifts, DRIFTS[:3], atol=0.1)


def test_widget_reports_bad_input_and_recovers(widget, qtbot):
    viewer, w = widget
    frames, _ = series()
    frames = frames.copy()
    frames[2] = 3.0                                  # a blank frame: nothing to align
    viewer.add_image(frames, name="with blank")
    w._layer.reset_choices()
    w._layer.value = viewer.layers["with blank"]
    worker = w.make_worker()
    errors = []
    worker.errored.connect(errors.append)
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    assert errors and "frame 2" in w._status.value and "constant" in w._status.value
    assert w.result is None and "with blank registered" not in viewer.layers
    assert w._run_button.enabled and not w._cancel_button.enabled


# ----------------------------------------------------------- opened as the Plugins menu does
def _open(viewer):
    _, w = viewer.window.add_plugin_dock_widget("napari-registration", "Register stack")
    return w


def _click(qtbot, button):
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)


def _run(qtbot, w):
    """Press 'Register stack' and wait for the run to end."""
    _click(qtbot, w._run_button)
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)   # _on_finished ran


def test_opens_with_the_only_stack_chosen_never_our_output(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    frames, _ = series()
    viewer.add_image(frames[0], name="one frame")              # 2D: not a stack
    viewer.add_image(frames, name="movie")
    viewer.add_image(frames, name="movie registered",          # an output of ours, on top
                     metadata={"napari_registration_output": "stack registered"})
    w = _open(viewer)
    assert w._layer.value.name == "movie"
    # a second run's output appearing does not move the picker
    _run(qtbot, w)
    assert w._layer.value.name == "movie"
    assert viewer.layers["movie registered"].metadata["napari_registration_output"]


def test_opens_with_nothing_chosen_when_the_choice_is_ambiguous(make_napari_viewer):
    frames, _ = series()
    for selected in (None, "a"):
        viewer = make_napari_viewer()
        viewer.add_image(frames, name="a")
        viewer.add_image(frames, name="b")
        viewer.layers.selection.clear()
        if selected:
            viewer.layers.selection.active = viewer.layers[selected]
        value = _open(viewer)._layer.value
        assert (value.name if value is not None else None) == selected


def test_removing_the_stack_during_a_run_cancels_cleanly(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    frames, _ = series(n_repeat=30)                            # 150 frames
    viewer.add_image(frames, name="long")
    w = _open(viewer)
    assert w._layer.value.name == "long"
    _click(qtbot, w._run_button)
    qtbot.waitUntil(lambda: w._progress.value > 0, timeout=30000)
    viewer.layers.remove("long")                               # the user deletes the input
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    qtbot.wait(200)
    assert "removed" in w._status.value and "no output layer" in w._status.value
    assert [ly.name for ly in viewer.layers] == []             # nothing half-made appeared
    assert w.result is None and w._run_button.enabled and not w._cancel_button.enabled


def test_transforms_are_reused_on_another_channel_labels_and_points(make_napari_viewer, qtbot,
                                                                   tmp_path):
    viewer = make_napari_viewer()
    frames, drifts = series()
    # another channel (other content) with the same drift
    from skimage import data

    image = data.camera().astype(np.float32)[300:412, 60:172]
    red = np.stack([ndimage.shift(image, -d, order=3, mode="nearest")[8:104, 8:104]
                    for d in drifts])
    viewer.add_image(frames, name="green", scale=(1.0, 0.5, 0.5))
    w = _open(viewer)
    _run(qtbot, w)
    assert w.series is not None and len(w.series) == 5 and w._apply_button.enabled
    # the drift plot shows the shift and the NCC
    assert [title for title, _ in w.plot.panels] == ["shift", "NCC after"]
    np.testing.assert_allclose(w.plot.panels[0][1][0][1], -drifts[:, 0] * 0.5, atol=0.05)

    red_layer = viewer.add_image(red, name="red", scale=(1.0, 0.5, 0.5))
    w._apply_target.reset_choices()
    w._apply_target.value = red_layer
    _click(qtbot, w._apply_button)                             # runs in a worker
    qtbot.waitUntil(lambda: "red aligned" in viewer.layers, timeout=60000)
    assert w._apply_button.enabled
    aligned = viewer.layers["red aligned"].data
    inner = (slice(None), slice(10, -10), slice(10, -10))
    err_before = np.abs(red - red[0])[inner].mean()
    err_after = np.abs(aligned - aligned[0])[inner].mean()
    assert err_after < 0.25 * err_before and np.array_equal(red_layer.data, red)

    labels = np.zeros(frames.shape, np.uint8)
    for i, d in enumerate(drifts):                             # a square that drifts
        r, c = int(round(40 - d[0])), int(round(40 - d[1]))
        labels[i, r:r + 10, c:c + 10] = 3
    w._apply_target.reset_choices()
    w.apply_transforms(viewer.add_labels(labels, name="cells", scale=(1.0, 0.5, 0.5)))
    out = viewer.layers["cells aligned"].data
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 3}
    centres = np.array([np.argwhere(f == 3).mean(0) for f in out])
    assert np.ptp(centres, axis=0).max() < 1.5                 # the square stands still

    # tracked points: (frame, row, col) in data coordinates of a layer with the same scale
    track = np.array([[i, 50 - d[0], 60 - d[1]] for i, d in enumerate(drifts)])
    pts = viewer.add_points(track, name="track", scale=(1.0, 0.5, 0.5))
    w.apply_transforms(pts)
    moved = viewer.layers["track aligned"].data
    np.testing.assert_allclose(moved[:, 1:], [[50, 60]] * 5, atol=0.15)

    # save through the dock, load in a fresh dock, apply again: the same result
    w._save_file.value = tmp_path / "drift.json"
    _click(qtbot, w._save_button)
    assert (tmp_path / "drift.json").is_file() and "saved 5" in w._status.value
    viewer.window.remove_dock_widget("all")                    # a fresh dock
    w2 = _open(viewer)
    assert w2 is not w and not w2._apply_button.enabled
    w2._load_file.value = tmp_path / "drift.json"
    _click(qtbot, w2._load_button)
    assert "loaded 5" in w2._status.value and w2._apply_button.enabled
    viewer.layers.remove("red aligned")
    w2.apply_transforms(red_layer)
    np.testing.assert_allclose(viewer.layers["red aligned"].data, aligned, atol=1e-4)


def test_loading_a_bad_transforms_file_says_why(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    w = _open(viewer)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "napari-registration transform", "steps": []}')
    w._load_file.value = bad
    _click(qtbot, w._load_button)
    assert "not a transform series" in w._status.value and w.series is None
    _click(qtbot, w._apply_button)                             # disabled: nothing happens
    assert len(viewer.layers) == 0


@pytest.mark.parametrize("name", ["Register stack", "Landmark registration",
                                  "Apply / save / load transform"])
def test_docks_scroll_and_fit_a_small_screen(make_napari_viewer, qtbot, name):
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-registration", name)
    qtbot.wait(100)
    assert isinstance(dock.widget(), QScrollArea)      # napari docks the scroll area
    viewer.window._qt_window.resize(1280, 800)
    qtbot.wait(50)
    size = viewer.window._qt_window.size()
    assert size.height() <= 800 and size.width() <= 1280
    assert dock.widget().minimumSizeHint().height() < 400   # the form scrolls, not the window


def test_the_drift_plot_draws_its_lines(qtbot):
    from qtpy.QtGui import QColor

    from napari_registration.widgets.stack import DriftPlot

    plot = DriftPlot()
    qtbot.addWidget(plot)
    plot.resize(300, 180)
    plot.set_data({"frame": [0, 1, 2, 3], "drift row": [0.0, 1.0, 2.0, 1.5],
                   "drift col": [0.0, -1.0, 0.5, 0.2], "rotation": [0.0, 0.5, 1.0, 0.2],
                   "ncc after": [0.99, 0.98, None, 0.97]})
    assert [t for t, _ in plot.panels] == ["shift", "rotation (deg)", "NCC after"]
    image = plot.grab().toImage()
    pixels = np.array([[image.pixelColor(x, y).getRgb()[:3] for x in range(image.width())]
                       for y in range(image.height())], float)

    def drawn(colour):  # pixels of (nearly) the line's colour
        target = np.array(QColor(colour).getRgb()[:3], float)
        return int((np.abs(pixels - target).sum(-1) < 40).sum())

    assert drawn(DriftPlot.COLOURS[0]) > 50                     # the row (and other) lines
    assert drawn(DriftPlot.COLOURS[1]) > 50                     # the col line
