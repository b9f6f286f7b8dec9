"""Screenshots of the dock widgets for the docs, from a real napari window.

    xvfb-run -a .venv/bin/python tools/screenshots.py [--out docs/images]

Loads the plugin's sample data, runs each widget the way a user would (through the
Plugins menu entries of the manifest, registrations in a worker thread) and saves
window grabs to docs/images/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

PLUGIN = "napari-registration"


def wait(ms: int = 50) -> None:
    """Let Qt draw (dock widgets appear in a grab only after the event loop ran)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def run_worker(widget) -> None:
    """Start the widget's registration and spin the event loop until it finished."""
    from qtpy.QtCore import QEventLoop

    worker = widget.make_worker()
    if worker is None:
        raise RuntimeError("the widget refused to start; see the notification")
    loop = QEventLoop()
    worker.finished.connect(loop.quit)
    worker.start()
    loop.exec()
    while getattr(widget, "_placing", False):  # result layers go in one per event-loop turn
        wait(20)
    wait(200)


def shot(viewer, path: Path) -> None:
    """Grab the whole window; stored as a 256-colour PNG (a fifth of the size, and the
    UI's flat colours survive it)."""
    from PIL import Image

    wait(300)
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(np.asarray(rgba)[..., :3])
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print("wrote", path, f"{path.stat().st_size // 1024} kB")


def close_docks(viewer) -> None:
    viewer.window.remove_dock_widget("all")
    wait(50)


def run_cases(cases: dict, window: tuple, description: str, argv=None) -> None:
    """The command line of the screenshot scripts: ``--out`` folder and ``--only`` cases;
    each case is ``case(viewer, out)`` in one napari window of ``window`` size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    parser.add_argument("--only", nargs="*", choices=sorted(cases), default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari

    viewer = napari.Viewer(show=True, title="napari-registration")
    viewer.window._qt_window.resize(*window)
    wait(200)
    for name in args.only or cases:
        cases[name](viewer, out)
    viewer.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari

    viewer = napari.Viewer(show=True, title="napari-registration")
    viewer.window.resize(1280, 800)  # a laptop screen: every dock must fit it

    # 1. Register images: the two-channel pair, with the preset for it (fourier rigid)
    viewer.open_sample(PLUGIN, "fluorescence_pair")
    fixed, moving = viewer.layers["nuclei (fixed)"], viewer.layers["nuclei shifted (moving)"]
    _, reg = viewer.window.add_plugin_dock_widget(PLUGIN, "Register images")
    reg.fixed.value, reg.moving.value = fixed, moving
    reg.preset.value = "two channels / same sample"
    reg.tile.value = 64.0
    reg.difference.value = True
    shot(viewer, out / "register_before.png")  # green/magenta overlay: out of line
    # the intensity method's form: basic options, then "Advanced" unfolded
    reg.method.value = "intensity"
    reg.method_options.advanced_section.collapsible.expand(animate=False)
    shot(viewer, out / "register_advanced.png")
    reg.preset.value = "two channels / same sample"
    run_worker(reg)
    moving.visible = False
    viewer.layers[f"difference: {moving.name}"].visible = False
    viewer.layers[f"checkerboard: {moving.name}"].visible = True
    shot(viewer, out / "register_checkerboard.png")
    viewer.layers[f"checkerboard: {moving.name}"].visible = False
    shot(viewer, out / "register_overlay.png")  # fixed green + registered magenta

    # 2. Inspect alignment: the unregistered pair, then the registered one
    close_docks(viewer)
    _, insp = viewer.window.add_plugin_dock_widget(PLUGIN, "Inspect alignment")
    insp.first.value, insp.second.value = fixed, moving
    insp.difference.value = False
    insp.compute()
    insp.tile.value = 32.0
    for layer in viewer.layers:
        layer.visible = layer.name.startswith("checkerboard: nuclei (fixed)")
    shot(viewer, out / "inspect_before.png")

    # 3. Apply / save / load transform: the registration's transform on a labels layer
    close_docks(viewer)
    from skimage import filters, measure

    data = np.asarray(moving.data)
    nuclei = measure.label(data > filters.threshold_otsu(data)).astype(np.uint16)
    labels = viewer.add_labels(nuclei, name="nuclei labels (moving)")
    _, app = viewer.window.add_plugin_dock_widget(PLUGIN, "Apply / save / load transform")
    app.source.value = viewer.layers[f"{moving.name} registered"]
    app.take_from_layer()
    app.target.value, app.reference.value = labels, fixed
    applied = app.apply()
    for layer in viewer.layers:
        layer.visible = layer.name in (fixed.name, applied.name)
    viewer.layers[applied.name].opacity = 0.6
    shot(viewer, out / "apply_transform.png")

    # 4. 3D: the anisotropic volume pair
    close_docks(viewer)
    viewer.layers.clear()
    viewer.open_sample(PLUGIN, "volume_pair")
    _, reg3 = viewer.window.add_plugin_dock_widget(PLUGIN, "Register images")
    reg3.fixed.value, reg3.moving.value = viewer.layers["volume (fixed)"], viewer.layers["volume moved (moving)"]
    from napari_registration import available_methods

    if "intensity" in available_methods():
        reg3.preset.value = "CT/MR volumes (same modality)"
    else:
        reg3.method.value, reg3.transform.value = "fourier", "translation"
    run_worker(reg3)
    viewer.layers["volume moved (moving)"].visible = False
    viewer.dims.set_point(0, 48.0)
    shot(viewer, out / "register_3d_checkerboard.png")
    viewer.close()


if __name__ == "__main__":
    main()
