"""Screenshots of the landmark, stack and apply-transform docks in a 1280x800 window.

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python tools/dock_screenshots.py [--out docs/images]

Each dock is opened through the manifest (as the Plugins menu does) in a napari window
of 1280x800, the size of a small laptop screen, and used as a user would. The script
prints the window size after each dock is shown: a dock too tall for the screen would
make the window grow past 800 px (it fails then). Writes guide_landmarks.png,
guide_stack.png, guide_stack_reuse.png and apply_transform.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guide_screenshots import drifting_stack, show_only  # noqa: E402
from screenshots import PLUGIN, close_docks, run_cases, run_worker, wait  # noqa: E402
from screenshots import shot as _grab  # noqa: E402

WINDOW = (1280, 800)


def fresh(viewer) -> None:
    close_docks(viewer)
    viewer.layers.clear()
    viewer.dims.ndisplay = 2
    viewer.window._qt_window.resize(*WINDOW)
    wait(50)


def dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    wait(150)
    return widget


def shot(viewer, path: Path) -> None:
    viewer.window._qt_window.resize(*WINDOW)
    wait(150)
    viewer.reset_view()
    size = viewer.window._qt_window.size()
    print(f"{path.name}: window {size.width()}x{size.height()}")
    if size.width() > WINDOW[0] or size.height() > WINDOW[1]:
        raise SystemExit(f"{path.name}: the window grew to {size.width()}x{size.height()}: "
                         "a dock does not fit a 1280x800 screen")
    _grab(viewer, path)


def wait_until(condition, timeout=30.0) -> None:
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        wait(20)


def landmarks(viewer, out: Path) -> None:
    """Five clicked pairs on the photo pair (a perspective view): a thin-plate spline fit,
    its residual table and the live preview."""
    fresh(viewer)
    viewer.open_sample(PLUGIN, "photo_pair")
    fixed = viewer.layers["astronaut (fixed)"]
    moving = viewer.layers["astronaut perspective (moving)"]
    from napari_registration import Transform

    truth = Transform.from_dict(moving.metadata["registration_truth"])
    w = dock(viewer, "Landmark registration")
    w.fixed_layer.value, w.moving_layer.value = fixed, moving
    w.transform_choice.value = "tps"
    w.start()
    wait(100)
    rng = np.random.default_rng(3)
    moving_pts = np.array([[95.0, 230.0], [165.0, 300.0], [330.0, 120.0], [420.0, 400.0],
                           [60.0, 420.0], [250.0, 260.0]])
    fixed_pts = truth.apply(moving_pts) + rng.normal(0.0, 0.7, moving_pts.shape)  # click error
    for fp, mp in zip(fixed_pts, moving_pts):
        # what napari's "add" mode does on a click: add to the active (real) layer
        viewer.layers.selection.active.add(fp)
        wait(30)
        viewer.layers.selection.active.add(mp)
        wait(30)
    wait_until(lambda: not w.busy)
    for name in ("astronaut (fixed) landmarks", "astronaut perspective (moving) landmarks"):
        viewer.layers[name].size = 14
    moving.visible = False
    shot(viewer, out / "guide_landmarks.png")


def stack(viewer, out: Path) -> None:
    """A drifting series: the aligned stack, the drift table and plot."""
    fresh(viewer)
    frames, _ = drifting_stack()
    viewer.add_image(frames, name="drifting camera", colormap="gray")
    w = dock(viewer, "Register stack")            # the only stack: already chosen
    w._reference.value = "previous"
    run_worker(w)
    viewer.dims.set_point(0, len(frames) - 1)
    show_only(viewer, "drifting camera registered")
    shot(viewer, out / "guide_stack.png")
    # reuse: the same transforms on a labels movie that drifts with the frames
    from scipy import ndimage

    _, drift = drifting_stack()
    mask = np.zeros(frames.shape[1:], np.uint8)
    mask[100:140, 90:150] = 1
    mask[170:200, 40:80] = 2
    movie = np.stack([ndimage.shift(mask, d, order=0) for d in drift])
    labels = viewer.add_labels(movie, name="drifting labels")
    w._apply_target.reset_choices()
    w._apply_target.value = labels
    w.apply_transforms()
    w._save_file.value = Path("/tmp/drift.json")
    scroll = w.native
    scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())
    show_only(viewer, "drifting camera registered", "drifting labels aligned")
    viewer.layers["drifting labels aligned"].opacity = 0.5
    shot(viewer, out / "guide_stack_reuse.png")


def apply_transform(viewer, out: Path) -> None:
    """The Apply / save / load dock: the registration's transform on a labels layer."""
    fresh(viewer)
    from skimage import filters, measure

    viewer.open_sample(PLUGIN, "fluorescence_pair")
    fixed = viewer.layers["nuclei (fixed)"]
    moving = viewer.layers["nuclei shifted (moving)"]
    data = np.asarray(moving.data)
    nuclei = measure.label(data > filters.threshold_otsu(data)).astype(np.uint16)
    labels = viewer.add_labels(nuclei, name="nuclei labels (moving)")
    app = dock(viewer, "Apply / save / load transform")
    app.source.value = moving                      # the sample's known transform
    app.take_from_layer()
    app.target.value, app.reference.value = labels, fixed
    applied = app.apply()
    show_only(viewer, fixed.name, applied.name)
    viewer.layers[applied.name].opacity = 0.6
    shot(viewer, out / "apply_transform.png")


CASES = {"landmarks": landmarks, "stack": stack, "apply": apply_transform}


def main(argv=None) -> None:
    run_cases(CASES, WINDOW, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
