"""GUI stalls while a slide-sized lazy registered result is browsed in napari.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python benchmarks/bench_gui_slide.py \
        [--size 20000] [--repeats 2] [--modes sync async] [--source scene|free] [--why]

A slide pair (``napari_registration.bigdata.slide_pair``: scikit-image's
immunohistochemistry slide magnified to ``--size`` px a side, uint8 RGB, a 4 degree
rotation + shift, as 2x pyramids built lazily) is shown as ONE multiscale layer in a
1280x800 napari window, and the camera follows the same path for every layer: from the
whole slide, zoom in 8 steps to full resolution (one screen pixel = one slide pixel),
pan 8,000 px in 12 steps, pan back 6 steps (tiles seen before), 200 ms per step. A 10 ms
QTimer on the GUI thread records the gaps between its turns: the longest is how long
the viewer was frozen (drawing, and with synchronous slicing computing the visible tiles).

Layers compared, one after the other in the same session, napari's dask cache emptied
before each:

* ``napari, free tiles``: a lazy multiscale layer of the same size whose blocks cost
  nothing (copies of one precomputed tile, in 1024 px blocks as the slides have): what
  napari's slicing and drawing alone cost on this machine.
* ``napari alone``: the fixed slide itself (lazy, not warped): napari with a lazy
  multiscale layer of the same size whose blocks are computed (the synthetic scene; the
  warped layers compute the same scene for their source blocks, plus the warp).
* ``before``: the warped moving slide as the Register dock built it before this change:
  every level ``apply_transform(..., lazy=True)`` (exact SciPy warp, the input's 1024 px
  blocks), all levels lazy.
* ``after``: as the dock builds it now (``widgets.register.display_levels``): 512 px
  blocks, OpenCV per block (releases the GIL), the levels of at most 8 M pixels computed
  before the layer is placed (in the dock: in its worker thread; here: timed apart).

Each layer is browsed with napari's default synchronous slicing and with its
asynchronous slicing (``settings.experimental.async_``). The transform is the known
truth (the browsing cost does not depend on which rigid transform is shown).
``--source free`` makes the moving slide free tiles too: the warped layers then differ
from ``napari, free tiles`` by the warp alone. ``--why`` samples the GUI thread's Python
stack during gaps over 100 ms (where the time goes).
Writes benchmarks/results/gui_slide.json. Timing on a shared machine is noisy: compare
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def spin(ms: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)


def _stats(gaps) -> dict:
    g = 1000 * np.asarray(gaps)
    if len(g) == 0:
        return {}
    return {"max_ms": float(g.max()), "p99_ms": float(np.percentile(g, 99)),
            "median_ms": float(np.median(g)), "over_250ms": int(np.sum(g > 250)),
            "ticks": int(len(g))}


class StallSampler:
    """A watchdog thread: when the GUI thread has not ticked for ``after`` s, it samples
    the GUI thread's Python stack every 20 ms; ``report()`` counts the innermost frames
    of our code, napari, vispy and the rest (where the long gaps are spent)."""

    def __init__(self, ticks, after=0.1):
        import threading

        self.ticks, self.after, self.samples = ticks, after, []
        self.main = threading.main_thread().ident
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import sys
        import traceback

        while not self.stop.wait(0.02):
            if time.perf_counter() - self.ticks[-1] > self.after:
                frame = sys._current_frames().get(self.main)
                if frame is not None:
                    stack = traceback.extract_stack(frame)
                    self.samples.append([f"{Path(f.filename).name}:{f.name}" for f in stack[-12:]])

    def report(self, top=8) -> list:
        from collections import Counter

        self.stop.set()
        self.thread.join()
        count = Counter(" < ".join(reversed(s[-4:])) for s in self.samples)
        return [[n, k] for k, n in count.most_common(top)]


def browse(viewer, size: int, row: float, why: bool = False) -> dict:
    """The camera path; the GUI thread's gaps per phase."""
    from qtpy.QtCore import QTimer

    ticks = [time.perf_counter()]
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    phases = {}
    viewer.reset_view()
    spin(300)
    timer.start(10)
    ticks[:] = [time.perf_counter()]
    sampler = StallSampler(ticks) if why else None

    def phase(name, steps):
        start = len(ticks)
        for step in steps:
            step()
            spin(200)
        phases[name] = np.diff(ticks[start - 1:])

    y, x = size * row, size * 0.25
    viewer.camera.center = (y, x)
    zooms = np.geomspace(viewer.camera.zoom, 1.0, 8)
    phase("zoom", [lambda z=z: setattr(viewer.camera, "zoom", float(z)) for z in zooms])
    xs = x + np.linspace(0, 0.4 * size, 12)
    phase("pan", [lambda v=v: setattr(viewer.camera, "center", (y, float(v))) for v in xs])
    phase("pan_back", [lambda v=v: setattr(viewer.camera, "center", (y, float(v)))
                       for v in xs[::-1][1:7]])
    start = len(ticks)
    spin(2000)  # the last tiles arrive
    timer.stop()
    phases["settle"] = np.diff(ticks[start - 1:])
    all_gaps = np.diff(ticks)
    out = {"all": _stats(all_gaps), **{k: _stats(v) for k, v in phases.items()}}
    if sampler is not None:
        out["stalled_in"] = sampler.report()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["sync", "async"])
    p.add_argument("--layers", nargs="+",
                   default=["napari, free tiles", "napari alone", "before", "after"])
    p.add_argument("--source", choices=["scene", "free"], default="scene",
                   help="the slides' blocks: the synthetic scene (computed per block), or "
                        "free (copies of one tile, as cheap as reading a file gets): then the "
                        "warped layers differ from 'napari, free tiles' by the warp alone")
    p.add_argument("--why", action="store_true",
                   help="sample the GUI thread's stack during gaps over 100 ms")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gui_slide.json"))
    args = p.parse_args()

    import napari
    from napari.settings import get_settings
    from napari.utils import _dask_utils

    from napari_registration.bigdata import slide_pair
    from napari_registration.core.register import apply_transform
    from napari_registration.widgets.register import display_levels

    size = args.size
    n_levels = int(np.floor(np.log2(size / 512))) + 1
    fixed, moving, truth = slide_pair(size, angle=4.0, shift=(310.0, -180.0), levels=n_levels)
    spacings = [(2.0 ** k, 2.0 ** k) for k in range(n_levels)]
    shapes = [lev.shape[:2] for lev in fixed]

    # one real 512 px RGB tile (the coarsest level has >= 512 px), repeated to a block
    tile = np.tile(np.asarray(fixed[-1][:512, :512]), (2, 2, 1))

    def free_block(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"][:2]
        return np.ascontiguousarray(tile[:r1 - r0, :c1 - c0])

    def free_pyramid():
        import dask.array as da

        return [da.map_blocks(free_block, dtype=np.uint8, chunks=da.core.normalize_chunks(
            (1024, 1024, 3), lev.shape), meta=np.empty((0, 0, 0), np.uint8)) for lev in fixed]

    if args.source == "free":
        moving = free_pyramid()

    def make(name):
        if name == "napari alone":
            return fixed, 0.0
        if name == "napari, free tiles":
            return free_pyramid(), 0.0
        if name == "before":
            return [apply_transform(moving[k], truth, output_shape=shapes[k],
                                    output_spacing=spacings[k], input_spacing=spacings[k],
                                    rgb=True, lazy=True) for k in range(n_levels)], 0.0
        t0 = time.perf_counter()
        levels = display_levels(moving, truth, shapes, output_spacings=spacings,
                                moving_spacings=spacings, rgb=True, dtype=np.uint8)
        return levels, time.perf_counter() - t0

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    spin(1000)
    runs = []
    for rep in range(args.repeats):
        row = 0.3 + 0.4 * rep / max(args.repeats - 1, 1)  # one region per repeat, same for all
        for name in args.layers:
            for mode in args.modes:
                get_settings().experimental.async_ = mode == "async"
                _dask_utils._DASK_CACHE.cache.clear()  # nothing computed by an earlier run
                data, prep = make(name)
                viewer.layers.clear()
                viewer.add_image(data, multiscale=True, rgb=True, name=name)
                spin(500)
                stats = browse(viewer, size, row, args.why)
                run = {"layer": name, "mode": mode, "repeat": rep, "prepare_s": prep, **stats}
                runs.append(run)
                print(f"{name:18s} {mode:5s} rep {rep}: max gap {stats['all']['max_ms']:7.0f} ms, "
                      f"p99 {stats['all']['p99_ms']:5.0f}, >250 ms: {stats['all']['over_250ms']:2d}"
                      f"  (zoom {stats['zoom']['max_ms']:.0f}, pan {stats['pan']['max_ms']:.0f}, "
                      f"back {stats['pan_back']['max_ms']:.0f}) prepare {prep:.1f} s", flush=True)
    get_settings().experimental.async_ = False
    viewer.close()
    summary = {}
    for name in args.layers:
        for mode in args.modes:
            mine = [r for r in runs if r["layer"] == name and r["mode"] == mode]
            summary[f"{name} / {mode}"] = {
                "max_ms (worst run)": max(r["all"]["max_ms"] for r in mine),
                "max_ms (per run)": [round(r["all"]["max_ms"]) for r in mine],
                "p99_ms (median run)": float(np.median([r["all"]["p99_ms"] for r in mine])),
                "over_250ms (per run)": [r["all"]["over_250ms"] for r in mine],
                "pan_back max_ms (per run)": [round(r["pan_back"]["max_ms"]) for r in mine]}
    out = {"size": size, "levels": n_levels, "repeats": args.repeats, "source": args.source,
           "load_average": os.getloadavg(), "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
