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


@pytest.fixture
def widget(make_napari_viewer, pair):
    from napari_registration.widgets.landmarks import LandmarkWidget

    fixed, moving, _ = pair
    viewer = make_napari_viewer(show=True)
    # anisotropic pixels and offsets: clicks are world coordinates
    viewer.add_image(fixed, name="fixed", scale=(2.0, 2.0), translate=(10.0, -5.0))
    viewer.add_image(moving, name="moving", scale=(2.0, 2.0), translate=(-3.0, 7.0))
    w = LandmarkWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.fixed_layer.value.name == "fixed" and w.moving_layer.value.name == "moving"
    w.transform_choice.value = "similarity"
    w.start()
    return w


def _world_truth(truth_px):
    """The pixel-space truth in the widget's worlds (scale 2, the two translates)."""
    f = Transform(np.array([[2.0, 0, 10.0], [0, 2.0, -5.0], [0, 0, 1]]))
    m = Transform(np.array([[2.0, 0, -3.0], [0, 2.0, 7.0], [0, 0, 1]]))
    return m.inverse().then(truth_px).then(f)


def _click_pairs(w, moving_px, truth_world):
    m_world = moving_px * 2.0 + np.array([-3.0, 7.0])
    f_world = truth_world.apply(m_world)
    for fp, mp in zip(f_world, m_world):
        assert w.viewer.layers.selection.active is w.fixed_points
        w.fixed_points.add(fp)
        # BigWarp-style: the next click goes to the other image
        assert w.viewer.layers.selection.active is w.moving_points
        assert w.moving_points.mode == "add"
        w.moving_points.add(mp)
    return f_world, m_world


def test_pairs_alternate_and_the_fit_is_live(widget, pair, qtbot):
    w = widget
    _, _, truth_px = pair
    truth = _world_truth(truth_px)
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [30.0, 80.0]])
    assert "fixed landmarks" in w.viewer.layers and "moving landmarks" in w.viewer.layers
    # one pair: too few for a similarity; the status says so, no fit
    _click_pairs(w, moving_px[:1], truth)
    assert w.transform is None and "needs 2" in w.status.value
    _click_pairs(w, moving_px[1:], truth)
    qtbot.wait(50)
    np.testing.assert_allclose(w.transform.matrix, truth.matrix, atol=1e-8)
    assert w.fit_info["n_points"] == 4
    assert len(w.table.value["data"]) == 4 and float(w.table.value["data"][0][2]) < 1e-6
    # preview: the moving data shown through the fit, no copy, lined up in world
    preview = w.viewer.layers["moving landmarks preview"]
    assert preview.data is w.moving_layer.value.data
    data_to_world = preview.affine.affine_matrix @ np.array(
        [[2.0, 0, -3.0], [0, 2.0, 7.0], [0, 0, 1]])
    np.testing.assert_allclose(data_to_world, truth.matrix @ np.array(
        [[2.0, 0, -3.0], [0, 2.0, 7.0], [0, 0, 1]]), atol=1e-8)
    assert preview.metadata["registration"]["method"] == "landmarks"
    # point layers stay on top and keep the click
    assert list(w.viewer.layers)[-1] in (w.fixed_points, w.moving_points)


def test_moving_and_deleting_points_refits(widget, pair):
    w = widget
    truth = _world_truth(pair[2])
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [30.0, 80.0], [100, 100]])
    _click_pairs(w, moving_px, truth)
    exact = w.transform.matrix.copy()
    # drag one fixed point by 6 world units: the fit moves, its pair gets the largest residual
    data = w.fixed_points.data.copy()
    data[2] += [6.0, 0.0]
    w.fixed_points.data = data
    assert not np.allclose(w.transform.matrix, exact)
    residuals = [float(r[2]) for r in w.table.value["data"]]
    assert int(np.argmax(residuals)) == 2 and residuals[2] > 1.0
    # deleting that point deletes its partner: pairs stay aligned, the exact fit returns
    w.fixed_points.remove([2])
    assert len(w.fixed_points.data) == len(w.moving_points.data) == 4
    np.testing.assert_allclose(w.transform.matrix, exact, atol=1e-8)
    assert len(w.table.value["data"]) == 4


def test_tps_preview_is_resampled_on_the_fixed_grid(widget, pair):
    w = widget
    truth = _world_truth(pair[2])
    w.transform_choice.value = "tps"
    _click_pairs(w, np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0], [100.0, 90.0]]), truth)
    assert not w.transform.is_linear
    preview = w.viewer.layers["moving landmarks preview"]
    assert preview.data.shape == w.fixed_layer.value.data.shape
    np.testing.assert_allclose(preview.scale, [2.0, 2.0])
    np.testing.assert_allclose(preview.translate, [10.0, -5.0])
    fixed = w.fixed_layer.value.data
    inside = preview.data > 0
    # the exact similarity recovered through 4 TPS landmarks: the warped image matches
    corr = np.corrcoef(fixed[inside], preview.data[inside])[0, 1]
    assert corr > 0.95
    # switching model refits from the same points
    w.transform_choice.value = "rigid"
    assert w.transform.is_linear and w.fit_info["fre_rms"] > 0.5  # scale 1.1 is not rigid


def test_one_image_at_a_time_shows_the_image_to_click(widget, pair):
    w = widget
    fixed, moving = w.fixed_layer.value, w.moving_layer.value
    w.one_at_a_time.value = True
    w.start()
    assert fixed.visible and not moving.visible
    w.fixed_points.add([100.0, 100.0])
    assert moving.visible and not fixed.visible
    w.moving_points.add([90.0, 110.0])
    assert fixed.visible and not moving.visible
    # without alternation the active layer stays where the user put it
    w.alternate.value = False
    w.fixed_points.add([150.0, 60.0])
    assert w.viewer.layers.selection.active is w.fixed_points


def test_widget_opens_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((16, 16), np.float32), name="a")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-registration", "Landmark registration")
    assert type(widget).__name__ == "LandmarkWidget"
    widget.start()  # only one image: a clear message, no layers made
    assert "two different images" in widget.status.value


@pytest.mark.skipif("intensity" not in available_methods(), reason="intensity backend not installed")
def test_refine_with_intensities_runs_in_a_worker(widget, pair, qtbot):
    w = widget
    truth = _world_truth(pair[2])
    rng = np.random.default_rng(0)
    moving_px = np.array([[20.0, 30.0], [90.0, 40.0], [60.0, 100.0]])
    m_world = moving_px * 2.0 + np.array([-3.0, 7.0])
    f_world = truth.apply(m_world) + rng.normal(0, 3.0, m_world.shape)  # sloppy clicks
    for fp, mp in zip(f_world, m_world):
        w.fixed_points.add(fp)
        w.moving_points.add(mp)
    assert w.refine_button.enabled
    worker = w.make_refine_worker()
    with qtbot.waitSignal(worker.finished, timeout=60000):
        worker.start()
    assert w.refined is not None and "moving registered" in w.viewer.layers
    from napari_registration.data import grid_points, tre_against_truth

    pts = grid_points((128, 128), (2.0, 2.0)) + np.array([10.0, -5.0])
    assert (tre_against_truth(w.refined.transform, truth, pts)["mean"]
            < tre_against_truth(w.transform, truth, pts)["mean"])
