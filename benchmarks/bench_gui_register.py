"""GUI stalls of the *Register images* dock in a real napari window.

    xvfb-run -a .venv/bin/python benchmarks/bench_gui_register.py \
        [--orig /tmp/orig950f/src] [--repeats 3]

A 10 ms QTimer ticks on the GUI thread while the dock (opened through the manifest, as
the Plugins menu does) registers a sample pair; the longest time between two ticks is
how long the viewer was frozen. Two phases per run:

* computing: from the click on *Register* until the worker returns;
* placing: from then until the result layers are in the viewer plus one second of
  drawing (napari triangulates Shapes and uploads textures when it first draws).

Cases (the plugin's sample data, opened as File > Open Sample does): the 3D volume
sample (anisotropic voxels) with ``intensity`` rigid, and
the 2D two-channel fluorescence sample (512 x 512) with ``features`` rigid, plus, where the dock has the choice, ``features`` with the keypoint and
match layers switched on.

Every code version runs in its own subprocess with its own PYTHONPATH, one after the
other in the same session: ``--orig`` points at another checkout's ``src`` (e.g. the
code before these changes: ``git archive 950297b src | tar -x -C /tmp/orig950f``).
Writes benchmarks/results/gui_register.json. Timing on a shared machine is noisy: the
load average is recorded, and only ratios within one session are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CASES = {
    "volume_intensity_rigid": dict(sample="volume", method="intensity", transform="rigid"),
    "fluorescence_features_rigid": dict(sample="fluorescence", method="features",
                                        transform="rigid"),
    "fluorescence_features_rigid_matches_shown": dict(sample="fluorescence", method="features",
                                                      transform="rigid", show_matches=True),
}


# ---------------------------------------------------------------- inside the subprocess
def _spin(ms: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)


def _longest_gap(ticks, start, end) -> float:
    inside = [t for t in ticks if start <= t <= end]
    points = [start] + inside + [end]
    return max(b - a for a, b in zip(points, points[1:]))


def measure(case: dict, repeats: int) -> dict:
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    # as File > Open Sample does
    viewer.open_sample("napari-registration", f"{case['sample']}_pair")
    _, widget = viewer.window.add_plugin_dock_widget("napari-registration", "Register images")
    _spin(500)
    widget.method.value = case["method"]
    widget.transform.value = case["transform"]
    has_switch = hasattr(widget, "show_matches")
    if case.get("show_matches"):
        if not has_switch:
            viewer.close()
            return {"skipped": "this version has no switch: it always adds the layers"}
        widget.show_matches.value = True
    elif has_switch:
        widget.show_matches.value = False

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    messages: list[tuple[float, str]] = []
    widget._bridge.progress.connect(lambda f, m: messages.append((time.perf_counter(), m)))
    runs = []
    for _ in range(repeats):
        ticks.clear()
        messages.clear()
        timer.start()
        _spin(200)
        start = time.perf_counter()
        widget.run_button.native.click()
        while widget._running or not widget.run_button.enabled:
            _spin(5)
        shown = widget.timing.get("shown")
        _spin(1000)  # first draws of the new layers
        end = time.perf_counter()
        timer.stop()
        done = widget.timing["worker_done"]
        if shown is None:
            raise RuntimeError(f"the run did not finish: {widget.status.value}")
        points = [start] + [t for t in ticks if start <= t <= end] + [end]
        gaps = sorted(((b - a, a) for a, b in zip(points, points[1:])), reverse=True)[:4]
        # the longest gaps, when they began (s after the click) and the last progress
        # message the GUI had received by then
        worst_gaps = [(round(1000 * g), round(a - start, 3),
                       ([m for t, m in messages if t <= a] or ["-"])[-1]) for g, a in gaps]
        runs.append({"compute_s": done - start, "place_s": shown - done,
                     "worst_gaps_ms_at_s_after": worst_gaps, "worker_done_s": done - start,
                     "stall_computing_ms": 1000 * _longest_gap(ticks, start, done),
                     "stall_placing_ms": 1000 * _longest_gap(ticks, done, end),
                     "layers": len(viewer.layers)})
    layer_types = sorted({type(ly).__name__ for ly in viewer.layers})
    viewer.close()
    worst = {k: float(np.max([r[k] for r in runs])) for k in
             ("stall_computing_ms", "stall_placing_ms")}
    median = {k + "_median": float(np.median([r[k] for r in runs])) for k in
              ("stall_computing_ms", "stall_placing_ms")}
    return {"runs": runs, **worst, **median, "layer_types": layer_types}


def child(args) -> None:
    out = {name: measure(CASES[name], args.repeats) for name in args.cases}
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------------------- driver
def run_version(label: str, src: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats),
           "--cases", *args.cases]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orig", help="src folder of the code to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    versions = {"current": str(ROOT / "src")}
    if args.orig:
        versions["original"] = args.orig
    results = {"load_before": os.getloadavg(), "repeats": args.repeats,
               "command": " ".join(["python", "benchmarks/bench_gui_register.py",
                                    *sys.argv[1:]])}
    for label, src in versions.items():
        results[label] = run_version(label, src, args)
    results["load_after"] = os.getloadavg()
    print(f"\nlongest GUI stall, worst of {args.repeats} runs (median in brackets), ms")
    print(f"{'case':44} {'version':9} {'computing':>16} {'placing':>16}")
    for name in args.cases:
        for label in versions:
            r = results[label][name]
            if "skipped" in r:
                print(f"{name:44} {label:9} {'(' + r['skipped'] + ')'}")
                continue
            print(f"{name:44} {label:9} "
                  f"{r['stall_computing_ms']:>7.0f} ({r['stall_computing_ms_median']:>5.0f}) "
                  f"{r['stall_placing_ms']:>7.0f} ({r['stall_placing_ms_median']:>5.0f})")
    out = HERE / "results" / "gui_register.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
