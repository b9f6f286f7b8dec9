"""Landmark widget in a real viewer (Xvfb): pairs, alternation, live fit, edits."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.qt

from napari_registration import Transform, available_methods  # noqa: E402
from napari_registration.data import _warp_by_truth  # noqa: E402


@pytest.fixture
def pair():
    from skimage import data, transform as sktf

    fixed = sktf.rescale(data.camera().astype(np.float32) / 255, 0.25, anti_aliasing=True)
    fixed = fixed.astype(np.float32)  # 128 x 128
    centre = (np.array(fixed.shape) - 1) / 2
    truth_px = Transform.from_rotation(15.0, center=centre, scale=1.1, shift=(3.0, -4.0))
    moving = _warp_by_truth(fixed, truth_px).astype(np.float32)
    return fixed, moving, truth_px


def _click(qtbot, button):
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)


def _settle(w, qtbot):
    """Wait until the live fit (debounced, in a worker) has been applied."""
    qtbot.waitUntil(lambda: not w.busy, timeout=20000)
    qtbot.wait(10)


@pytest.fixture
def widget(make_napari_viewer, pair, qtbot):
    fixed, moving, _ = pair
    viewer = make_napari_viewer(show=True)
    # anisotropic pixels and offsets: clicks are world coordinates
    viewer.add_image(fixed, name="fixed", scale=(2.0, 2.0), translate=(10.0, -5.0))
    viewer.add_image(moving, name="moving", scale=(2.0, 2.0), translate=(-3.0, 7.0))
    # as the Plugins menu opens it: napari hands the dock proxies of viewer and layers
    _, w = viewer.window.add_plugin_dock_widget("napari-registration", "Landmark registration")
    assert w.fixed_layer.value.name == "fixed" and w.moving_layer.value.name == "moving"
    w.transform_choice.value = "similarity"
    _click(qtbot, w.start_button)
    w.real_viewer = viewer  # the test's own (unproxied) viewer, as napari's mouse code sees it
    return w


def _layer(w, name):
    """The real layer napari's click handler calls ``add`` on (no proxy)."""
    return w.real_viewer.layers[name]


def _active(w):
    return w.real_viewer.layers.selection.active.name


def _world_truth(truth_px):
    """The pixel-space truth in the widget's worlds (scale 2, the two translates)."""
    f = Transform(np.array([[2.0, 0, 10.0], [0, 2.0, -5.0], [0, 0, 1]]))
    m = Transform(np.array([[2.0, 0, -3.0], [0, 2.0, 7.0], [0, 0, 1]]))
    return m.inverse().then(truth_px).then(f)


def _click_pairs(w, moving_px, truth_world):
    m_world = moving_px * 2.0 + np.array([-3.0, 7.0])
    f_world = truth_world.apply(m_world)
    for fp, mp in zip(f_world, m_world):
        assert _active(w) == "fixed landmarks"
        _layer(w, "fixed landmarks").add(fp)  # what napari does on a click in "add" mode
        # BigWarp-style: the next click goes to the other image
        assert _active(w) == "moving landmarks"
        assert _layer(w, "moving landmarks").mode == "add"
        _layer(w, "moving landmarks").add(mp)
    return f_world, m_world


def test_pairs_alternate_and_the_fit_is_live(widget, pair, qtbot):
    w = widget
    _, _, truth_px = pair
    truth = _world_truth(truth_px)
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [30.0, 80.0]])
    assert "fixed landmarks" in w.viewer.layers and "moving landmarks" in w.viewer.layers
    # the preview layer is made (hidden) on Start, not in the middle of clicking
    assert not w.real_viewer.layers["moving landmarks preview"].visible
    # one pair: too few for a similarity; the status says so, no fit
    _click_pairs(w, moving_px[:1], truth)
    _settle(w, qtbot)
    assert w.transform is None and "needs 2" in w.status.value
    _click_pairs(w, moving_px[1:], truth)
    _settle(w, qtbot)
    np.testing.assert_allclose(w.transform.matrix, truth.matrix, atol=1e-8)
    assert w.fit_info["n_points"] == 4
    assert len(w.table.value["data"]) == 4 and float(w.table.value["data"][0][2]) < 1e-6
    # preview: the moving data shown through the fit, no copy, lined up in world
    preview = w.real_viewer.layers["moving landmarks preview"]
    assert preview.visible
    assert preview.data is w.real_viewer.layers["moving"].data
    data_to_world = preview.affine.affine_matrix @ np.array(
        [[2.0, 0, -3.0], [0, 2.0, 7.0], [0, 0, 1]])
    np.testing.assert_allclose(data_to_world, truth.matrix @ np.array(
        [[2.0, 0, -3.0], [0, 2.0, 7.0], [0, 0, 1]]), atol=1e-8)
    assert preview.metadata["registration"]["method"] == "landmarks"
    # point layers stay on top and keep the click
    assert list(w.real_viewer.layers)[-1].name in ("fixed landmarks", "moving landmarks")
    assert _active(w) == "fixed landmarks"
    # our preview is never offered as an input image
    assert "moving landmarks preview" not in [c[0] for c in w._image_choices()]


@pytest.mark.parametrize("side", ["fixed", "moving"])
def test_deleting_a_point_on_either_side_deletes_its_partner(widget, pair, qtbot, side):
    w = widget
    truth = _world_truth(pair[2])
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [30.0, 80.0], [100, 100]])
    f_world, m_world = _click_pairs(w, moving_px, truth)
    _settle(w, qtbot)
    exact = w.transform.matrix.copy()
    fixed_pts, moving_pts = _layer(w, "fixed landmarks"), _layer(w, "moving landmarks")
    # drag one point by 6 world units: the fit moves, its pair gets the largest residual
    layer = fixed_pts if side == "fixed" else moving_pts
    data = layer.data.copy()
    data[2] += [6.0, 0.0]
    layer.data = data
    _settle(w, qtbot)
    assert not np.allclose(w.transform.matrix, exact)
    residuals = [float(r[2]) for r in w.table.value["data"]]
    assert int(np.argmax(residuals)) == 2 and residuals[2] > 1.0
    # select it and press Delete (napari's remove_selected): its partner goes too, the
    # pairs stay aligned and the exact fit returns
    layer.selected_data = {2}
    layer.remove_selected()
    assert len(fixed_pts.data) == len(moving_pts.data) == 4
    np.testing.assert_allclose(fixed_pts.data, np.delete(f_world, 2, axis=0))
    np.testing.assert_allclose(moving_pts.data, np.delete(m_world, 2, axis=0))
    _settle(w, qtbot)
    np.testing.assert_allclose(w.transform.matrix, exact, atol=1e-8)
    assert len(w.table.value["data"]) == 4


def test_a_point_waiting_for_its_partner_is_left_out_and_said_so(widget, pair, qtbot):
    w = widget
    truth = _world_truth(pair[2])
    _click_pairs(w, np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0]]), truth)
    _settle(w, qtbot)
    exact = w.transform.matrix.copy()
    fixed_pts, moving_pts = _layer(w, "fixed landmarks"), _layer(w, "moving landmarks")
    fixed_pts.add([50.0, 50.0])                    # no partner yet
    assert _active(w) == "moving landmarks"
    _settle(w, qtbot)
    assert "point 4 in the fixed image without a partner" in w.status.value
    np.testing.assert_allclose(w.transform.matrix, exact, atol=1e-8)  # not in the fit
    assert len(w.table.value["data"]) == 3
    # deleting a paired fixed point while one waits still deletes the right partner
    fixed_pts.remove([0])
    assert len(fixed_pts.data) == 3 and len(moving_pts.data) == 2
    _settle(w, qtbot)
    assert "point 3 in the fixed image without a partner" in w.status.value
    # deleting the waiting point leaves the moving side alone
    fixed_pts.remove([2])
    assert len(fixed_pts.data) == len(moving_pts.data) == 2


def test_fast_clicks_fit_once_off_the_gui_thread_and_show_the_latest(widget, pair, qtbot,
                                                                     monkeypatch):
    import threading

    from napari_registration.widgets import landmarks

    w = widget
    truth = _world_truth(pair[2])
    calls = []
    real_job = landmarks._fit_job

    def spy(*args):
        calls.append((threading.current_thread() is threading.main_thread(), len(args[1])))
        return real_job(*args)

    monkeypatch.setattr(landmarks, "_fit_job", spy)
    w.transform_choice.value = "tps"
    _settle(w, qtbot)
    calls.clear()
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [100.0, 90.0],
                          [40.0, 60.0], [80.0, 20.0]])
    _click_pairs(w, moving_px, truth)              # 12 clicks faster than the debounce
    _settle(w, qtbot)
    assert calls and len(calls) <= 2               # not one fit per click
    assert not any(on_main for on_main, _ in calls)
    assert calls[-1][1] == 6 and w.fit_info["n_points"] == 6
    assert w.real_viewer.layers["moving landmarks preview"].data.shape == (128, 128)


def test_tps_preview_is_resampled_on_the_fixed_grid(widget, pair, qtbot):
    w = widget
    truth = _world_truth(pair[2])
    w.transform_choice.value = "tps"
    _click_pairs(w, np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [100.0, 90.0]]), truth)
    _settle(w, qtbot)
    assert not w.transform.is_linear
    preview = w.real_viewer.layers["moving landmarks preview"]
    fixed = w.real_viewer.layers["fixed"].data
    assert preview.data.shape == fixed.shape
    np.testing.assert_allclose(preview.scale, [2.0, 2.0])
    np.testing.assert_allclose(preview.translate, [10.0, -5.0])
    inside = preview.data > 0
    # the exact similarity recovered through 4 TPS landmarks: the warped image matches
    corr = np.corrcoef(fixed[inside], preview.data[inside])[0, 1]
    assert corr > 0.95
    # switching model refits from the same points
    w.transform_choice.value = "rigid"
    _settle(w, qtbot)
    assert w.transform.is_linear and w.fit_info["fre_rms"] > 0.5  # scale 1.1 is not rigid


def test_one_image_at_a_time_shows_the_image_to_click(widget, pair, qtbot):
    w = widget
    fixed, moving = w.real_viewer.layers["fixed"], w.real_viewer.layers["moving"]
    w.one_at_a_time.value = True
    _click(qtbot, w.start_button)
    assert fixed.visible and not moving.visible
    _layer(w, "fixed landmarks").add([100.0, 100.0])
    assert moving.visible and not fixed.visible
    _layer(w, "moving landmarks").add([90.0, 110.0])
    assert fixed.visible and not moving.visible
    # without alternation the active layer stays where the user put it
    w.alternate.value = False
    _layer(w, "fixed landmarks").add([150.0, 60.0])
    assert _active(w) == "fixed landmarks"


def test_widget_opens_through_the_manifest(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((16, 16), np.float32), name="a")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-registration", "Landmark registration")
    assert type(widget).__name__ == "LandmarkWidget"
    _click(qtbot, widget.start_button)  # only one image: a clear message, no layers made
    assert "two different images" in widget.status.value
    assert len(viewer.layers) == 1


def _sloppy_pairs(w, pair):
    truth = _world_truth(pair[2])
    rng = np.random.default_rng(0)
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0]])
    m_world = moving_px * 2.0 + np.array([-3.0, 7.0])
    f_world = truth.apply(m_world) + rng.normal(0, 3.0, m_world.shape)  # sloppy clicks
    for fp, mp in zip(f_world, m_world):
        _layer(w, "fixed landmarks").add(fp)
        _layer(w, "moving landmarks").add(mp)
    return truth


@pytest.mark.skipif("intensity" not in available_methods(), reason="intensity backend not installed")
def test_refine_with_intensities_runs_in_a_worker(widget, pair, qtbot):
    w = widget
    truth = _sloppy_pairs(w, pair)
    _settle(w, qtbot)
    assert w.refine_button.enabled
    worker = w.make_refine_worker()
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    assert w.refined is not None and "moving registered" in w.viewer.layers
    from napari_registration.data import grid_points, tre_against_truth

    pts = grid_points((128, 128), (2.0, 2.0)) + np.array([10.0, -5.0])
    assert (tre_against_truth(w.refined.transform, truth, pts)["mean"]
            < tre_against_truth(w.transform, truth, pts)["mean"])


@pytest.mark.skipif("intensity" not in available_methods(), reason="intensity backend not installed")
@pytest.mark.parametrize("victim", ["fixed", "moving"])
def test_removing_an_input_while_refining_cancels_cleanly(widget, pair, qtbot, victim):
    w = widget
    _sloppy_pairs(w, pair)
    _settle(w, qtbot)
    _click(qtbot, w.refine_button)                 # the user presses Refine
    assert w.worker is not None and w.cancel_button.enabled
    w.real_viewer.layers.remove(victim)            # ... and deletes an input meanwhile
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    qtbot.wait(200)                                # the deferred status update
    assert w.refined is None
    assert "moving registered" not in w.real_viewer.layers
    assert "cancelled" in w.status.value and repr(victim) in w.status.value
    assert not w.cancel_button.enabled
    assert victim not in [c.name for c in w.fixed_layer.choices if c is not None]


def test_closing_the_dock_then_editing_layers_is_quiet(widget, pair, qtbot):
    w = widget
    _click_pairs(w, np.array([[20.0, 30.0], [90.0, 40.0]]), _world_truth(pair[2]))
    w.real_viewer.window.remove_dock_widget("all")   # closed while a refit is pending
    qtbot.wait(300)
    w.real_viewer.layers.remove("moving")
    _layer(w, "fixed landmarks").add([30.0, 30.0])
    qtbot.wait(300)
    assert "moving" not in w.real_viewer.layers


@pytest.mark.parametrize("ndim", [2, 3])
def test_tps_preview_is_small_and_close_to_the_full_resampling(ndim):
    from scipy import ndimage

    from napari_registration.backends.landmarks import fit_landmarks
    from napari_registration.core.resample import resample
    from napari_registration.widgets.landmarks import PREVIEW_SIDE, _tps_preview

    rng = np.random.default_rng(0)
    side = 600 if ndim == 2 else 160
    f = rng.uniform(0, side, (8, ndim))
    tps, _ = fit_landmarks(f, f + rng.normal(0, 4, f.shape), "tps")
    image = ndimage.gaussian_filter(rng.random((side,) * ndim).astype(np.float32), 4)
    data, sp, org = _tps_preview(image, tps, fixed_shape=image.shape, fixed_spacing=(1.0,) * ndim,
                                 fixed_origin=(0.0,) * ndim, moving_spacing=(1.0,) * ndim,
                                 moving_origin=(0.0,) * ndim, rgb=False)
    assert max(data.shape) <= PREVIEW_SIDE and data.size <= PREVIEW_SIDE ** 2 * 1.05
    full = resample(image, tps, data.shape, output_spacing=sp, output_origin=org)
    # compare away from the edge of the moving image's footprint (there a pixel is in or out)
    inside = resample(np.ones(image.shape, np.uint8), tps, data.shape, output_spacing=sp,
                      output_origin=org, labels=True).astype(bool)
    inside = ndimage.binary_erosion(inside, iterations=3)
    assert inside.mean() > 0.5
    assert np.abs(full - data)[inside].max() < 0.05 * np.ptp(image)


def test_a_rotated_image_is_refused_with_what_to_do(make_napari_viewer, pair, qtbot):
    """Clicks land where napari shows a layer, but the preview and the refinement resample
    on its scale/translate grid: a rotated (or sheared, or affine) image is refused at
    Start with a message, instead of giving a preview and a result in the wrong place."""
    fixed, moving, _ = pair
    viewer = make_napari_viewer(show=True)
    viewer.add_image(fixed, name="fixed")
    viewer.add_image(moving, name="moving", rotate=30)
    _, w = viewer.window.add_plugin_dock_widget("napari-registration", "Landmark registration")
    _click(qtbot, w.start_button)
    assert "'moving'" in w.status.value and "rotate" in w.status.value
    assert "Register images" in w.status.value
    assert "fixed landmarks" not in viewer.layers and w.fixed_points is None
    viewer.layers["moving"].rotate = 0  # reset: the dock starts
    _click(qtbot, w.start_button)
    assert "fixed landmarks" in viewer.layers and "moving landmarks" in viewer.layers
