"""Dock widget: align the frames of a stack layer (time series or z-stack).

Thin by design: it reads the layer (data, scale, translate), runs
:func:`~napari_registration.core.stack.iter_register_stack` in a napari thread worker
(the generator yields once per frame; widgets and layers change only in the
``yielded``/``returned`` handlers, on the main thread), and pushes the corrected stack
back as a new layer with the transforms in ``metadata["registration"]`` and the drift
per frame in a table and a small plot (shift per axis, rotation, NCC after).

The per-frame transforms are reusable: *Apply to* resamples another layer of the same
series with them (an image channel: linear; labels: nearest neighbour; Points/Shapes
with a frame column: moved by the transform of their frame), and *Save* / *Load* write
and read them as one JSON file (:mod:`napari_registration.core.series`).

Removing the stack layer while it is being registered cancels the run: the status says
so and no output layer is made. The dock opens with the stack chosen when exactly one
suitable layer is loaded; our own output layers are never the default input.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    EmptyWidget,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from qtpy.QtCore import QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from ..core.register import RegistrationCancelled, available_methods, method_info
from ..core.series import (
    TransformSeries,
    apply_stack_transforms,
    load_transforms,
    map_stack_points,
    map_stack_shapes,
    save_transforms,
)
from ..core.stack import iter_register_stack
from ._common import OUTPUT_KEY, SETTLE_MS, same_layer
from ._dock import ScrollableDock

REFERENCE_CHOICES = ("first", "previous", "mean", "frame")
_OWN_KEYS = (OUTPUT_KEY, "napari_registration_landmarks")


def _is_ours(layer) -> bool:
    meta = getattr(layer, "metadata", None) or {}
    return any(key in meta for key in _OWN_KEYS)


def _is_stack(layer) -> bool:
    """An image with a frame axis: 3+ axes besides an RGB colour axis."""
    data = layer.data[0] if layer.multiscale else layer.data
    return data.ndim - (1 if layer.rgb else 0) >= 3


def frame_rotation(transform) -> float:
    """Rotation angle (degrees) of a linear transform's rotation part; NaN when the
    transform is deformable. 2D: signed (row, col) angle; 3D: the axis-angle magnitude."""
    if not transform.is_linear:
        return float("nan")
    a = np.asarray(transform.matrix, float)[:-1, :-1]
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    if r.shape == (2, 2):
        return float(np.degrees(np.arctan2(r[1, 0], r[0, 0])))
    if r.shape == (3, 3):
        return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
    return float("nan")


class DriftPlot(QWidget):
    """A light per-frame plot (QPainter, no plotting library): shift per axis (world
    units), rotation (degrees) and NCC after registration, one panel each."""

    COLOURS = ("#ff6ec7", "#4fc3f7", "#ffd54f", "#aed581")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(180)
        self.panels: list[tuple[str, list[tuple[str, np.ndarray]]]] = []

    def set_data(self, table: dict) -> None:
        """From :meth:`StackRegistrationWidget.drift_table` columns."""
        shifts = [(k.replace("drift ", ""), np.asarray(v, float)) for k, v in table.items()
                  if k.startswith("drift ")]
        panels = [("shift", shifts)] if shifts else []
        rot = np.asarray([np.nan if v is None else v for v in table.get("rotation", [])], float)
        if rot.size and np.any(np.isfinite(rot)) and np.nanmax(np.abs(rot)) > 0:
            panels.append(("rotation (deg)", [("rotation", rot)]))
        ncc = np.asarray([np.nan if v is None else v for v in table.get("ncc after", [])], float)
        if ncc.size and np.any(np.isfinite(ncc)):
            panels.append(("NCC after", [("ncc", ncc)]))
        self.panels = panels
        self.update()

    def paintEvent(self, event):  # noqa: N802 (Qt name)
        painter = QPainter(self)
        try:
            painter.setRenderHint(QPainter.RenderHint.Antialiasing)
            painter.fillRect(self.rect(), QColor("#262930"))
            if not self.panels:
                painter.setPen(QColor("#a0a0a0"))
                painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter,
                                 "drift plot: register a stack")
                return
            h = self.height() / len(self.panels)
            left, right = 46.0, self.width() - 8.0
            for p, (title, series) in enumerate(self.panels):
                top, bottom = p * h + 14.0, (p + 1) * h - 6.0
                values = np.concatenate([s for _, s in series])
                values = values[np.isfinite(values)]
                lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
                if hi - lo < 1e-9:
                    lo, hi = lo - 0.5, hi + 0.5
                painter.setPen(QColor("#5a5f6a"))
                painter.drawRect(int(left), int(top), int(right - left), int(bottom - top))
                painter.setPen(QColor("#d0d0d0"))
                painter.drawText(int(left), int(top - 3), title)
                if len(series) > 1:  # a legend in the lines' colours
                    x = left + painter.fontMetrics().horizontalAdvance(title) + 12
                    for k, (name, _) in enumerate(series):
                        painter.setPen(QColor(self.COLOURS[k % len(self.COLOURS)]))
                        painter.drawText(int(x), int(top - 3), name)
                        x += painter.fontMetrics().horizontalAdvance(name) + 10
                painter.setPen(QColor("#d0d0d0"))
                painter.drawText(2, int(top + 10), f"{hi:.3g}")
                painter.drawText(2, int(bottom), f"{lo:.3g}")
                for k, (name, ys) in enumerate(series):
                    n = len(ys)
                    pen = QPen(QColor(self.COLOURS[k % len(self.COLOURS)]))
                    pen.setWidthF(1.5)
                    painter.setPen(pen)
                    line = QPolygonF()
                    for i, y in enumerate(ys):
                        if not np.isfinite(y):
                            continue
                        x = left + (right - left) * (i / max(n - 1, 1))
                        line.append(QPointF(x, bottom - (bottom - top) * (y - lo) / (hi - lo)))
                    painter.drawPolyline(line)
        finally:
            painter.end()


class StackWorkerError(Exception):
    """A registration error raised in the worker, re-raised as a plain Exception."""


def _run(data, **kwargs):
    """The worker's generator: yields progress events, returns the StackResult (None
    when cancelled)."""
    try:
        return (yield from iter_register_stack(data, **kwargs))
    except RegistrationCancelled:
        return None
    except RuntimeError as err:
        # superqt's GeneratorWorker takes a RuntimeError from the generator for a deleted
        # worker and emits neither errored nor finished (e.g. one from ITK or OpenCV)
        raise StackWorkerError(str(err)) from err


class StackRegistrationWidget(ScrollableDock):
    """Register every frame of an image layer to a reference frame."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._cancel = threading.Event()
        self._cancel_reason = None
        self.worker = None
        self.result = None
        self.output_layer = None
        self.series: TransformSeries | None = None  # the transforms to reuse
        self._source = None
        self.apply_worker = None

        self._layer = ComboBox(label="stack", choices=self._image_layers, nullable=True)
        self._axis = SpinBox(label="frame axis", value=0, min=0, max=5)
        self._reference = ComboBox(label="reference", choices=REFERENCE_CHOICES, value="first")
        self._reference_frame = SpinBox(label="reference frame", value=0, min=0, max=100000,
                                        visible=False)
        methods = available_methods()
        self._method = ComboBox(label="method", choices=methods,
                                value="fourier" if "fourier" in methods else methods[0])
        self._transform = ComboBox(label="transform", choices=self._transforms)
        self._channels = CheckBox(label="has channels", value=False)
        self._channel_axis = SpinBox(label="channel axis", value=1, min=0, max=5, visible=False)
        self._driver = SpinBox(label="driver channel", value=0, min=0, max=64, visible=False)
        self._downsample = SpinBox(label="downsample", value=1, min=1, max=32,
                                   tooltip="register on a copy reduced by this factor, "
                                           "warp at full resolution")
        self._level = SpinBox(label="pyramid level", value=1, min=0, max=16, visible=False,
                              tooltip="multiscale layers: register this level, warp level 0")
        self._run_button = PushButton(text="Register stack")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", value=0, min=0, max=100)
        self._status = Label(label="", value="")
        self._status.native.setWordWrap(True)
        self._table = Table(label="drift per frame", value={"frame": []})
        self._table.native.setMinimumHeight(100)
        self._table.native.setMaximumHeight(200)
        self.plot = DriftPlot()
        self._plot_holder = EmptyWidget(label="drift plot")
        holder_layout = self._plot_holder.native.layout()
        if holder_layout is None:
            holder_layout = QVBoxLayout(self._plot_holder.native)
        holder_layout.setContentsMargins(0, 0, 0, 0)
        holder_layout.addWidget(self.plot)
        # reuse the per-frame transforms
        self._apply_target = ComboBox(label="apply to", choices=self._target_layers,
                                      nullable=True, tooltip=(
                                          "another channel (image), a labels movie (nearest "
                                          "neighbour), or Points/Shapes with a frame column"))
        self._apply_button = PushButton(text="Apply transforms", enabled=False)
        self._save_file = FileEdit(label="save as", mode="w", filter="*.json")
        self._save_button = PushButton(text="Save transforms", enabled=False)
        self._load_file = FileEdit(label="load", mode="r", filter="*.json")
        self._load_button = PushButton(text="Load transforms")
        self._series_label = Label(label="transforms", value="(none yet)")
        self._series_label.native.setWordWrap(True)
        # a wrapped label otherwise asks for its whole one-line width: the form grew wider
        # than the dock and was clipped on the right
        for label in (self._series_label, self._status):
            label.native.setSizePolicy(QSizePolicy.Policy.Ignored,
                                       QSizePolicy.Policy.Preferred)
        self.extend([self._layer, self._axis, self._reference, self._reference_frame,
                     self._method, self._transform, self._channels, self._channel_axis,
                     self._driver, self._downsample, self._level, self._run_button, self._cancel_button,
                     self._progress, self._status, self._table, self._plot_holder,
                     self._series_label, self._apply_target,
                     self._apply_button, self._save_file, self._save_button, self._load_file,
                     self._load_button])

        self._reference.changed.connect(self._on_reference)
        self._method.changed.connect(lambda _: self._transform.reset_choices())
        self._channels.changed.connect(self._on_channels)
        self._run_button.clicked.connect(self._start)
        self._cancel_button.clicked.connect(self.cancel)
        self._layer.changed.connect(self._on_layer)
        self._apply_button.clicked.connect(lambda *_: self._guard(self._apply_clicked))
        self._save_button.clicked.connect(lambda *_: self._guard(self.save_transforms))
        self._load_button.clicked.connect(lambda *_: self._guard(self.load_transforms))
        events = napari_viewer.layers.events
        events.inserted.connect(self._refresh)
        events.removed.connect(self._on_removed)
        self._refresh()
        self._on_layer(self._layer.value)

    # ------------------------------------------------------------------ choices
    def _image_layers(self, _widget=None):
        from napari.layers import Image

        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def _target_layers(self, _widget=None):
        from napari.layers import Image, Labels, Points, Shapes

        return [(layer.name, layer) for layer in reversed(list(self._viewer.layers))
                if isinstance(layer, (Image, Labels, Points, Shapes))]

    def default_layer(self):
        """The stack to preselect: the only suitable image (a frame axis, not one of our
        outputs), else the selected layer if it is one; None otherwise."""
        candidates = [ly for ly in self._image_layers() if _is_stack(ly) and not _is_ours(ly)]
        if len(candidates) == 1:
            return candidates[0]
        active = self._viewer.layers.selection.active
        return next((ly for ly in candidates if same_layer(ly, active)), None)

    def _transforms(self, _widget=None):
        method = getattr(self, "_method", None)
        name = method.value if method is not None else "fourier"
        return list(method_info(name)["transforms"])

    def _refresh(self, _event=None):
        self._layer.reset_choices()
        self._apply_target.reset_choices()
        if self._layer.value is None:
            default = self.default_layer()
            if default is not None:
                self._layer.value = default

    def _on_removed(self, event=None):
        try:
            self._removed(getattr(event, "value", None))
        except RuntimeError:  # the dock's Qt widgets were deleted (dock closed)
            pass

    def _removed(self, removed):
        running = self.worker is not None and not self._cancel.is_set()
        if running and same_layer(removed, self._source):
            # cancel at once (no output layer); the words wait for the layer list
            self._cancel_reason = (f"cancelled: the stack layer {removed.name!r} was removed "
                                   "during the run; no output layer was made")
            self._cancel.set()
            self.worker.quit()
        QTimer.singleShot(SETTLE_MS, self._after_removal)

    def _after_removal(self):
        try:
            self._refresh()
            if self._cancel_reason:
                self._status.value = self._cancel_reason
        except RuntimeError:  # the dock was closed meanwhile
            pass

    def _on_reference(self, value):
        self._reference_frame.visible = value == "frame"

    def _on_channels(self, value):
        self._channel_axis.visible = bool(value)
        self._driver.visible = bool(value)

    def _on_layer(self, layer):
        if layer is None:
            return
        ndim = layer.data[0].ndim if layer.multiscale else layer.data.ndim
        self._level.visible = bool(layer.multiscale)
        if layer.multiscale:
            self._level.max = len(layer.data) - 1
        self._axis.max = max(0, ndim - 1)
        self._channel_axis.max = max(0, ndim - 1)
        if getattr(layer, "rgb", False):  # colour frames: drive with green, carry all three
            self._channels.value = True
            self._channel_axis.value = ndim - 1
            self._driver.value = 1

    # ---------------------------------------------------------------------- run
    def settings(self) -> dict:
        """The keyword arguments for iter_register_stack, from the form."""
        layer = self._layer.value
        if layer is None:
            raise ValueError("choose an image layer with a time (or z) axis")
        reference = self._reference.value
        if reference == "frame":
            reference = int(self._reference_frame.value)
        data = layer.data[0] if layer.multiscale else layer.data
        coarse = None
        if layer.multiscale and int(self._level.value) > 0:
            coarse = layer.data[min(int(self._level.value), len(layer.data) - 1)]
        return dict(
            coarse=coarse,
            data=data, axis=int(self._axis.value), reference=reference,
            method=self._method.value, transform=self._transform.value,
            # napari's scale has no entry for an RGB layer's colour axis
            spacing=tuple(float(s) for s in layer.scale) + ((1.0,) if layer.rgb else ()),
            channel_axis=int(self._channel_axis.value) if self._channels.value else None,
            driver_channel=int(self._driver.value), downsample=int(self._downsample.value),
            cancel=self._cancel.is_set,
        )

    def make_worker(self):
        """An unstarted napari worker with the handlers connected (tests start it
        inside ``qtbot.waitSignal(worker.finished)``)."""
        from napari.qt.threading import create_worker

        kwargs = self.settings()
        self._source = self._layer.value
        self._cancel.clear()
        self._cancel_reason = None
        # errors are shown in the widget's status line (not re-raised as a traceback)
        worker = create_worker(_run, _start_thread=False, _ignore_errors=True, **kwargs)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._run_button.enabled = False
        self._cancel_button.enabled = True
        self._progress.value = 0
        self._status.value = "starting"
        self.worker = worker
        return worker

    def _start(self, _=None):
        try:
            self.make_worker().start()
        except ValueError as err:
            self._status.value = str(err)

    def cancel(self, _=None):
        self._cancel.set()
        if self.worker is not None:
            self.worker.quit()
        self._status.value = "cancelling..."

    # ------------------------------------------------------- main-thread handlers
    def _on_yielded(self, event):
        self._progress.value = int(round(100 * float(event["fraction"])))
        self._status.value = str(event["message"])

    def _on_returned(self, result):
        if result is None or self._cancel.is_set():  # cancelled: make nothing
            return
        source = self._source
        if source is None or not any(same_layer(source, ly) for ly in self._viewer.layers):
            return  # the input went away as the run finished
        self.result = result
        name = f"{source.name} registered"
        meta = {"registration": result.to_dict(), OUTPUT_KEY: "stack registered"}
        kwargs = dict(name=name, scale=source.scale, translate=source.translate,
                      metadata=meta, colormap=source.colormap.name,
                      contrast_limits=source.contrast_limits, blending=source.blending)
        old = [ly for ly in self._viewer.layers if ly.name == name and _is_ours(ly)]
        if old:
            layer = old[0]
            layer.data = result.warped
            layer.metadata.update(meta)
        else:
            layer = self._viewer.add_image(result.warped, **kwargs)
        self.output_layer = layer
        table = self.drift_table(result)
        self._table.value = table
        self.plot.set_data(table)
        self.set_series(TransformSeries(tuple(result.transforms), result.axis,
                                        tuple(result.spacing)), f"from {source.name!r}")
        failed = result.info.get("failed", 0)
        self._progress.value = 100
        self._status.value = (f"{len(result.transforms)} frames in {result.info['seconds']:.1f} s"
                              + (f"; {failed} failed" if failed else ""))

    def _on_errored(self, err):
        if self._cancel.is_set():
            return
        self._status.value = f"error: {err}"

    def _on_finished(self):
        self._run_button.enabled = True
        self._cancel_button.enabled = False
        self.worker = None
        if self._cancel.is_set():
            self._progress.value = 0
            self._status.value = self._cancel_reason or "cancelled; no output layer was made"

    @staticmethod
    def drift_table(result) -> dict:
        """Columns for the drift table: frame, drift per axis (world units), NCC after."""
        drift = result.drift
        names = ["plane", "row", "col"][-drift.shape[1]:] if drift.shape[1] <= 3 else \
            [f"axis {k}" for k in range(drift.shape[1])]
        table = {"frame": list(range(len(drift)))}
        for k, name in enumerate(names):
            table[f"drift {name}"] = [round(float(v), 3) for v in drift[:, k]]
        rotation = [frame_rotation(t) for t in result.transforms]
        if any(np.isfinite(r) and abs(r) > 1e-9 for r in rotation):
            table["rotation"] = [None if not np.isfinite(r) else round(r, 3) for r in rotation]
        ncc = []
        for fi in result.info["frames"]:
            value = fi.get("ncc_after")
            if value is None:
                value = ((fi.get("metrics") or {}).get("after") or {}).get("ncc")
            ncc.append(None if value is None else round(float(value), 3))
        table["ncc after"] = ncc
        return table


    # ------------------------------------------------------------- reuse transforms
    def _guard(self, action):
        try:
            return action()
        except (ValueError, OSError) as err:
            self._status.value = str(err)
            return None

    def set_series(self, series: TransformSeries, origin: str) -> None:
        self.series = series
        sp = "" if series.spacing is None else f", spacing {list(series.spacing)}"
        self._series_label.value = (f"{len(series)} per-frame {series.ndim}D transforms "
                                    f"{origin} (frame axis {series.frame_axis}{sp})")
        self._apply_button.enabled = True
        self._save_button.enabled = True

    def _need_series(self) -> TransformSeries:
        if self.series is None:
            raise ValueError("no per-frame transforms yet: register a stack or load a "
                             "transforms file first")
        return self.series

    def save_transforms(self, path=None) -> Path:
        """Write the current per-frame transforms to one JSON file."""
        series = self._need_series()
        path = Path(path if path is not None else self._save_file.value)
        if path.is_dir() or path.suffix.lower() != ".json":
            raise ValueError(f"give a file name ending in .json (got {str(path)!r})")
        out = save_transforms(path, series)
        self._status.value = f"saved {len(series)} transforms to {out}"
        return out

    def load_transforms(self, path=None) -> TransformSeries:
        """Read per-frame transforms from a JSON file (save_transforms or this dock)."""
        path = Path(path if path is not None else self._load_file.value)
        if not path.is_file():
            raise ValueError(f"no transforms file at {str(path)!r}: pick the .json file "
                             "written by 'Save transforms'")
        series = load_transforms(path)
        self.set_series(series, f"from {path.name}")
        self._status.value = f"loaded {len(series)} transforms from {path.name}"
        return series

    def _apply_plan(self, target):
        """What applying the transforms to ``target`` needs: (layer, series, spacing)."""
        from napari.layers import Image, Labels, Points, Shapes

        series = self._need_series()
        layer = target if target is not None else self._apply_target.value
        if layer is None:
            raise ValueError("pick a layer to apply the transforms to")
        if not isinstance(layer, (Image, Labels, Points, Shapes)):
            raise ValueError(f"{layer.name!r} is a {type(layer).__name__} layer: apply the "
                             "transforms to an Image, Labels, Points or Shapes layer")
        if isinstance(layer, (Points, Shapes)) and layer.ndim != series.ndim + 1:
            raise ValueError(f"{layer.name!r} has {layer.ndim} axes; the transforms need "
                             f"a frame axis and {series.ndim} spatial axes")
        scale = np.asarray(layer.scale, float)
        spacing = tuple(float(v) for k, v in enumerate(scale) if k != series.frame_axis)
        return layer, series, spacing

    @staticmethod
    def _warp_layer_data(layer, series, spacing):
        """The aligned data of an Image/Labels layer (runs in a worker for the button)."""
        from napari.layers import Labels

        data = layer.data[0] if layer.multiscale else layer.data
        return apply_stack_transforms(data, series, spacing=spacing,
                                      labels=isinstance(layer, Labels),
                                      rgb=bool(getattr(layer, "rgb", False)))

    def _put_applied(self, layer, series, spacing, data=None):
        """Add ``<name> aligned`` (replacing an earlier one of ours); ``data`` is the
        warped image/labels, None for Points/Shapes (mapped here: it is quick)."""
        from napari.layers import Labels, Points, Shapes

        name = f"{layer.name} aligned"
        meta = {OUTPUT_KEY: "stack transforms applied",
                "registration_applied": {"source": layer.name, "series": series.to_dict()}}
        for old in [ly for ly in self._viewer.layers if ly.name == name and _is_ours(ly)]:
            self._viewer.layers.remove(old)
        common = dict(name=name, scale=layer.scale, translate=layer.translate, metadata=meta)
        if isinstance(layer, Points):
            mapped = map_stack_points(layer.data, series, spacing=spacing) if len(layer.data) \
                else np.asarray(layer.data)
            out = self._viewer.add_points(mapped, size=layer.size, face_color=layer.face_color,
                                          **common)
        elif isinstance(layer, Shapes):
            out = self._viewer.add_shapes(map_stack_shapes(layer.data, series, spacing=spacing),
                                          shape_type=list(layer.shape_type),
                                          edge_color=layer.edge_color,
                                          face_color=layer.face_color, **common)
        elif isinstance(layer, Labels):
            out = self._viewer.add_labels(data, **common)
        else:
            rgb = bool(getattr(layer, "rgb", False))
            out = self._viewer.add_image(data, rgb=rgb, blending=layer.blending,
                                         colormap=None if rgb else layer.colormap.name,
                                         contrast_limits=layer.contrast_limits, **common)
        note = ""
        if series.spacing is not None and not np.allclose(series.spacing, spacing):
            note = (f" (the transforms were measured at spacing {list(series.spacing)}; "
                    f"{layer.name!r} has {list(spacing)}: used the layer's, as napari shows it)")
        self._status.value = f"applied {len(series)} transforms to {layer.name!r} -> {name!r}{note}"
        return out

    def apply_transforms(self, target=None):
        """Apply the per-frame transforms to ``target`` (default: the 'apply to' layer),
        here and now: a new layer ``<name> aligned``; the target is left as it was."""
        from napari.layers import Points, Shapes

        layer, series, spacing = self._apply_plan(target)
        data = None
        if not isinstance(layer, (Points, Shapes)):
            data = self._warp_layer_data(layer, series, spacing)
        return self._put_applied(layer, series, spacing, data)

    def make_apply_worker(self, target=None):
        """An unstarted worker that resamples an Image/Labels layer with the transforms
        off the GUI thread; its result is added as a layer unless the target was removed
        meanwhile (what the *Apply transforms* button runs for images and labels)."""
        from napari.qt.threading import create_worker

        layer, series, spacing = self._apply_plan(target)
        worker = create_worker(self._warp_layer_data, layer, series, spacing,
                               _start_thread=False, _ignore_errors=True)

        def done(data):
            if not any(same_layer(layer, ly) for ly in self._viewer.layers):
                self._status.value = (f"{layer.name!r} was removed while the transforms were "
                                      "applied: no layer was made")
                return
            self._put_applied(layer, series, spacing, data)

        worker.returned.connect(done)
        worker.errored.connect(lambda err: setattr(self._status, "value", f"error: {err}"))
        worker.finished.connect(lambda: setattr(self._apply_button, "enabled", True))
        self.apply_worker = worker
        return worker

    def _apply_clicked(self):
        from napari.layers import Points, Shapes

        layer = self._apply_target.value
        if isinstance(layer, (Points, Shapes)):
            return self.apply_transforms(layer)
        worker = self.make_apply_worker(layer)
        self._apply_button.enabled = False
        self._status.value = f"applying {len(self.series)} transforms to {layer.name!r}..."
        worker.start()
        return worker


__all__ = ["StackRegistrationWidget", "DriftPlot"]
