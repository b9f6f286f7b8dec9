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
