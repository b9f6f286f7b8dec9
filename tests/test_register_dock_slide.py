"""The Register dock with a slide-sized multiscale pair, opened as the Plugins menu opens
it: the registered pyramid is lazy where it is big (small blocks, built in the worker),
its coarse levels are computed before it is placed, and the dock says how to keep
browsing responsive."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.qt


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


@pytest.mark.parametrize("async_slicing", [False, True])
def test_slide_result_is_lazy_where_big_and_built_off_the_gui_thread(
        viewer, open_widget, qtbot, notifications, monkeypatch, async_slicing):
    import dask.array as da
    from napari.settings import get_settings

    from napari_registration import Transform, apply_transform
    from napari_registration.bigdata import slide_pair
    from napari_registration.widgets import register as dock

    monkeypatch.setattr(get_settings().experimental, "async_", async_slicing)
    fixed, moving, truth = slide_pair(4096, angle=3.0, shift=(40.0, -25.0), levels=3, chunks=512)
    viewer.add_image(fixed, multiscale=True, rgb=True, name="fixed")
    viewer.add_image(moving, multiscale=True, rgb=True, name="moving")
    built_in = []
    real = dock.display_levels

    def spy(*args, **kwargs):
        built_in.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(dock, "display_levels", spy)
    w = open_widget("Register images")
    w.fixed.value, w.moving.value = viewer.layers["fixed"], viewer.layers["moving"]
    w.method.value, w.transform.value = "fourier", "rigid"
    qtbot.mouseClick(w.run_button.native, _left())
    qtbot.waitUntil(lambda: w.run_button.enabled and not w._running, timeout=180_000)
    assert w.status.value.startswith("done"), w.status.value
    assert built_in == [False]  # the pyramid was built in the worker
    out = viewer.layers["moving registered"]
    data = [out.data[k] for k in range(3)]
    assert [d.shape for d in data] == [(4096, 4096, 3), (2048, 2048, 3), (1024, 1024, 3)]
    # 4096^2 stays lazy, in blocks that compute quickly; 2048^2 and 1024^2 are ready
    assert isinstance(data[0], da.Array) and data[0].chunksize[:2] == (dock.DISPLAY_CHUNKS,) * 2
    assert all(isinstance(d, np.ndarray) for d in data[1:])
    assert all(d.dtype == np.uint8 for d in data)
    # what napari shows equals the exact warp (within OpenCV's 1/32 px weights)
    est = Transform.from_dict(out.metadata["registration"]["transform"])
    assert np.max(np.abs(est.apply([[0.0, 0.0], [4095.0, 4095.0]])
                         - truth.apply([[0.0, 0.0], [4095.0, 4095.0]]))) < 1.0
    exact = apply_transform(moving[0], est, output_shape=(4096, 4096), rgb=True, lazy=True)
    region = (slice(1500, 2012), slice(2000, 2512))
    diff = np.abs(np.asarray(data[0][region], float) - np.asarray(exact[region], float))
    assert np.median(diff) <= 1 and np.percentile(diff, 99) <= 8
    exact1 = apply_transform(moving[1], est, output_shape=(2048, 2048), output_spacing=(2.0, 2.0),
                             input_spacing=(2.0, 2.0), rgb=True, lazy=True)
    diff1 = np.abs(data[1][700:1000, 900:1200].astype(float)
                   - np.asarray(exact1[700:1000, 900:1200], float))
    assert np.median(diff1) <= 1
    # with synchronous slicing the dock says how to keep browsing responsive
    advised = any("Asynchronously" in m for m in notifications["info"])
    assert advised is (not async_slicing)


def test_blocks_seen_before_come_from_napari_cache_not_a_new_warp(monkeypatch):
    """Panning back: napari slices a dask layer inside its opportunistic cache
    (configure_dask); the warp's block keys are stable, so a block computed once is not
    warped again."""
    from napari.utils._dask_utils import configure_dask

    from napari_registration import Transform
    from napari_registration.core import lazy
    from napari_registration.widgets.register import display_levels

    calls = []
    real = lazy._warp_chunks

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(lazy, "_warp_chunks", counting)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (4096, 4096), dtype=np.uint8)
    t = Transform.from_rotation(3.0, center=(2048.0, 2048.0))
    levels = display_levels([image], t, [(4096, 4096)], output_spacings=[(1.0, 1.0)],
                            moving_spacings=[(1.0, 1.0)])
    assert hasattr(levels[0], "dask")  # 16 M pixels: lazy
    slicing = configure_dask(levels)
    view = (slice(100, 900), slice(1100, 1900))  # 2 x 2 blocks of 512
    with slicing():
        first = np.asarray(levels[0][view])
    assert len(calls) == 4
    with slicing():
        again = np.asarray(levels[0][view])
    assert len(calls) == 4  # panned back: no block warped again
    np.testing.assert_array_equal(first, again)


def test_display_levels_of_a_volume_keep_volume_sized_blocks():
    from napari_registration import Transform
    from napari_registration.widgets.register import display_levels

    vol = np.zeros((256, 256, 256), np.uint16)  # 16.7 M voxels: stays lazy
    out = display_levels([vol, vol[::2, ::2, ::2]], Transform.from_translation((1.0, 2.0, 3.0)),
                         [(256, 256, 256), (128, 128, 128)],
                         output_spacings=[(1.0,) * 3, (2.0,) * 3],
                         moving_spacings=[(1.0,) * 3, (2.0,) * 3])
    assert out[0].chunksize == (128, 128, 128)  # not 512^3 blocks of 134 M voxels
    assert isinstance(out[1], np.ndarray) and out[1].dtype == np.uint16
