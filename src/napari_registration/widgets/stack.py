"""Dock widget: align the frames of a stack layer (time series or z-stack).

Thin by design: it reads the layer (data, scale, translate), runs
:func:`~napari_registration.core.stack.iter_register_stack` in a napari thread worker
(the generator yields once per frame; widgets and layers change only in the
``yielded``/``returned`` handlers, on the main thread), and pushes the corrected stack
back as a new layer with the transforms in ``metadata["registration"]`` and the drift
per frame in a table.
"""

from __future__ import annotations

import threading

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)

from ..core.register import RegistrationCancelled, available_methods, method_info
from ..core.stack import iter_register_stack

REFERENCE_CHOICES = ("first", "previous", "mean", "frame")


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


class StackRegistrationWidget(Container):
    """Register every frame of an image layer to a reference frame."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._cancel = threading.Event()
        self.worker = None
        self.result = None
        self.output_layer = None

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
        self._table = Table(label="drift per frame", value={"frame": []})
        self.extend([self._layer, self._axis, self._reference, self._reference_frame,
                     self._method, self._transform, self._channels, self._channel_axis,
                     self._driver, self._downsample, self._level, self._run_button, self._cancel_button,
                     self._progress, self._status, self._table])

        self._reference.changed.connect(self._on_reference)
        self._method.changed.connect(lambda _: self._transform.reset_choices())
        self._channels.changed.connect(self._on_channels)
        self._run_button.clicked.connect(self._start)
        self._cancel_button.clicked.connect(self.cancel)
        self._layer.changed.connect(self._on_layer)
        events = napari_viewer.layers.events
        events.inserted.connect(self._refresh)
        events.removed.connect(self._refresh)
        self._on_layer(self._layer.value)

    # ------------------------------------------------------------------ choices
    def _image_layers(self, _widget=None):
        from napari.layers import Image

        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def _transforms(self, _widget=None):
        method = getattr(self, "_method", None)
        name = method.value if method is not None else "fourier"
        return list(method_info(name)["transforms"])

    def _refresh(self, _event=None):
        self._layer.reset_choices()
        choices = [c for c in self._layer.choices if c is not None]
        if self._layer.value is None and choices:
            self._layer.value = choices[-1]

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
        if result is None:  # cancelled
            return
        self.result = result
        source = self._source
        name = f"{source.name} registered"
        meta = {"registration": result.to_dict()}
        kwargs = dict(name=name, scale=source.scale, translate=source.translate,
                      metadata=meta, colormap=source.colormap.name,
                      contrast_limits=source.contrast_limits, blending=source.blending)
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            layer.data = result.warped
            layer.metadata.update(meta)
        else:
            layer = self._viewer.add_image(result.warped, **kwargs)
        self.output_layer = layer
        self._table.value = self.drift_table(result)
        failed = result.info.get("failed", 0)
        self._progress.value = 100
        self._status.value = (f"{len(result.transforms)} frames in {result.info['seconds']:.1f} s"
                              + (f"; {failed} failed" if failed else ""))

    def _on_errored(self, err):
        self._status.value = f"error: {err}"

    def _on_finished(self):
        self._run_button.enabled = True
        self._cancel_button.enabled = False
        if self._cancel.is_set() and self.result is None:
            self._status.value = "cancelled"

    @staticmethod
    def drift_table(result) -> dict:
        """Columns for the drift table: frame, drift per axis (world units), NCC after."""
        drift = result.drift
        names = ["plane", "row", "col"][-drift.shape[1]:] if drift.shape[1] <= 3 else \
            [f"axis {k}" for k in range(drift.shape[1])]
        table = {"frame": list(range(len(drift)))}
        for k, name in enumerate(names):
            table[f"drift {name}"] = [round(float(v), 3) for v in drift[:, k]]
        ncc = []
        for fi in result.info["frames"]:
            value = fi.get("ncc_after")
            if value is None:
                value = ((fi.get("metrics") or {}).get("after") or {}).get("ncc")
            ncc.append(None if value is None else round(float(value), 3))
        table["ncc after"] = ncc
        return table


__all__ = ["StackRegistrationWidget"]
