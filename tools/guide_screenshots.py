"""Screenshots for the user guide (docs/use-cases.md), from a real napari window.

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python tools/guide_screenshots.py [--out docs/images] [--only NAME ...]

Each use case is done the way a user would: the plugin's sample data (File > Open Sample),
the dock widgets opened through the plugin manifest (Plugins > Registration > ...), the
registrations run in the widgets' worker threads. Every image is a grab of the whole
window, saved as a 256-colour PNG (guide_*.png).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots import PLUGIN, close_docks, run_cases, run_worker, wait  # noqa: E402
from screenshots import shot as _grab  # noqa: E402

WINDOW = (1280, 800)  # a small laptop screen: every dock must fit it
DOCK_WIDTH = 520  # px; the rest goes to the layer list and the canvas


def shot(viewer, path: Path, *, reset: bool = True) -> None:
    """Fit the data to the canvas that the dock left, then grab the window."""
    wait(100)
    if reset:
        viewer.reset_view()
    _grab(viewer, path)


def show_only(viewer, *names) -> None:
    for layer in viewer.layers:
        layer.visible = layer.name in names


def dock(viewer, name):
    from qtpy.QtCore import Qt

    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    wait(100)
    dock_widget.setMaximumWidth(DOCK_WIDTH)  # resizeDocks alone did not shrink a wide form
    viewer.window._qt_window.resizeDocks([dock_widget], [DOCK_WIDTH], Qt.Horizontal)
    wait(50)
    return widget


def fresh(viewer) -> None:
    close_docks(viewer)
    viewer.layers.clear()
    viewer.dims.ndisplay = 2
    viewer.window.resize(*WINDOW)  # long option forms make the window taller; shrink back
    wait(50)


# ---------------------------------------------------------------------------- use cases
def sample_in_register_dock(viewer, sample: str, method: str, transform: str):
    """Open a sample pair and the Register images dock set to it: (dock, fixed, moving)."""
    viewer.open_sample(PLUGIN, sample)
    fixed, moving = viewer.layers[-2], viewer.layers[-1]
    reg = dock(viewer, "Register images")
    reg.fixed.value, reg.moving.value = fixed, moving
    reg.method.value, reg.transform.value = method, transform
    return reg, fixed, moving


def channels(viewer, out: Path) -> None:
    """1. Two-channel pair, Fourier rigid: before, then the checkerboard."""
    fresh(viewer)
    reg, fixed, moving = sample_in_register_dock(viewer, "fluorescence_pair", "fourier", "rigid")
    reg.tile.value = 64.0
    shot(viewer, out / "guide_channels_before.png")
    run_worker(reg)
    show_only(viewer, f"checkerboard: {moving.name}")
    shot(viewer, out / "guide_channels_checkerboard.png")


def drifting_stack(n: int = 24, size: int = 256, seed: int = 1):
    """A time series made from scikit-image's camera: crops after a random-walk drift."""
    from scipy import ndimage
    from skimage import data

    image = data.camera().astype(np.float32)
    drift = np.cumsum(np.random.default_rng(seed).normal(0.0, 1.2, (n, 2)), axis=0)
    drift -= drift[0]
    r0, c0 = 120, 140
    frames = np.stack([ndimage.shift(image, d, order=3)[r0:r0 + size, c0:c0 + size] for d in drift])
    return frames.astype(np.float32), drift


def volume(viewer, out: Path) -> None:
    """3. Volume pair: intensity rigid, then bspline; one plane of each checkerboard."""
    fresh(viewer)
    reg, fixed, moving = sample_in_register_dock(viewer, "volume_pair", "intensity", "rigid")
    reg.tile.value = 16.0
    run_worker(reg)
    registered = f"{moving.name} registered"
    viewer.dims.set_point(0, 48.0)
    show_only(viewer, fixed.name, registered)  # green + magenta = white where aligned
    shot(viewer, out / "guide_volume_rigid.png")
    reg.transform.value = "bspline"
    wait(100)
    run_worker(reg)
    viewer.dims.set_point(0, 30.0)
    show_only(viewer, f"checkerboard: {moving.name}")
    shot(viewer, out / "guide_volume_bspline.png")


def photo_features(viewer, out: Path) -> None:
    """4a. Photo pair, features homography: keypoints and matches as layers."""
    fresh(viewer)
    reg, fixed, moving = sample_in_register_dock(viewer, "photo_pair", "features", "homography")
    reg.show_matches.value = True  # keypoint and match layers only when asked for
    wait(100)
    run_worker(reg)
    names = [layer.name for layer in viewer.layers]
    keep = [fixed.name] + [n for n in names if "keypoints" in n or "matches" in n]
    show_only(viewer, *keep)
    wait(100)
    viewer.reset_view()
    viewer.camera.center = (0.0, 190.0, 220.0)  # the face and the badge, matches visible
    viewer.camera.zoom *= 1.8
    shot(viewer, out / "guide_photo_features.png", reset=False)


def apply_labels(viewer, out: Path) -> None:
    """5. Register the channels, save the transform, load it, apply it to labels + points."""
    fresh(viewer)
    from skimage import filters, measure

    from napari_registration import save_transform

    reg, fixed, moving = sample_in_register_dock(viewer, "fluorescence_pair", "fourier", "rigid")
    run_worker(reg)
    close_docks(viewer)
    data = np.asarray(moving.data)
    nuclei = measure.label(data > filters.threshold_otsu(data)).astype(np.uint16)
    labels = viewer.add_labels(nuclei, name="nuclei labels (moving)")
    app = dock(viewer, "Apply / save / load transform")
    app.source.value = viewer.layers[f"{moving.name} registered"]
    app.take_from_layer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "channel_offset.json"
        save_transform(app.transform, path)  # what *Save* does (without its notification)
        app.load(path)
    # spots detected on the moving channel: centroids of the larger nuclei
    props = [p for p in measure.regionprops(nuclei) if p.area > 150]
    spots = viewer.add_points(np.array([p.centroid for p in props]), name="spots (moving)",
                              size=10, face_color="yellow")
    app.reset_choices()
    app.target.value, app.reference.value = labels, fixed
    applied = app.apply()
    app.target.value = spots
    moved_spots = app.apply()
    show_only(viewer, fixed.name, applied.name, moved_spots.name)
    viewer.layers[applied.name].opacity = 0.5
    viewer.layers.selection.active = viewer.layers[applied.name]
    shot(viewer, out / "guide_apply_labels.png")


# the landmark and stack docks' pictures (guide_landmarks, guide_stack, guide_stack_reuse)
# are made by tools/dock_screenshots.py, which also checks that those docks fit the window
CASES = {"channels": channels, "volume": volume, "features": photo_features,
         "apply": apply_labels}


def main(argv=None) -> None:
    run_cases(CASES, WINDOW, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
