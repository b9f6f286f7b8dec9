"""*Inspect alignment*: checkerboard, difference and metrics of two layers, 2D or 3D.

The second layer is resampled onto the first layer's grid when the grids differ (shape,
scale, translate or affine), through the world coordinates napari shows them in - so
this also checks an alignment made by setting a layer's affine, rotate or shear.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSlider, Label, PushButton

from ..core.metrics import compare
from ..core.preprocess import to_grey
from ..core.qc import difference
from ..core.resample import overlap_mask, resample
from ..core.transform import Transform
from ._common import (
    affine_matrix,
    colour_checkerboard,
    image_data,
    layer_choices,
    placement,
    put_layer,
    scale_translate,
    show_error,
)


class InspectWidget(Container):
    """Dock widget: how well do two layers line up? ``compute()`` does the work
    (synchronously: resampling one image and two QC images is fast)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):  # noqa: F821
        super().__init__(labels=True)
        self.viewer = napari_viewer
        images = layer_choices(napari_viewer, "image", "labels")
        self.first = ComboBox(label="reference", choices=images, nullable=True)
        self.second = ComboBox(label="compared", choices=images, nullable=True)
        self.checkerboard = CheckBox(label="checkerboard", value=True)
        self.tile = FloatSlider(label="tile (world units)", min=1.0, max=256.0, value=32.0,
                                tracking=False)
        self.difference = CheckBox(label="difference", value=True)
        self.compute_button = PushButton(text="Compare")
        self.summary = Label(label="", value="")
        self.summary.native.setWordWrap(True)
        try:
            from qtpy.QtGui import QFontDatabase

            self.summary.native.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        except Exception:  # pragma: no cover - cosmetic
            pass
        self.extend([self.first, self.second, self.checkerboard, self.tile, self.difference,
                     self.compute_button, self.summary])
        self._pair = None  # (reference array, compared-on-reference array, grid, names)
        self.compute_button.changed.connect(self.compute)
        self.first.changed.connect(self._forget)
        self.second.changed.connect(self._forget)
        self.first.changed.connect(self._on_first)
        self.tile.changed.connect(self._update_checkerboard)
        self.reset_choices()
        self._defaults()

    def reset_choices(self, *_):
        super().reset_choices()
        self._defaults()

    def _defaults(self):
        layers = [c for c in self.first.choices if c is not None]
        if self.first.value is None and layers:
            self.first.value = layers[-1]
        if self.second.value is None:
            others = [ly for ly in layers if ly is not self.first.value]
            if others:
                self.second.value = others[0]

    def _forget(self, *_):
        """A new selection: the slider must not redraw the previous pair."""
        self._pair = None

    def _on_first(self, layer):
        if layer is None:
            return
        extent = np.asarray(layer.data.shape[: layer.ndim]) * np.asarray(layer.scale)
        biggest = float(max(2.0, np.min(extent) / 2))
        self.tile.max = biggest
        self.tile.min = float(max(np.min(layer.scale), biggest / 256))
        self.tile.value = float(np.clip(np.min(extent) / 8, self.tile.min, self.tile.max))

    # ---------------------------------------------------------------------- compute
    def compute(self, *_):
        try:
            return self._compute()
        except ValueError as err:
            # in the dock too, replacing the previous pair's scores
            self.summary.value = f"not compared: {err}"
            self._pair = None
            show_error(str(err))
            return None

    def _compute(self):
        a_layer, b_layer = self.first.value, self.second.value
        if a_layer is None or b_layer is None:
            raise ValueError("pick two layers to compare")
        if a_layer.ndim != b_layer.ndim:
            raise ValueError(f"{a_layer.name!r} is {a_layer.ndim}D and {b_layer.name!r} is "
                             f"{b_layer.ndim}D: compare layers with the same number of axes")
        a = _grey(a_layer)
        b = _grey(b_layer)
        a_sp, a_or = scale_translate(a_layer)
        b_sp, b_or = scale_translate(b_layer)
        # b's scale/translate world -> viewer world (through its rotate/shear/affine)
        # -> a's scale/translate world
        m = np.linalg.inv(placement(a_layer)) @ placement(b_layer)
        same = (a.shape == b.shape and np.allclose(a_sp, b_sp) and np.allclose(a_or, b_or)
                and np.allclose(m, np.eye(m.shape[0])))
        grid = dict(output_spacing=a_sp, output_origin=a_or, input_spacing=b_sp, input_origin=b_or)
        if same:
            b_on_a, mask = b, None
        else:
            t = Transform(m)
            b_on_a = resample(b, t, a.shape, **grid)
            mask = overlap_mask(b.shape, t, a.shape, **grid)
            if not mask.any():
                raise ValueError(f"{b_layer.name!r} does not overlap {a_layer.name!r} in the "
                                 "world: nothing to compare")
        scores = compare(a, b_on_a, mask)
        layer_grid = dict(scale=a_sp, translate=a_or, rotate=np.asarray(a_layer.rotate),
                          shear=np.asarray(a_layer.shear), affine=affine_matrix(a_layer))
        self._pair = (a, b_on_a, layer_grid, (a_layer.name, b_layer.name))
        if self.checkerboard.value:
            self._update_checkerboard()
        if self.difference.value:
            put_layer(self.viewer, difference(a, b_on_a, mask), "image",
                      name=f"difference: {b_layer.name} - {a_layer.name}", role="qc-difference",
                      colormap="PiYG", contrast_limits=(-1.0, 1.0), **layer_grid)
        lines = [f"{'MSE':8}{scores['mse']:.4g}", f"{'NCC':8}{scores['ncc']:.4g}",
                 f"{'MI':8}{scores['mi']:.4g}", f"{'SSIM':8}{scores.get('ssim', float('nan')):.4g}",
                 f"{'overlap':8}{scores['overlap']:.3g}"]
        if not same:
            lines.append(f"({b_layer.name!r} resampled onto {a_layer.name!r})")
        self.summary.value = "\n".join(lines)
        self.scores = scores
        return scores

    def _update_checkerboard(self, *_):
        if self._pair is None or not self.checkerboard.value:
            return
        a, b, grid, (na, nb) = self._pair
        board = colour_checkerboard(a, b, tile=float(self.tile.value), spacing=grid["scale"])
        put_layer(self.viewer, board, "image", name=f"checkerboard: {na} | {nb}",
                  role="qc-checkerboard", rgb=True, contrast_limits=(0.0, 1.0), **grid)


def _grey(layer) -> np.ndarray:
    data = np.asarray(image_data(layer))
    if getattr(layer, "rgb", False):
        return to_grey(data)
    return data.astype(np.float32)
