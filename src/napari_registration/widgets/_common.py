"""Helpers shared by the dock widgets: layer geometry, output layers that replace
themselves on re-run, an options form built from a method's defaults, and a Qt signal
bridge that carries progress from a worker thread to the GUI thread."""

from __future__ import annotations

import ast
import re
from typing import Any, Iterable

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, LineEdit, SpinBox
from qtpy.QtCore import QObject, Signal

from ..core.transform import Transform

#: metadata key that marks a layer as made by one of our widgets (value: its role)
OUTPUT_KEY = "napari_registration_output"


# ------------------------------------------------------------------------ layer access
def layer_choices(viewer, *kinds: str):
    """A magicgui ``choices`` callable: (name, layer) for the viewer's layers of ``kinds``
    ("image", "labels", "points", "shapes"), in layer-list order (top first)."""
    import napari.layers as nl

    classes = tuple({"image": nl.Image, "labels": nl.Labels, "points": nl.Points,
                     "shapes": nl.Shapes}[k] for k in kinds)

    def choices(widget=None):
        return [(layer.name, layer) for layer in reversed(list(viewer.layers))
                if isinstance(layer, classes)]

    return choices


def unwrap(obj):
    """The object behind napari's ``PublicOnlyProxy`` (plugin docks get proxies)."""
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def same_layer(a, b) -> bool:
    """True if ``a`` and ``b`` are the same layer, whether or not either is a proxy."""
    return a is not None and b is not None and unwrap(a) is unwrap(b)


def is_output(layer) -> bool:
    """True for layers our widgets made (warped results, checkerboards, ...)."""
    return OUTPUT_KEY in (getattr(layer, "metadata", None) or {})


def image_data(layer) -> Any:
    """The full-resolution array of an Image/Labels layer (multiscale: level 0)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def spatial_ndim(layer) -> int:
    """Number of spatial axes (an RGB image's colour axis does not count)."""
    return layer.ndim


def geometry(layer) -> tuple[tuple, tuple]:
    """(spacing, origin) of a layer, i.e. napari ``scale`` and ``translate``, checking
    that nothing else (rotate, shear) moves it: registration works in that world."""
    rotate = np.asarray(layer.rotate, float)
    shear = np.asarray(layer.shear, float)
    if not (np.allclose(rotate, np.eye(rotate.shape[0])) and np.allclose(shear, 0.0)):
        raise ValueError(
            f"layer {layer.name!r} has a rotate/shear set; registration uses each layer's "
            "scale and translate only. Reset rotate/shear, or resample the layer first"
        )
    return tuple(float(v) for v in layer.scale), tuple(float(v) for v in layer.translate)


def physical_matrix(layer) -> np.ndarray:
    """Homogeneous data -> world matrix of scale/translate/rotate/shear (not ``affine``)."""
    from napari.utils.transforms import Affine

    return np.asarray(Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                             shear=layer.shear).affine_matrix, float)


def affine_matrix(layer) -> np.ndarray:
    return np.asarray(layer.affine.affine_matrix, float)


def transform_from_layer(layer) -> Transform | None:
    """The transform stored in a layer's metadata by a registration (or a sample pair's
    ground truth), or None."""
    meta = getattr(layer, "metadata", None) or {}
    reg = meta.get("registration")
    if isinstance(reg, dict) and "transform" in reg:
        return Transform.from_dict(reg["transform"])
    truth = meta.get("registration_truth")
    if isinstance(truth, dict):
        return Transform.from_dict(truth)
    return None


_IN_PLACE = {"image": ("scale", "translate", "affine", "colormap", "contrast_limits", "blending",
                       "visible", "opacity"),
             "labels": ("scale", "translate", "affine", "opacity"),
             "points": ("scale", "translate", "size", "face_color", "border_color")}


def put_layer(viewer, data, layer_type: str, *, name: str, role: str, **kwargs):
    """Add a layer, replacing an earlier output of ours with the same name (kept at the
    same position in the layer list) so re-running does not pile layers up.

    When the earlier layer has the same type and dimensions its data and properties are
    updated in place: removing a layer costs napari a ``gc.collect()`` (0.3 s measured)
    on the GUI thread."""
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[OUTPUT_KEY] = role
    old = [ly for ly in viewer.layers if ly.name == name and OUTPUT_KEY in ly.metadata]
    index = None
    if old:
        layer = old[0]
        if _update_in_place(layer, data, layer_type, metadata, kwargs):
            return layer
        index = viewer.layers.index(layer)
        viewer.layers.remove(layer)
    layer = getattr(viewer, f"add_{layer_type}")(data, name=name, metadata=metadata, **kwargs)
    if index is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    return layer


def _update_in_place(layer, data, layer_type, metadata, kwargs) -> bool:
    settable = _IN_PLACE.get(layer_type)
    if settable is None or type(layer).__name__.lower() != layer_type:
        return False
    if set(kwargs) - set(settable) - {"rgb"}:
        return False
    ndim = np.asarray(data).shape[1] if layer_type == "points" else np.ndim(data) - (
        1 if kwargs.get("rgb") else 0)
    if ndim != layer.ndim or bool(kwargs.get("rgb", False)) != bool(getattr(layer, "rgb", False)):
        return False
    if layer_type == "image" and "contrast_limits" not in kwargs:
        return False  # let napari work the range out for new data
    layer.data = data
    for key in settable:
        if key in kwargs:
            setattr(layer, key, kwargs[key])
    layer.metadata = metadata
    layer.refresh()
    return True


def find_output(viewer, name: str):
    for ly in viewer.layers:
        if ly.name == name and OUTPUT_KEY in ly.metadata:
            return ly
    return None


def fixed_lines(label, lines: int) -> None:
    """Word-wrap a magicgui Label and fix its height to ``lines`` lines of text, so the
    dock keeps its size when the text changes."""
    native = label.native
    native.setWordWrap(True)
    native.setFixedHeight(native.fontMetrics().lineSpacing() * lines + 6)


def show_error(message: str) -> None:
    """A napari notification (not a traceback)."""
    from napari.utils.notifications import show_error as _show

    _show(message)


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as _show

    _show(message)


# ------------------------------------------------------------------------ options form
_NONE_TEXT = ""


def _parse(text: str):
    text = text.strip()
    if text in ("", "None", "none"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _allows_none(annotation: str) -> bool:
    return bool(re.search(r"\bNone\b|\bOptional\[", annotation))


def literal_choices(annotation: str):
    """The values of a ``Literal[...]`` inside an annotation's text, or None."""
    start = annotation.find("Literal[")
    if start < 0:
        return None
    depth, i = 0, start + len("Literal[")
    for j in range(i, len(annotation)):
        if annotation[j] == "[":
            depth += 1
        elif annotation[j] == "]":
            if depth == 0:
                try:
                    values = ast.literal_eval("(" + annotation[i:j] + ",)")
                except (ValueError, SyntaxError):
                    return None
                return tuple(values)
            depth -= 1
    return None


def option_docs(doc: str) -> dict[str, tuple[str, str]]:
    """``{name: (type text, description)}`` from a numpydoc "Options" (or "Parameters")
    section; ``a, b : type`` documents both names."""
    out: dict[str, tuple[str, str]] = {}
    lines = (doc or "").splitlines()
    in_section = False
    current: list[str] = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() in ("Options", "Parameters") and set(nxt.strip()) == {"-"}:
            in_section = True
            continue
        if not in_section or set(line.strip()) == {"-"}:
            continue
        if line and not line.startswith(" "):
            if " : " in line or line.rstrip().endswith(" :") or line.rstrip().endswith(":"):
                names, _, type_text = line.partition(":")
                current = [n.strip() for n in names.split(",") if n.strip()]
                for name in current:
                    out[name] = (type_text.strip(), "")
                continue
            if line.strip() and not nxt.startswith(" "):
                in_section = False  # next section header
            continue
        for name in current:
            type_text, desc = out[name]
            out[name] = (type_text, (desc + " " + line.strip()).strip())
    return out


def doc_choices(type_text: str):
    """Choices a numpydoc type line lists: ``{"a", "b"}`` or ``"a", "b" or Transform``."""
    found = re.findall(r"""["']([^"']+)["']""", type_text)
    return tuple(found) if len(found) >= 2 else None


def points_world(layer) -> np.ndarray:
    """A Points layer's data in world coordinates (data * scale + translate)."""
    return np.asarray(layer.data, float) * np.asarray(layer.scale) + np.asarray(layer.translate)


class OptionsForm(Container):
    """Widgets for a method's keyword options, built from ``method_info(name)``:

    * choices (a ``Literal[...]`` annotation, or the numpydoc type line
      ``{"a", "b"}``) -> combo box;
    * bool -> checkbox; int -> spin box; float -> float spin box;
    * ``*_points`` options (paired landmarks) -> a Points layer picker, passed in world
      coordinates;
    * anything else (str, tuples, numbers that may be None) -> a line edit read as a
      Python literal ("" = None).

    Tooltips come from the option's docstring. Options whose default is not a plain
    value (e.g. ``init`` taking a Transform) keep their default.
    """

    def __init__(self, info: dict, points_choices=None, **kwargs):
        super().__init__(labels=True, **kwargs)
        self.defaults = dict(info.get("options", {}))
        annotations = dict(info.get("annotations", {}) or {})
        docs = option_docs(info.get("doc", ""))
        self._readers = {}
        for name, default in self.defaults.items():
            text = str(annotations.get(name, ""))
            type_text, help_text = docs.get(name, ("", ""))
            if name.endswith("_points") and default is None:
                if points_choices is None:
                    continue
                w = ComboBox(name=name, label=name, choices=points_choices, nullable=True,
                             value=None)
                w.tooltip = help_text or "a Points layer (world coordinates)"
                self.append(w)
                self._readers[name] = (lambda w=w: None if w.value is None else points_world(w.value))
                continue
            if name == "init" and not isinstance(default, str):
                continue  # a Transform: set from Python, not from a form
            choices = literal_choices(text)
            if choices is None and isinstance(default, str):
                choices = doc_choices(type_text)
                if choices is not None and default not in choices:
                    choices = None
            if choices is not None and _allows_none(text) and None not in choices:
                choices = (*choices, None)
            nullable = _allows_none(text) or default is None
            widget, reader = self._make(name, default, choices, nullable)
            tip = f"{name} (default {default!r})" + ("; empty = None" if nullable and not choices else "")
            widget.tooltip = f"{tip}: {help_text}" if help_text else tip
            self.append(widget)
            self._readers[name] = reader

    @staticmethod
    def _make(name, default, choices, nullable):
        if choices:
            opts = [("none" if c is None else str(c), c) for c in choices]
            w = ComboBox(name=name, label=name, choices=opts)
            if default in [c for _, c in opts]:
                w.value = default
            return w, lambda: w.value
        if nullable and not isinstance(default, bool):
            pass  # a number that may also be None: a line edit, "" = None
        elif isinstance(default, bool):
            w = CheckBox(name=name, label=name, value=default)
            return w, lambda: bool(w.value)
        elif isinstance(default, int):
            w = SpinBox(name=name, label=name, value=default, min=-10**9, max=10**9)
            return w, lambda: int(w.value)
        elif isinstance(default, float):
            text = np.format_float_positional(default, trim="-")
            decimals = max(2, len(text.partition(".")[2]) + 1)
            step = float(f"{abs(default) / 10:.1g}") if default else 0.1
            w = FloatSpinBox(name=name, label=name, min=-1e12, max=1e12, step=step)
            w.native.setDecimals(decimals)  # before the value: Qt rounds to the decimals
            w.value = default
            return w, lambda: float(w.value)
        w = LineEdit(name=name, label=name, value=_NONE_TEXT if default is None else
                     (default if isinstance(default, str) else repr(default)))
        if isinstance(default, str) and not nullable:
            return w, lambda: (w.value.strip() or default)
        return w, lambda: _parse(w.value)

    def values(self, changed_only: bool = True) -> dict:
        """Options to pass to ``register``; by default only those that differ from the
        backend's defaults (so the recorded options stay short)."""
        out = {}
        for name, reader in self._readers.items():
            value = reader()
            default = self.defaults[name]
            same = (value is None and default is None) if (
                isinstance(value, np.ndarray) or isinstance(default, np.ndarray)) else value == default
            if not changed_only or not same:
                out[name] = value
        return out

    def set(self, **values) -> None:
        for name, value in values.items():
            getattr(self, name).value = value


# ------------------------------------------------------------------------- threading
class ProgressBridge(QObject):
    """Created on the GUI thread; a worker thread calls ``progress.emit`` and Qt queues
    the call to the connected slots on the GUI thread."""

    progress = Signal(float, str)


def tidy(values: Iterable[float], digits: int = 4) -> str:
    return ", ".join(f"{v:.{digits}g}" for v in values)
