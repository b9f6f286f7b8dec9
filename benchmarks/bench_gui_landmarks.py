"""GUI stalls of the landmark dock during 20 landmark clicks with a thin-plate spline.

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python benchmarks/bench_gui_landmarks.py
    # the same script against another checkout (e.g. the code before issue #13):
    git archive 950297b src | tar -x -C /tmp/orig950
    PYTHONPATH=/tmp/orig950/src xvfb-run -a ... benchmarks/bench_gui_landmarks.py --label 950297b

A real napari window (1280x800) with the two-channel sample; the *Landmark registration*
dock is opened through the Plugins menu entry (``add_plugin_dock_widget``), the
transform set to ``tps`` and Start pressed. Then 20 clicks (10 pairs, alternating fixed /
moving) are made every ``--interval`` ms from a Qt timer on the GUI thread, each the way
napari's "add" mouse mode does it (``layer.add(coordinates)`` on the active layer). A
second 10 ms Qt timer on the GUI thread records when it runs; a *stall* is the time
between two of its turns beyond its 10 ms period.

Stalls are split by what the GUI thread was doing: *placing* when the gap overlaps the
dock putting results into the viewer (its ``_update_preview`` / ``_fill_table``);
*click* when it holds a click (napari adding the point and redrawing, the dock's event
handler; in the old code the whole fit runs there, on the GUI thread); *computing*
otherwise (the fit running in a worker). In the old code ``_update_preview`` also
resampled the TPS preview, so that time counts as placing there. ``--baseline`` makes
the same clicks without the dock (two plain Points layers, the active layer switched
as the dock does): napari's own cost of a click on this machine.

Prints a JSON record (and writes it to benchmarks/results/gui_landmarks_<label>.json).
With ``BENCH_DEBUG=1`` every gap over 100 ms is listed with the clicks, placing and
(current code) fit-worker spans it overlaps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PLUGIN = "napari-registration"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--interval", type=int, default=400, help="ms between clicks")
    parser.add_argument("--out", default=None)
    parser.add_argument("--baseline", action="store_true",
                        help="no dock: the same clicks on two plain Points layers, switching "
                             "the active layer as the dock does (napari's own cost)")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    import napari_registration

    viewer = napari.Viewer(show=True, title="bench")
    viewer.window._qt_window.resize(1280, 800)
    viewer.open_sample(PLUGIN, "fluorescence_pair")
    fixed = viewer.layers["nuclei (fixed)"]
    if args.baseline:
        import types

        moving = viewer.layers["nuclei shifted (moving)"]
        pts = [viewer.add_points(np.empty((0, 2)), name=f"{im.name} landmarks", ndim=2)
               for im in (fixed, moving)]
        w = types.SimpleNamespace(fit_info=None, _update_preview=lambda: None,
                                  _fill_table=lambda: None)

        def alternate(event, i):
            if str(event.action) == "added":
                other = pts[1 - i]
                viewer.layers.selection.active = other
                other.mode = "add"

        for i, layer in enumerate(pts):
            layer.events.data.connect(lambda e, i=i: alternate(e, i))
        viewer.layers.selection.active = pts[0]
        pts[0].mode = "add"
    else:
        _, w = viewer.window.add_plugin_dock_widget(PLUGIN, "Landmark registration")
        w.transform_choice.value = "tps"
        w.start()
    for _ in range(30):
        QApplication.processEvents()
        time.sleep(0.01)

    # placing spans: wrap the dock's result-placing methods on the instance
    spans = []

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans.append((t0, time.perf_counter()))
        return run

    for name in ("_update_preview", "_fill_table"):
        setattr(w, name, timed(getattr(w, name)))
    fit_spans = []
    if os.environ.get("BENCH_DEBUG"):
        import napari_registration.widgets.landmarks as lm
        orig_job = getattr(lm, "_fit_job", None)
        if orig_job is not None:
            def job(*a):
                t0 = time.perf_counter()
                try:
                    return orig_job(*a)
                finally:
                    fit_spans.append((t0, time.perf_counter()))
            lm._fit_job = job

    # click positions: a jittered grid over the fixed image, partners shifted a little
    shape = np.asarray(fixed.data.shape, float) * np.asarray(fixed.scale)
    rng = np.random.default_rng(1)
    n_pairs = args.clicks // 2
    grid = np.stack(np.meshgrid(np.linspace(0.15, 0.85, 4), np.linspace(0.15, 0.85, 3),
                                indexing="ij"), -1).reshape(-1, 2)[:n_pairs]
    f_pts = grid * shape + rng.normal(0, 4, grid.shape)
    m_pts = f_pts + np.array([6.0, -4.0]) + rng.normal(0, 1.5, grid.shape)
    clicks = [p for pair in zip(f_pts, m_pts) for p in pair][: args.clicks]
    real_viewer = viewer  # our own viewer: the real layers napari's mouse code sees

    ticks = []
    tick = QTimer()
    tick.setInterval(10)
    tick.timeout.connect(lambda: ticks.append(time.perf_counter()))
    click_times = []
    add_ms = []  # each click's synchronous handling (napari's and the dock's handlers)
    state = {"i": 0}

    def click():
        i = state["i"]
        if i >= len(clicks):
            return
        layer = real_viewer.layers.selection.active
        expect = "nuclei (fixed) landmarks" if i % 2 == 0 else "nuclei shifted (moving) landmarks"
        if layer is None or layer.name != expect:  # the old code does not alternate from the menu
            layer = real_viewer.layers[expect]
        click_times.append(time.perf_counter())
        layer.add(clicks[i])
        add_ms.append(1000 * (time.perf_counter() - click_times[-1]))
        state["i"] = i + 1

    clicker = QTimer()
    clicker.setInterval(args.interval)
    clicker.timeout.connect(click)

    loop = QEventLoop()
    t_start = time.perf_counter()
    tick.start()
    clicker.start()

    def check_done():
        idle = not getattr(w, "busy", False)
        if state["i"] >= len(clicks) and idle and time.perf_counter() - click_times[-1] > 1.0:
            loop.quit()
        elif time.perf_counter() - t_start > 300:
            loop.quit()

    done = QTimer()
    done.setInterval(50)
    done.timeout.connect(check_done)
    done.start()
    loop.exec()
    tick.stop()
    clicker.stop()
    done.stop()

    t = np.asarray(ticks)
    if os.environ.get("BENCH_DEBUG"):
        g = np.diff(t)
        for k in np.nonzero(g > 0.1)[0]:
            a, b = t[k], t[k + 1]
            near = [round(1000 * (c - a)) for c in click_times if a - 0.05 < c < b]
            pl = [round(1000 * (y - x)) for x, y in spans if x < b and y > a]
            fits = [round(1000 * (y - x)) for x, y in fit_spans if x < b and y > a]
            print(f"gap {1000 * (b - a):.0f} ms at {a - t[0]:.2f}s clicks@{near} placing{pl} fitting{fits}")
    gaps = np.diff(t)
    stall = np.maximum(gaps - 0.010, 0.0)
    placing = np.zeros(len(gaps), bool)
    for a, b in spans:
        placing |= (t[:-1] < b) & (t[1:] > a)
    clicking = np.zeros(len(gaps), bool)
    for c in click_times:
        clicking |= (t[:-1] <= c) & (t[1:] > c)
    clicking &= ~placing
    computing = ~placing & ~clicking
    record = {
        "label": args.label,
        "code": str(Path(napari_registration.__file__).resolve().parents[1]),
        "clicks": len(click_times),
        "interval_ms": args.interval,
        "transform": "tps",
        "pairs_fitted": (w.fit_info or {}).get("n_points"),
        "image_shape": list(fixed.data.shape),
        "max_stall_ms": round(1000 * float(stall.max()), 1),
        "max_stall_placing_ms": round(1000 * float(stall[placing].max()), 1) if placing.any() else 0.0,
        "max_stall_click_ms": round(1000 * float(stall[clicking].max()), 1) if clicking.any() else 0.0,
        "max_stall_computing_ms": round(1000 * float(stall[computing].max()), 1) if computing.any() else 0.0,
        "stalls_over_100ms": int((stall > 0.100).sum()),
        "stalls_over_250ms": int((stall > 0.250).sum()),
        "total_stalled_s": round(float(stall.sum()), 2),
        "click_handling_ms_median": round(float(np.median(add_ms)), 1),
        "click_handling_ms_max": round(float(np.max(add_ms)), 1),
        "seconds": round(float(t[-1] - t[0]), 1),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "napari": napari.__version__,
    }
    print(json.dumps(record))
    out = Path(args.out) if args.out else HERE / "results" / f"gui_landmarks_{args.label}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    viewer.close()


if __name__ == "__main__":
    main()
