"""*Landmark registration* dock widget: click matching points, see the fit live.

Two Points layers, ``<fixed> landmarks`` and ``<moving> landmarks``, hold the pairs
(paired by index, in world coordinates: the Points layers keep napari's identity
transform, so ``layer.data`` *is* world). Clicks alternate between the two layers like
BigWarp: after a point is added to one, the other becomes the active layer (and, if
"show one image at a time" is on, its image is the one shown). Deleting a point deletes
its partner too; a point still waiting for its partner is left out of the fit (the
status line says so).

Every change (add, move, delete) asks for a refit. The fit (with its leave-one-out
errors) and, for the thin-plate spline, the resampled preview are computed in a worker
thread once clicking pauses for ``DEBOUNCE_MS``; only the result of the latest request
is applied, so fast clicking never queues up work on the GUI thread. The fit updates the
per-pair residual table and the ``<moving> landmarks preview`` layer: the moving image
shown through the fitted transform (``layer.affine`` for linear fits, resampled onto the
fixed grid for the thin-plate spline). :attr:`LandmarkWidget.busy` tells whether a
refit is still pending.

"Refine with intensities" (when the intensity method is installed) starts SimpleITK
registration from the landmark fit, in a worker thread. Removing the fixed or moving
image while it runs cancels it; no output layer is made.

The dock works the same when napari hands it proxies of the viewer and its layers (as
the Plugins menu does): layers are compared by the objects underneath, never with
``is`` on what napari handed over.
"""

from __future__ import annotations

import threading

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Label, PushButton, Table

from ..backends.landmarks import TRANSFORMS, fit_landmarks, min_points
from ..core.transform import Transform
from ._common import OUTPUT_KEY as _OUTPUT_KEY, SETTLE_MS, placement, same_layer
from ._dock import ScrollableDock

FIXED_COLOUR = "magenta"
MOVING_COLOUR = "lime"
_ROLE_KEY = "napari_registration_landmarks"
PREVIEW_SIDE = 512  # thin-plate spline previews are resampled at most this size per axis
PREVIEW_NODES = {2: 48, 3: 20}  # ... through the spline evaluated on this many nodes per axis
DEBOUNCE_MS = 150  # a refit starts once clicks pause this long


def _image_layers(viewer):
    import napari.layers as nl

    return [layer for layer in reversed(list(viewer.layers)) if isinstance(layer, nl.Image)]


def _geometry(layer):
    return tuple(float(v) for v in layer.scale), tuple(float(v) for v in layer.translate)


def _tps_preview(moving_data, transform, *, fixed_shape, fixed_spacing, fixed_origin,
                 moving_spacing, moving_origin, rgb):
    """The moving image resampled through ``transform`` at most PREVIEW_SIDE pixels per
    axis (and PREVIEW_SIDE^2 in all) over the fixed extent: (data, spacing, origin). Runs
    in the fit worker.

    A preview, made fast: the spline's inverse (Newton iterations per point) is evaluated
    on a coarse lattice of at most PREVIEW_NODES nodes per axis, and the source positions
    in between are interpolated linearly (a thin-plate spline is smooth; the full
    transform is what gets saved, refined and applied)."""
    from scipy import ndimage

    shape = np.asarray(fixed_shape)
    # at most PREVIEW_SIDE per axis and PREVIEW_SIDE^2 pixels in all (3D: ~64^3 voxels)
    factor = max(1.0, float(shape.max()) / PREVIEW_SIDE,
                 (float(np.prod(shape, dtype=float)) / PREVIEW_SIDE ** 2) ** (1.0 / len(shape)))
    out_shape = tuple(int(v) for v in np.maximum(1, np.ceil(shape / factor)))
    out_sp = np.asarray(fixed_spacing) * shape / np.asarray(out_shape)
    out_or = np.asarray(fixed_origin) + (out_sp - np.asarray(fixed_spacing)) / 2  # same extent
    per_axis = PREVIEW_NODES.get(len(out_shape), 12)
    nodes = tuple(min(n, per_axis) for n in out_shape)
    axes = [np.linspace(0.0, n - 1.0, k) for n, k in zip(out_shape, nodes)]
    lattice = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(out_shape))
    source = (transform.apply_inverse(lattice * out_sp + out_or) - np.asarray(moving_origin)) \
        / np.asarray(moving_spacing)
    source = source.reshape(nodes + (len(out_shape),))
    # node k of an axis sits at output pixel k * (n - 1) / (nodes - 1): interpolate there
    pixel = np.meshgrid(*[np.arange(n) * ((k - 1) / max(n - 1, 1))
                          for n, k in zip(out_shape, nodes)], indexing="ij")
    coords = np.stack([ndimage.map_coordinates(source[..., d], pixel, order=1, mode="nearest")
                       for d in range(len(out_shape))])
    image = np.asarray(moving_data)
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float32)
    if rgb:
        data = np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, cval=0.0)
                         for c in range(image.shape[-1])], axis=-1)
    else:
        data = ndimage.map_coordinates(image, coords, order=1, cval=0.0)
    return data, out_sp, out_or


def _fit_job(generation, fixed_points, moving_points, model, preview):
    """The fit worker: fit, leave-one-out errors and (thin-plate spline) the preview
    image. Returns a dict; a fit that cannot be made carries its reason in ``error``."""
    out = {"generation": generation, "fixed": fixed_points, "moving": moving_points,
           "model": model, "transform": None, "info": None, "preview": None}
    try:
        out["transform"], out["info"] = fit_landmarks(fixed_points, moving_points, model)
    except ValueError as err:
        out["error"] = str(err)
        return out
    if preview is not None and not out["transform"].is_linear:
        out["preview"] = _tps_preview(preview.pop("data"), out["transform"], **preview)
    return out


class LandmarkWidget(ScrollableDock):
    """Paired-point registration with a live fit and preview."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):  # noqa: F821
        super().__init__()
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QSizePolicy

        self.viewer = napari_viewer
        self.fixed_layer = ComboBox(label="fixed image", choices=self._image_choices, nullable=True)
        self.moving_layer = ComboBox(label="moving image", choices=self._image_choices, nullable=True)
        self.transform_choice = ComboBox(label="transform", choices=list(TRANSFORMS), value="affine")
        self.alternate = CheckBox(text="alternate clicks between images (BigWarp-style)", value=True)
        self.one_at_a_time = CheckBox(text="show one image at a time while clicking", value=False)
        self.start_button = PushButton(text="Start / reset landmark layers")
        self.status = Label(value="choose the two images and press Start")
        self.status.native.setWordWrap(True)
        self.status.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.table = Table(value={"data": [], "columns": ["fixed", "moving", "residual", "leave-one-out"]})
        self.table.native.setMinimumHeight(120)
        self.table.native.setMaximumHeight(260)
        self.refine_button = PushButton(text="Refine with intensities")
        self.cancel_button = PushButton(text="Cancel refinement", enabled=False)
        from ..core.register import available_methods

        self._intensity = "intensity" in available_methods()
        self.refine_button.enabled = False
        if not self._intensity:
            self.refine_button.tooltip = "the intensity method is not installed"
        self.extend([self.fixed_layer, self.moving_layer, self.transform_choice, self.alternate,
                     self.one_at_a_time, self.start_button, self.status, self.table,
                     self.refine_button, self.cancel_button])
        self.fixed_points = None
        self.moving_points = None
        self.preview = None
        self._preview_shown = False
        self.transform: Transform | None = None
        self.fit_info: dict | None = None
        self.refined = None
        self.worker = None  # the refinement worker
        self._refine_cancel = threading.Event()
        self._refine_inputs = ()
        self._syncing = False
        # live fit: a debounce timer, one fit worker at a time, a generation counter so
        # only the latest request's result is applied
        self._generation = 0
        self._fit_worker = None
        self._fit_pending = False
        self._debounce = QTimer(self.native)  # goes with the dock when it is closed
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self._launch_fit)
        self.start_button.changed.connect(self.start)
        self.transform_choice.changed.connect(self.refit)
        self.refine_button.changed.connect(self.refine)
        self.cancel_button.changed.connect(self.cancel_refine)
        self.viewer.layers.events.inserted.connect(self.reset_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        images = self._image_choices()
        if len(images) >= 2:
            self.fixed_layer.value, self.moving_layer.value = images[1][1], images[0][1]

    # ------------------------------------------------------------------ layers
    def _image_choices(self, widget=None):
        """Image layers, top first; our own landmark previews and outputs excluded."""
        return [(layer.name, layer) for layer in _image_layers(self.viewer)
                if layer.metadata.get(_ROLE_KEY) is None
                and layer.metadata.get(_OUTPUT_KEY) is None]

    @property
    def busy(self) -> bool:
        """True while a refit is waiting for clicks to pause or is being computed."""
        return bool(self._debounce.isActive() or self._fit_worker is not None
                    or self._fit_pending)

    def _on_layer_removed(self, event=None):
        try:
            self._layer_removed(getattr(event, "value", None))
        except RuntimeError:  # the dock's Qt widgets were deleted (dock closed)
            pass

    def _layer_removed(self, removed):
        if removed is None:
            return
        if same_layer(removed, self.fixed_points) or same_layer(removed, self.moving_points):
            self._disconnect()
            self.fixed_points = self.moving_points = None
            self._generation += 1  # a fit in flight is for layers that are gone
        if same_layer(removed, self.preview):
            self.preview = None
        gone_input = any(same_layer(removed, layer) for layer in self._refine_inputs)
        if gone_input and self.worker is not None and not self._refine_cancel.is_set():
            self._refine_cancel.set()
            self.worker.quit()
            message = (f"refinement cancelled: layer {removed.name!r} was removed; "
                       "no output layer was made")
        else:
            message = None
        if same_layer(removed, self.moving_layer.value) or same_layer(removed, self.fixed_layer.value):
            self._generation += 1
            self._debounce.stop()
        # UI changes wait until napari has finished removing the layer (a repaint or a
        # notification in the middle of a removal crashed napari under software OpenGL)
        from qtpy.QtCore import QTimer

        QTimer.singleShot(SETTLE_MS, lambda: self._after_removal(message))

    def _after_removal(self, message):
        try:
            self.reset_choices()
            if message:
                self.status.value = message
        except RuntimeError:  # the dock was closed meanwhile
            pass

    def _disconnect(self):
        for layer in (self.fixed_points, self.moving_points):
            if layer is not None:
                try:
                    layer.events.data.disconnect(self._on_points_changed)
                except (TypeError, ValueError, RuntimeError):
                    pass

    def _points_layer(self, image, colour, role):
        name = f"{image.name} landmarks"
        ndim = image.ndim
        for layer in list(self.viewer.layers):
            if layer.name == name and layer.metadata.get(_ROLE_KEY) == role:
                self.viewer.layers.remove(layer)
        return self.viewer.add_points(
            np.empty((0, ndim)), name=name, ndim=ndim, face_color=colour, border_color="white",
            size=max(3.0, 0.015 * max(np.asarray(image.data.shape[:ndim]) * image.scale[-ndim:])),
            metadata={_ROLE_KEY: role},
        )

    def start(self, *_):
        """(Re)create the two landmark layers for the chosen images and start clicking
        in the fixed one."""
        fixed, moving = self.fixed_layer.value, self.moving_layer.value
        if fixed is None or moving is None or same_layer(fixed, moving):
            self.status.value = "choose two different images (fixed and moving) first"
            return
        if fixed.ndim != moving.ndim:
            self.status.value = (f"{fixed.name!r} is {fixed.ndim}D and {moving.name!r} is "
                                 f"{moving.ndim}D: choose two images with the same dimensions")
            return
        moved = [ly.name for ly in (fixed, moving)
                 if not np.allclose(placement(ly), np.eye(ly.ndim + 1), atol=1e-9)]
        if moved:
            # clicks land in the world napari shows, but the preview and the refinement
            # resample on the scale/translate grid: refuse rather than mix the two
            self.status.value = (f"{' and '.join(repr(n) for n in moved)} "
                                 f"{'is' if len(moved) == 1 else 'are'} placed by rotate, shear "
                                 "or affine, which this dock does not follow yet: reset them "
                                 "(Layer controls, or layer.rotate = 0 / layer.affine = None), "
                                 "or use the Register images dock, which registers layers as "
                                 "napari shows them")
            return
        self._disconnect()
        self._generation += 1
        self._make_preview()
        self.fixed_points = self._points_layer(fixed, FIXED_COLOUR, "fixed")
        self.moving_points = self._points_layer(moving, MOVING_COLOUR, "moving")
        for layer in (self.fixed_points, self.moving_points):
            layer.events.data.connect(self._on_points_changed)
        self.transform = self.fit_info = None
        self._activate(self.fixed_points)
        self.refit()

    def _activate(self, points_layer):
        """Make ``points_layer`` the one that receives the next click."""
        self.viewer.layers.selection.active = points_layer
        points_layer.mode = "add"
        if self.one_at_a_time.value:
            fixed_turn = same_layer(points_layer, self.fixed_points)
            self.fixed_layer.value.visible = fixed_turn
            self.moving_layer.value.visible = not fixed_turn
            if self.preview is not None and self._preview_shown:
                self.preview.visible = fixed_turn

    # ------------------------------------------------------------------ events
    def _on_points_changed(self, event):
        if self._syncing or self.fixed_points is None or self.moving_points is None:
            return
        action = str(getattr(event, "action", ""))
        source = event.source
        if same_layer(source, self.fixed_points):
            source, other = self.fixed_points, self.moving_points
        elif same_layer(source, self.moving_points):
            source, other = self.moving_points, self.fixed_points
        else:
            return
        if action == "removed":
            # keep the pairs: delete the partners of the deleted points (the indices are
            # those before the removal; point i's partner is point i of the other layer)
            idx = sorted({int(i) for i in getattr(event, "data_indices", ())
                          if 0 <= int(i) < len(other.data)})
            if idx:
                self._syncing = True
                try:
                    other.remove(idx)
                finally:
                    self._syncing = False
        elif action == "added" and self.alternate.value:
            if len(source.data) > len(other.data):
                self._activate(other)
            elif len(source.data) == len(other.data):
                self._activate(self.fixed_points)
        if action.endswith("ing"):  # adding/changing/removing: wait for the "-ed" event
            return
        self.refit()

    # ------------------------------------------------------------------ fit
    def pairs(self):
        """(fixed_points, moving_points) as world coordinates, complete pairs only."""
        if self.fixed_points is None or self.moving_points is None:
            return None, None
        f = np.asarray(self.fixed_points.data, float)
        m = np.asarray(self.moving_points.data, float)
        f = f * self.fixed_points.scale + self.fixed_points.translate
        m = m * self.moving_points.scale + self.moving_points.translate
        n = min(len(f), len(m))
        return f[:n], m[:n]

    def refit(self, *_):
        """Ask for a fit of the chosen transform to the complete pairs; it runs in a
        worker once clicks pause (DEBOUNCE_MS) and updates table, status and preview."""
        if self.fixed_points is None or self.moving_points is None:
            return
        self._generation += 1
        self._debounce.start()

    def refit_now(self):
        """Start the pending refit without waiting for the pause (e.g. from scripts)."""
        self._debounce.stop()
        self._launch_fit()

    def _launch_fit(self):
        if self._fit_worker is not None:  # one at a time: run again when it returns
            self._fit_pending = True
            return
        self._fit_pending = False
        f, m = self.pairs()
        if f is None:
            return
        fixed, moving = self.fixed_layer.value, self.moving_layer.value
        preview = None
        model = self.transform_choice.value
        if model == "tps" and fixed is not None and moving is not None:
            f_sp, f_or = _geometry(fixed)
            m_sp, m_or = _geometry(moving)
            data = moving.data
            preview = dict(data=data[0] if moving.multiscale else data,
                           fixed_shape=tuple(fixed.data.shape[:fixed.ndim]) if not fixed.multiscale
                           else tuple(fixed.data[0].shape[:fixed.ndim]),
                           fixed_spacing=f_sp, fixed_origin=f_or, moving_spacing=m_sp,
                           moving_origin=m_or, rgb=bool(moving.rgb))
        from napari.qt.threading import create_worker

        worker = create_worker(_fit_job, self._generation, f, m, model, preview,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_fit)
        worker.errored.connect(self._on_fit_error)
        worker.finished.connect(self._on_fit_finished)
        self._fit_worker = worker
        worker.start()

    def _on_fit_finished(self):
        self._fit_worker = None
        if self._fit_pending:
            self._launch_fit()

    def _on_fit_error(self, err):
        self.status.value = f"the fit failed: {err}"

    def _on_fit(self, result):
        if result["generation"] != self._generation or self.fixed_points is None:
            return  # a newer request is on its way: only the latest result is shown
        f, m, model = result["fixed"], result["moving"], result["model"]
        self.transform, self.fit_info = result["transform"], result["info"]
        waiting = self._waiting_message()
        if self.transform is None:
            ndim = self.fixed_points.ndim
            need = min_points(model, ndim)
            self.status.value = ((f"{len(f)} pair(s); {model} needs {need}. " if len(f) < need
                                  else "") + result.get("error", "") + waiting)
            self._fill_table(f, m, None)
            self.refine_button.enabled = False
            return
        info = self.fit_info
        self.status.value = (f"{len(f)} pairs, {model}: RMS residual {info['fre_rms']:.3g}, "
                             f"leave-one-out mean {info['tre_loo_mean']:.3g} (world units)"
                             + waiting)
        self._fill_table(f, m, info)
        self._update_preview(result["preview"])
        self.refine_button.enabled = self._intensity and self.worker is None

    def _waiting_message(self) -> str:
        nf, nm = len(self.fixed_points.data), len(self.moving_points.data)
        if nf == nm:
            return ""
        side = "fixed" if nf > nm else "moving"
        first = min(nf, nm) + 1
        last = max(nf, nm)
        which = f"point {first}" if first == last else f"points {first}-{last}"
        return (f"; {which} in the {side} image without a partner (left out of the fit): "
                "click the matching point in the other image")

    def _fill_table(self, f, m, info):
        rows = []
        for i in range(len(f)):
            res = info["residuals"][i] if info else float("nan")
            loo = info["loo_errors"][i] if info else float("nan")
            rows.append([np.array2string(f[i], precision=1), np.array2string(m[i], precision=1),
                         f"{res:.3g}", f"{loo:.3g}"])
        self.table.value = {"data": rows, "index": [str(i + 1) for i in range(len(f))],
                            "columns": ["fixed", "moving", "residual", "leave-one-out"]}

    def _update_preview(self, resampled=None):
        moving = self.moving_layer.value
        fixed = self.fixed_layer.value
        if moving is None or fixed is None or self.transform is None:
            return
        tf = self.transform
        meta = {_ROLE_KEY: "preview", "registration": {"transform": tf.to_dict(),
                                                        "method": "landmarks",
                                                        "info": self.fit_info}}
        if tf.is_linear:
            data = moving.data
            affine = tf.matrix @ np.asarray(moving.affine.affine_matrix, float)
            geometry = {"scale": moving.scale, "translate": moving.translate, "affine": affine}
        else:
            if resampled is None:
                return
            data, out_sp, out_or = resampled
            geometry = {"scale": out_sp, "translate": out_or,
                        "affine": np.eye(len(out_sp) + 1)}
        if self.preview is None or not any(same_layer(self.preview, ly) for ly in self.viewer.layers):
            active = self.viewer.layers.selection.active
            self._make_preview()
            # keep the point layers on top so clicks land on them
            for layer in (self.fixed_points, self.moving_points):
                if layer is not None:
                    self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
            if active is not None:  # adding a layer selects it: give the click back
                self.viewer.layers.selection.active = active
        if bool(self.preview.multiscale) != isinstance(data, (list, tuple)):
            # a pyramid moving image shown through a linear fit, then a TPS array (or back):
            # napari cannot switch a layer between the two, make it again
            self.viewer.layers.remove(self.preview)
            self.preview = None
            return self._update_preview(resampled)
        # each setter makes napari refresh the layer: set only what changed
        if self.preview.data is not data:
            self.preview.data = data
        for key in ("scale", "translate"):
            if not np.allclose(getattr(self.preview, key), geometry[key]):
                setattr(self.preview, key, geometry[key])
        if not np.allclose(self.preview.affine.affine_matrix, geometry["affine"]):
            self.preview.affine = geometry["affine"]
        self.preview.metadata.update(meta)
        if not self._preview_shown:
            self._preview_shown = True
            self.preview.visible = (not self.one_at_a_time.value
                                    or same_layer(self.viewer.layers.selection.active,
                                             self.fixed_points))

    def _make_preview(self):
        """Add the (hidden) preview layer: the moving image, to be shown through the fit.
        Made when Start is pressed, so that napari's cost of adding a layer (0.3-0.4 s
        measured under software OpenGL) is not paid in the middle of clicking."""
        moving = self.moving_layer.value
        name = f"{moving.name} landmarks preview"
        for layer in list(self.viewer.layers):
            if layer.name == name and layer.metadata.get(_ROLE_KEY) == "preview":
                self.viewer.layers.remove(layer)
        self.preview = self.viewer.add_image(
            moving.data, name=name, rgb=moving.rgb, colormap=None if moving.rgb else "green",
            blending="additive", opacity=0.7, metadata={_ROLE_KEY: "preview"},
            contrast_limits=None if moving.rgb else moving.contrast_limits,
            multiscale=moving.multiscale, scale=moving.scale, translate=moving.translate,
            affine=np.asarray(moving.affine.affine_matrix, float), visible=False)
        self._preview_shown = False

    # ------------------------------------------------------------------ refine
    def make_refine_worker(self):
        """An unstarted worker that runs intensity registration from the landmark fit."""
        from napari.qt.threading import create_worker

        from ..core.register import register

        fixed, moving = self.fixed_layer.value, self.moving_layer.value
        if self.transform is None or fixed is None or moving is None:
            raise ValueError("fit the landmarks first")
        init = self.transform
        model = self.transform_choice.value
        if not init.is_linear:  # a TPS cannot start a linear search: start from its affine part
            f, m = self.pairs()
            init, _ = fit_landmarks(f, m, "affine", leave_one_out=False)
            model = "affine"
        f_sp, f_or = _geometry(fixed)
        m_sp, m_or = _geometry(moving)
        fixed_data, moving_data = np.asarray(fixed.data), np.asarray(moving.data)
        self._refine_cancel.clear()
        self._refine_inputs = (fixed, moving)
        cancel = self._refine_cancel.is_set

        def job():
            return register(fixed_data, moving_data, method="intensity", transform=model,
                            fixed_spacing=f_sp, moving_spacing=m_sp, fixed_origin=f_or,
                            moving_origin=m_or, init=init, cancel=cancel)

        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_refined)
        worker.errored.connect(self._on_refine_error)
        worker.finished.connect(self._on_refine_finished)
        self.worker = worker
        return worker

    def refine(self, *_):
        try:
            worker = self.make_refine_worker()
        except ValueError as err:
            self.status.value = str(err)
            return
        self.status.value = "refining with intensities..."
        self.refine_button.enabled = False
        self.cancel_button.enabled = True
        worker.start()

    def cancel_refine(self, *_):
        """Stop a running refinement (no output layer is made)."""
        if self.worker is None:
            return
        self._refine_cancel.set()
        self.worker.quit()
        self.status.value = "cancelling the refinement..."

    def _on_refined(self, result):
        if self._refine_cancel.is_set():
            return  # cancelled (or an input was removed): make nothing
        moving = self.moving_layer.value
        fixed = self.fixed_layer.value
        if moving is None or fixed is None:
            return
        self.refined = result
        name = f"{moving.name} registered"
        meta = {"registration": result.to_dict(), _ROLE_KEY: "registered",
                _OUTPUT_KEY: "registered"}
        old = [ly for ly in self.viewer.layers
               if ly.name == name and ly.metadata.get(_ROLE_KEY) == "registered"]
        if old:
            layer = old[0]
            layer.data = result.warped
            layer.metadata.update(meta)
        else:
            self.viewer.add_image(result.warped, name=name, scale=fixed.scale,
                                  translate=fixed.translate, rgb=moving.rgb, metadata=meta,
                                  blending="additive", colormap=None if moving.rgb else "cyan")
        before, after = result.metrics.get("before", {}), result.metrics.get("after", {})
        self.status.value = (f"refined ({result.info.get('transform')}): NCC "
                             f"{before.get('ncc', float('nan')):.3f} -> {after.get('ncc', float('nan')):.3f}")

    def _on_refine_error(self, err):
        from ..core.register import RegistrationCancelled

        if isinstance(err, RegistrationCancelled) or self._refine_cancel.is_set():
            return  # the status line already says why
        self.status.value = f"refinement failed: {err}"

    def _on_refine_finished(self):
        self.worker = None
        self._refine_inputs = ()
        self.cancel_button.enabled = False
        self.refine_button.enabled = self._intensity and self.transform is not None
        if self._refine_cancel.is_set() and "removed" not in str(self.status.value):
            self.status.value = "refinement cancelled; no output layer was made"
