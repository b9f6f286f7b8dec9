"""Screenshots for docs/big-images.md, from a real 1280x800 napari window.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python tools/big_screenshots.py [--size 20000]

A slide pair (``napari_registration.bigdata.slide_pair``: scikit-image's
immunohistochemistry slide, magnified, with a known rotation and shift, as lazy 2x
pyramids) is opened as two multiscale layers and registered with the *Register images*
dock, opened as the Plugins menu opens it (``fourier``, ``rigid``, on the level the dock
picks). Pictures:

* ``big_slide_register_dock.png``: the dock after the run, the fixed slide under the
  lazy registered pyramid at half opacity (whole slide);
* ``big_slide_grid.png``: moving, fixed and registered side by side (grid mode);
* ``big_slide_full_resolution.png``: zoomed in (one screen pixel = two slide pixels,
  a level warped lazily as it is shown), the registered result at half opacity over the
  fixed slide.

napari's asynchronous slicing is on while the pictures are made, as the guide advises.

The GUI-stall measurement that used to live here is ``benchmarks/bench_gui_slide.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def wait(ms: int) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.005)


def shot(viewer, path: Path, settle_ms: int = 1500) -> None:
    from PIL import Image

    wait(settle_ms)
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(np.asarray(rgba)[..., :3]).quantize(colors=256).save(path, optimize=True)
    print("wrote", path, np.asarray(rgba).shape)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = p.parse_args()
    import napari

    from napari_registration import Transform
    from napari_registration.bigdata import slide_pair

    levels = int(np.floor(np.log2(args.size / 512))) + 1
    fixed, moving, truth = slide_pair(args.size, angle=4.0, shift=(310.0, -180.0), levels=levels)

    from napari.settings import get_settings

    # as the guide recommends for lazy results (and so the dock gives no advice)
    settings = get_settings().experimental
    was_async, settings.async_ = settings.async_, True
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    viewer.add_image(moving, multiscale=True, rgb=True, name="moving slide")
    viewer.add_image(fixed, multiscale=True, rgb=True, name="fixed slide")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-registration", "Register images")
    wait(500)
    widget.fixed.value = viewer.layers["fixed slide"]
    widget.moving.value = viewer.layers["moving slide"]
    widget.method.value, widget.transform.value = "fourier", "rigid"
    t0 = time.perf_counter()
    widget.run()
    while widget._running and time.perf_counter() - t0 < 600:
        wait(100)
    seconds = time.perf_counter() - t0
    print("dock:", widget.status.value, f"({seconds:.1f} s to placed)")
    result = viewer.layers["moving slide registered"]
    est = Transform.from_dict(result.metadata["registration"]["transform"])
    corners = np.array([[0.0, 0.0], [args.size - 1.0, args.size - 1.0], [0.0, args.size - 1.0]])
    tre = float(np.max(np.linalg.norm(est.apply(corners) - truth.apply(corners), axis=1)))
    print(f"TRE at the slide's corners: {tre:.3f} px")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. the dock and its result over the fixed slide
    for layer in viewer.layers:
        layer.visible = layer.name in ("fixed slide", "moving slide registered")
    viewer.layers["moving slide"].visible = False
    result.opacity = 0.5
    viewer.layers.selection.active = result
    viewer.reset_view()
    shot(viewer, out / "big_slide_register_dock.png")

    # 2. side by side: registered, fixed, moving (the checkerboard would take a place)
    viewer.window.remove_dock_widget(dock)
    viewer.layers.remove(viewer.layers["checkerboard: moving slide"])
    for layer in viewer.layers:
        layer.visible = True
    result.opacity = 1.0
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 3)
    wait(500)  # the canvas takes the dock's room first
    viewer.reset_view()
    shot(viewer, out / "big_slide_grid.png")

    # 3. zoomed in, the registered result at half opacity over the fixed slide
    viewer.grid.enabled = False
    viewer.layers["moving slide"].visible = False
    result.opacity = 0.5
    viewer.camera.center = (args.size * 0.45, args.size * 0.45)
    viewer.camera.zoom = 0.5  # a screen pixel = 2 slide pixels: a lazy level
    shot(viewer, out / "big_slide_full_resolution.png", settle_ms=6000)
    print("level shown:", result.data_level)
    print(json.dumps({"size": args.size, "levels": levels, "dock_seconds": seconds,
                      "status": widget.status.value, "tre_px": tre}))
    viewer.close()
    settings.async_ = was_async
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
