"""*Landmark registration* dock widget: click matching points, see the fit live.

Two Points layers, ``<fixed> landmarks`` and ``<moving> landmarks``, hold the pairs
(paired by index, in world coordinates: the Points layers keep napari's identity
transform, so ``layer.data`` *is* world). Clicks alternate between the two layers like
BigWarp: after a point is added to one, the other becomes the active layer (and, if
"show one image at a time" is on, its image is the one shown). Every change (add, move,
delete) refits the chosen transform, updates the per-pair residual table and the
``<moving> landmarks preview`` layer: the moving image shown through the fitted
transform (``layer.affine`` for linear fits, resampled onto the fixed grid for the
thin-plate spline). Deleting a point deletes its partner too.

"Refine with intensities" (when the intensity method is installed) starts SimpleITK
registration from the landmark fit, in a worker thread.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton, Table

from ..backends.landmarks import TRANSFORMS, fit_landmarks, min_points
from ..core.transform import Transform

FIXED_COLOUR = "magenta"
MOVING_COLOUR = "lime"
_ROLE_KEY = "napari_registration_landmarks"
PREVIEW_SIDE = 512  # thin-plate spline previews are resampled at most this size per axis


def _image_layers(viewer):
    import napari.layers as nl

    return [layer for layer in reversed(list(viewer.layers)) if isinstance(layer, nl.Image)]


def _geometry(layer):
    return tuple(float(v) for v in layer.scale), tuple(float(v) for v in layer.translate)


class LandmarkWidget(Container):
    """Paired-point registration with a live fit and preview."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):  # noqa: F821
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.fixed_layer = ComboBox(label="fixed image", choices=self._image_choices, nullable=True)
        self.moving_layer = ComboBox(label="moving image", choices=self._image_choices, nullable=True)
        self.transform_choice = ComboBox(label="transform", choices=list(TRANSFORMS), value="affine")
        self.alternate = CheckBox(text="alternate clicks between images (BigWarp-style)", value=True)
        self.one_at_a_time = CheckBox(text="show one image at a time while clicking", value=False)
        self.start_button = PushButton(text="Start / reset landmark layers")
        self.status = Label(value="choose the two images and press Start")
        self.table = Table(value={"data": [], "columns": ["fixed", "moving", "residual", "leave-one-out"]})
        self.refine_button = PushButton(text="Refine with intensities")
        from ..core.register import available_methods

        self._intensity = "intensity" in available_methods()
        self.refine_button.enabled = False
        if not self._intensity:
            self.refine_button.tooltip = "the intensity method is not installed"
        self.extend([self.fixed_layer, self.moving_layer, self.transform_choice, self.alternate,
                     self.one_at_a_time, self.start_button, self.status, self.table,
                     self.refine_button])
        self.fixed_points = None
        self.moving_points = None
        self.preview = None
        self.transform: Transform | None = None
        self.fit_info: dict | None = None
        self.refined = None
        self.worker = None
        self._syncing = False
        self.start_button.changed.connect(self.start)
        self.transform_choice.changed.connect(self.refit)
        self.refine_button.changed.connect(self.refine)
        self.viewer.layers.events.inserted.connect(self.reset_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        images = _image_layers(self.viewer)
        if len(images) >= 2:
            self.fixed_layer.value, self.moving_layer.value = images[1], images[0]

    # ------------------------------------------------------------------ layers
    def _image_choices(self, widget=None):
        return [(layer.name, layer) for layer in _image_layers(self.viewer)
                if layer.metadata.get(_ROLE_KEY) is None]

    def _on_layer_removed(self, event=None):
        removed = getattr(event, "value", None)
        if removed is not None and removed in (self.fixed_points, self.moving_points):
            self._disconnect()
            self.fixed_points = self.moving_points = None
        if removed is not None and removed is self.preview:
            self.preview = None
        self.reset_choices()

    def _disconnect(self):
        for layer in (self.fixed_points, self.moving_points):
            if layer is not None:
                try:
                    layer.events.data.disconnect(self._on_points_changed)
                except (TypeError, ValueError, RuntimeError):
                    pass

    def _points_layer(self, image, colour, role):
        name = f"{image.name} landmarks"
        ndim = image.ndim - (1 if image.rgb else 0)
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
        if fixed is None or moving is None or fixed is moving:
            self.status.value = "choose two different images (fixed and moving) first"
            return
        self._disconnect()
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
            fixed_turn = points_layer is self.fixed_points
            self.fixed_layer.value.visible = fixed_turn
            self.moving_layer.value.visible = not fixed_turn
            if self.preview is not None:
                self.preview.visible = fixed_turn

    # ------------------------------------------------------------------ events
    def _on_points_changed(self, event):
        if self._syncing:
            return
        action = str(getattr(event, "action", ""))
        source = event.source
        other = self.moving_points if source is self.fixed_points else self.fixed_points
        if action == "removed" and other is not None:
            # keep the pairs: delete the partners of the deleted points
            idx = [i for i in getattr(event, "data_indices", ()) if 0 <= i < len(other.data)]
            if idx and len(other.data) > len(source.data):
                self._syncing = True
                try:
                    other.remove(idx)
                finally:
                    self._syncing = False
        elif action == "added" and self.alternate.value and other is not None:
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
        """Fit the chosen transform to the complete pairs and update table and preview."""
        f, m = self.pairs()
        if f is None:
            return
        model = self.transform_choice.value
        waiting = abs(len(self.fixed_points.data) - len(self.moving_points.data))
        try:
            self.transform, self.fit_info = fit_landmarks(f, m, model)
        except ValueError as err:
            self.transform, self.fit_info = None, None
            ndim = self.fixed_points.ndim
            need = min_points(model, ndim)
            self.status.value = (f"{len(f)} pair(s); {model} needs {need}. " if len(f) < need
                                 else "") + str(err)
            self._fill_table(f, m, None)
            self.refine_button.enabled = False
            return
        info = self.fit_info
        msg = (f"{len(f)} pairs, {model}: RMS residual {info['fre_rms']:.3g}, "
               f"leave-one-out mean {info['tre_loo_mean']:.3g} (world units)")
        if waiting:
            msg += "; click the matching point in the other image"
        self.status.value = msg
        self._fill_table(f, m, info)
        self._update_preview()
        self.refine_button.enabled = self._intensity

    def _fill_table(self, f, m, info):
        rows = []
        for i in range(len(f)):
            res = info["residuals"][i] if info else float("nan")
            loo = info["loo_errors"][i] if info else float("nan")
            rows.append([np.array2string(f[i], precision=1), np.array2string(m[i], precision=1),
                         f"{res:.3g}", f"{loo:.3g}"])
        self.table.value = {"data": rows, "index": [str(i + 1) for i in range(len(f))],
                            "columns": ["fixed", "moving", "residual", "leave-one-out"]}

    def _update_preview(self):
        moving = self.moving_layer.value
        fixed = self.fixed_layer.value
        if moving is None or fixed is None or self.transform is None:
            return
        tf = self.transform
        meta = {_ROLE_KEY: "preview", "registration": {"transform": tf.to_dict(),
                                                        "method": "landmarks",
                                                        "info": self.fit_info}}
        name = f"{moving.name} landmarks preview"
        if tf.is_linear:
            data = moving.data
            affine = tf.matrix @ np.asarray(moving.affine.affine_matrix, float)
            geometry = {"scale": moving.scale, "translate": moving.translate, "affine": affine}
        else:
            from ..core.resample import resample

            f_sp, f_or = _geometry(fixed)
            m_sp, m_or = _geometry(moving)
            shape = np.array(fixed.data.shape[:-1] if fixed.rgb else fixed.data.shape)
            # a display preview: at most PREVIEW_SIDE pixels per axis over the fixed extent
            factor = max(1.0, float(shape.max()) / PREVIEW_SIDE)
            out_shape = np.maximum(1, np.ceil(shape / factor)).astype(int)
            out_sp = np.asarray(f_sp) * shape / out_shape
            out_or = np.asarray(f_or) + (out_sp - np.asarray(f_sp)) / 2  # same pixel extent
            data = resample(np.asarray(moving.data), tf, tuple(out_shape), output_spacing=out_sp,
                            output_origin=out_or, input_spacing=m_sp, input_origin=m_or,
                            rgb=bool(moving.rgb))
            geometry = {"scale": out_sp, "translate": out_or, "affine": np.eye(len(f_sp) + 1)}
        active = self.viewer.layers.selection.active
        if self.preview is None or self.preview not in self.viewer.layers:
            self.preview = self.viewer.add_image(
                data, name=name, rgb=moving.rgb, colormap=None if moving.rgb else "green",
                blending="additive", opacity=0.7, metadata=meta,
                contrast_limits=None if moving.rgb else moving.contrast_limits, **geometry)
            # keep the point layers on top so clicks land on them
            for layer in (self.fixed_points, self.moving_points):
                if layer is not None:
                    self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
            if active is not None:  # adding a layer selects it: give the click back
                self.viewer.layers.selection.active = active
        else:
            self.preview.data = data
            self.preview.scale = geometry["scale"]
            self.preview.translate = geometry["translate"]
            self.preview.affine = geometry["affine"]
            self.preview.metadata.update(meta)

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

        def job():
            return register(fixed_data, moving_data, method="intensity", transform=model,
                            fixed_spacing=f_sp, moving_spacing=m_sp, fixed_origin=f_or,
                            moving_origin=m_or, init=init)

        worker = create_worker(job, _start_thread=False)
        worker.returned.connect(self._on_refined)
        worker.errored.connect(self._on_refine_error)
        return worker

    def refine(self, *_):
        try:
            self.worker = self.make_refine_worker()
        except ValueError as err:
            self.status.value = str(err)
            return
        self.status.value = "refining with intensities..."
        self.refine_button.enabled = False
        self.worker.start()

    def _on_refined(self, result):
        self.refined = result
        moving = self.moving_layer.value
        fixed = self.fixed_layer.value
        name = f"{moving.name} registered"
        meta = {"registration": result.to_dict(), _ROLE_KEY: "registered"}
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = result.warped
            layer.metadata.update(meta)
        else:
            self.viewer.add_image(result.warped, name=name, scale=fixed.scale,
                                  translate=fixed.translate, rgb=moving.rgb, metadata=meta,
                                  blending="additive", colormap=None if moving.rgb else "cyan")
        before, after = result.metrics.get("before", {}), result.metrics.get("after", {})
        self.status.value = (f"refined ({result.info.get('transform')}): NCC "
                             f"{before.get('ncc', float('nan')):.3f} -> {after.get('ncc', float('nan')):.3f}")
        self.refine_button.enabled = True

    def _on_refine_error(self, err):
        self.status.value = f"refinement failed: {err}"
        self.refine_button.enabled = True
