"""*Apply / save / load transform*: take the transform of a registration (from a layer's
metadata, or a JSON / ITK ``.tfm`` file), invert it, save it, and apply it to Image
(linear), Labels (nearest, dtype kept), Points and Shapes layers.

Conventions: a registration transform maps the moving layer's world (data * scale +
translate) to the fixed layer's world. Points and Shapes are mapped vertex by vertex;
images are resampled onto a reference layer's grid (or their own grid when no
reference is picked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, Label, PushButton

from ..core.resample import resample
from ..core.transform import Transform, load_transform, save_transform
from ._common import (
    affine_matrix,
    image_data,
    layer_choices,
    placement,
    put_layer,
    scale_translate,
    show_error,
    show_info,
    transform_from_layer,
)
from ._dock import ScrollableDock

RESAMPLE = "resample"
AFFINE = "affine"


def _is_series_file(path: Path) -> bool:
    """True for a JSON file of per-frame stack transforms (save_transforms)."""
    import json

    from ..core.series import SERIES_TYPE

    try:
        if path.suffix.lower() != ".json" or path.stat().st_size > 512 * 1024 * 1024:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("type") in (
        SERIES_TYPE, "napari-registration stack result")


class TransformWidget(ScrollableDock):
    """Dock widget holding one *current* transform, which can come from a layer or a
    file, be inverted or saved, and be applied to layers (each apply makes a new layer
    ``<name> transformed``; the input is left as it was)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):  # noqa: F821
        super().__init__()
        self.viewer = napari_viewer
        self.transform: Transform | None = None
        self.source = ComboBox(label="from layer", choices=self._registered_layers, nullable=True)
        self.take_button = PushButton(text="Use layer's transform")
        self.load_file = FileEdit(label="load file", mode="r", filter="*.json *.tfm *.txt")
        self.load_button = PushButton(text="Load")
        self.invert_button = PushButton(text="Invert")
        self.save_file = FileEdit(label="save as", mode="w", filter="*.json *.tfm")
        self.save_button = PushButton(text="Save")
        self.current = Label(label="current", value="(none)")
        self.target = ComboBox(label="apply to", nullable=True,
                               choices=layer_choices(napari_viewer, "image", "labels", "points", "shapes"))
        self.reference = ComboBox(label="onto grid of", nullable=True, value=None,
                                  choices=layer_choices(napari_viewer, "image", "labels"),
                                  tooltip="images/labels are resampled onto this layer's grid; "
                                          "none = their own grid")
        self.mode = ComboBox(label="images as", choices=[
            ("resampled copy", RESAMPLE), ("copy with an affine (linear only)", AFFINE)])
        self.apply_button = PushButton(text="Apply")
        self.current.native.setWordWrap(True)
        self.extend([self.source, self.take_button, self.load_file, self.load_button,
                     self.invert_button, self.save_file, self.save_button, self.current,
                     self.target, self.reference, self.mode, self.apply_button])
        self.take_button.changed.connect(lambda *_: self._guard(self.take_from_layer))
        self.load_button.changed.connect(lambda *_: self._guard(self.load))
        self.invert_button.changed.connect(lambda *_: self._guard(self.invert))
        self.save_button.changed.connect(lambda *_: self._guard(self.save))
        self.apply_button.changed.connect(lambda *_: self._guard(self.apply))
        self.reset_choices()
        if self.source.value is not None:
            self.take_from_layer()

    def _registered_layers(self, widget=None):
        return [(ly.name, ly) for ly in reversed(list(self.viewer.layers))
                if transform_from_layer(ly) is not None]

    def _guard(self, action):
        try:
            return action()
        except (ValueError, OSError, KeyError) as err:
            show_error(str(err))
            return None

    def reset_choices(self, *_):
        super().reset_choices()
        if self.source.value is None and self.source.choices:
            choices = [c for c in self.source.choices if c is not None]
            if choices:
                self.source.value = choices[0]

    # ------------------------------------------------------------- current transform
    def set_transform(self, transform: Transform | None, origin: str = "") -> None:
        self.transform = transform
        if transform is None:
            self.current.value = "(none)"
            return
        text = f"{transform.kind}, {transform.ndim}D" + (f" - {origin}" if origin else "")
        if transform.matrix is not None:
            text += "\n" + np.array2string(transform.matrix, precision=3, suppress_small=True)
        self.current.value = text

    def take_from_layer(self):
        layer = self.source.value
        if layer is None:
            raise ValueError("no layer carries a registration transform yet: register two "
                             "layers first, or load a transform file")
        self.set_transform(transform_from_layer(layer), f"from {layer.name!r}")
        return self.transform

    def load(self, path=None):
        path = Path(path if path is not None else self.load_file.value)
        if not path.is_file():
            raise ValueError(f"no transform file at {str(path)!r}: pick a .json or .tfm file")
        try:
            transform = load_transform(path)
        except ValueError as err:
            if _is_series_file(path):
                raise ValueError(f"{path.name} holds per-frame transforms of a stack: load it "
                                 "in the 'Register stack' dock (Load transforms) to apply "
                                 "them frame by frame") from None
            raise err
        self.set_transform(transform, f"from {path.name}")
        return self.transform

    def invert(self):
        self._need()
        self.set_transform(self.transform.inverse(), "inverted")
        return self.transform

    def save(self, path=None):
        self._need()
        path = Path(path if path is not None else self.save_file.value)
        if path.is_dir() or not path.suffix:
            raise ValueError(f"give a file name ending in .json or .tfm (got {str(path)!r})")
        out = save_transform(self.transform, path)
        show_info(f"saved transform to {out}")
        return out

    def _need(self):
        if self.transform is None:
            raise ValueError("no current transform: take one from a layer or load a file first")

    # ------------------------------------------------------------------------- apply
    def apply(self):
        """Apply the current transform to the target layer; returns the new layer."""
        self._need()
        layer = self.target.value
        if layer is None:
            raise ValueError("pick a layer to apply the transform to")
        t = self.transform
        if layer.ndim != t.ndim:
            raise ValueError(f"{layer.name!r} is {layer.ndim}D but the transform is {t.ndim}D")
        kind = type(layer).__name__.lower()
        name = f"{layer.name} transformed"
        # the transform maps the world napari shows (rotate, shear and affine included)
        sp, org = scale_translate(layer)
        shown = Transform(placement(layer))  # the layer's scale/translate world -> shown world
        common = dict(name=name, role="transformed",
                      metadata={"registration_applied": {"source": layer.name,
                                                         "transform": t.to_dict()}})
        if kind in ("points", "shapes"):
            # data -> shown world, map, back to data coordinates of a layer placed by its
            # scale/translate alone (so the result shows where the transform puts it)
            def to_data(world):
                return (world - np.asarray(org)) / np.asarray(sp)

            def mapped(verts):
                return to_data(t.apply(shown.apply(np.asarray(verts, float) * sp + org)))

            if kind == "points":
                return put_layer(self.viewer, mapped(layer.data) if len(layer.data) else layer.data,
                                 "points", scale=sp, translate=org, size=layer.size,
                                 face_color=layer.face_color, **common)
            return put_layer(self.viewer, [mapped(v) for v in layer.data], "shapes",
                             shape_type=list(layer.shape_type), scale=sp, translate=org,
                             edge_color=layer.edge_color, face_color=layer.face_color,
                             edge_width=layer.edge_width, **common)
        is_labels = kind == "labels"
        rgb = bool(getattr(layer, "rgb", False))
        extra = {} if is_labels or rgb else dict(colormap=layer.colormap.name,
                                                 contrast_limits=layer.contrast_limits,
                                                 blending=layer.blending)
        if self.mode.value == AFFINE:
            if not t.is_linear or t.is_projective:
                raise ValueError(f"a {t.kind} transform cannot be a napari affine: choose "
                                 "'resampled copy'")
            # shown = affine @ (rotate/shear/scale/translate); the transform acts after all
            return put_layer(self.viewer, image_data(layer), "labels" if is_labels else "image",
                             scale=sp, translate=org, rotate=layer.rotate, shear=layer.shear,
                             affine=t.matrix @ affine_matrix(layer),
                             **({} if is_labels else {"rgb": rgb}), **extra, **common)
        ref = self.reference.value if self.reference.value is not None else layer
        r_sp, r_or = scale_translate(ref)
        shape = tuple(image_data(ref).shape[: ref.ndim])
        # on the reference's scale/translate grid, shown as the reference is shown:
        # layer grid world -> shown world -> transform -> reference grid world
        grid_to_grid = Transform(placement(ref)).inverse() @ t @ shown
        out = resample(np.asarray(image_data(layer)), grid_to_grid, shape, output_spacing=r_sp,
                       output_origin=r_or, input_spacing=sp, input_origin=org,
                       labels=is_labels, rgb=rgb)
        return put_layer(self.viewer, out, "labels" if is_labels else "image", scale=r_sp,
                         translate=r_or, rotate=ref.rotate, shear=ref.shear,
                         affine=affine_matrix(ref),
                         **({} if is_labels else {"rgb": rgb}), **extra, **common)
