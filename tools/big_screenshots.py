"""Screenshots for docs/big-images.md, and the GUI-stall measurement behind its claim.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python tools/big_screenshots.py [--size 20000]

A slide pair (``napari_registration.bigdata.slide_pair``: scikit-image's
immunohistochemistry slide, magnified, with a known rotation and shift) is registered
through its pyramid; the moving slide, the fixed slide and the lazy multiscale warped
result are shown in a 1280x800 napari window (grid mode). Then the camera zooms and pans
into full resolution while a 10 ms Qt timer records the longest gap between its turns:
the longest time the GUI thread was busy (drawing and computing warped tiles), with
napari's default synchronous slicing and with its asynchronous slicing.
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


def shot(viewer, path: Path) -> None:
    from PIL import Image

    wait(500)
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(np.asarray(rgba)[..., :3]).quantize(colors=256).save(path, optimize=True)
    print("wrote", path, np.asarray(rgba).shape)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = p.parse_args()
    import napari
    from qtpy.QtCore import QTimer

    from napari_registration import register
    from napari_registration.bigdata import slide_pair

    levels = int(np.floor(np.log2(args.size / 512))) + 1
    fixed, moving, truth = slide_pair(args.size, angle=4.0, shift=(310.0, -180.0), levels=levels)
    t0 = time.perf_counter()
    result = register(fixed, moving, method="fourier", transform="rigid", fast_warp=True)
    seconds = time.perf_counter() - t0

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    viewer.add_image(moving, multiscale=True, rgb=True, name="moving slide")
    viewer.add_image(fixed, multiscale=True, rgb=True, name="fixed slide")
    viewer.add_image(result.warped, multiscale=True, rgb=True, name="moving registered (lazy)")
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 3)
    viewer.reset_view()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shot(viewer, out / "big_slide_grid.png")

    # browse: zoom into full resolution and pan, timing the GUI thread's longest gap;
    # once with napari's default (slicing, and so the lazy warp, on the GUI thread) and
    # once with its asynchronous slicing (settings.experimental.async_), each on a region
    # of its own (napari caches dask chunks)
    from napari.settings import get_settings

    viewer.grid.enabled = False
    for layer in viewer.layers[:2]:
        layer.visible = False
    stall = {"size": args.size, "transform_seconds": seconds, "levels": levels}
    for mode, row in (("sync", 0.3), ("async", 0.7)):
        get_settings().experimental.async_ = mode == "async"
        gaps, last = [], [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        timer = QTimer()
        timer.timeout.connect(tick)
        viewer.reset_view()
        wait(300)
        timer.start(10)
        y, x = args.size * row, args.size * 0.3
        viewer.camera.center = (y, x)
        for zoom in np.geomspace(viewer.camera.zoom, 1.0, 8):
            viewer.camera.zoom = float(zoom)
            wait(200)
        for dx in np.linspace(0, 0.4 * args.size, 12):
            viewer.camera.center = (y, x + float(dx))
            wait(200)
        wait(2000)  # let the last tiles arrive
        timer.stop()
        stall[mode] = {"max_gui_gap_ms": 1000 * max(gaps[1:]),
                       "p99_gui_gap_ms": 1000 * float(np.percentile(gaps[1:], 99)),
                       "median_gui_gap_ms": 1000 * float(np.median(gaps[1:])),
                       "gaps_over_250ms": int(np.sum(np.array(gaps[1:]) > 0.25)),
                       "ticks": len(gaps)}
    get_settings().experimental.async_ = False
    # the picture: fixed slide with the registered result at half opacity, mid zoom
    viewer.layers[1].visible = True
    viewer.layers[2].opacity = 0.5
    viewer.camera.center = (args.size * 0.45, args.size * 0.45)
    viewer.camera.zoom = 0.25  # a screen pixel = 4 slide pixels: level 2 of the pyramid
    wait(1500)
    shot(viewer, out / "big_slide_full_resolution.png")
    print(json.dumps(stall))
    (ROOT / "benchmarks" / "results" / "bigimage_gui.json").write_text(json.dumps(stall, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
