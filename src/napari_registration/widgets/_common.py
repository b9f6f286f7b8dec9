"""Helpers shared by the dock widgets: layer geometry, output layers that replace
themselves on re-run, an options form built from a method's defaults, and a Qt signal
bridge that carries progress from a worker thread to the GUI thread."""

from __future__ import annotations

import ast
import inspect
import re
import types
import typing
from typing import Any, Iterable

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, LineEdit
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


# docks wait this long after a layer removal before touching their UI: the layer list
# settles first (a notification or a label resize mid-removal segfaulted software GL)
SETTLE_MS = 50


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


#: the default level to register: the coarsest with at least this many pixels on a
#: side (large-image tools register a ~1-2k px thumbnail first)
LEVEL_MIN_SIDE = 1000


def levels(layer) -> list:
    """The arrays of an Image layer, fine to coarse (one for a single-scale layer)."""
    return list(layer.data) if getattr(layer, "multiscale", False) else [layer.data]


def level_shape(layer, level: int) -> tuple:
    """Spatial shape of one level (an RGB layer's colour axis left out)."""
    shape = tuple(levels(layer)[level].shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def level_spacing(layer, level: int) -> tuple:
    """World size of a pixel of ``level``: napari shows level i with ``scale *
    shape_0 / shape_i`` per axis (same ``translate``)."""
    s0, si = np.asarray(level_shape(layer, 0), float), np.asarray(level_shape(layer, level), float)
    return tuple(float(v) for v in np.asarray(layer.scale, float) * s0 / si)


def default_level(layer, min_side: int = LEVEL_MIN_SIDE) -> int:
    """The coarsest level whose smallest side has at least ``min_side`` pixels (the
    finest level if none has)."""
    ok = [i for i in range(len(levels(layer))) if min(level_shape(layer, i)) >= min_side]
    return max(ok) if ok else 0


def spatial_ndim(layer) -> int:
    """Number of spatial axes (an RGB image's colour axis does not count)."""
    return layer.ndim


def scale_translate(layer) -> tuple[tuple, tuple]:
    """(spacing, origin): napari ``scale`` and ``translate``, the grid the core works
    on. Whatever else places the layer (rotate, shear, affine) is :func:`placement`."""
    return tuple(float(v) for v in layer.scale), tuple(float(v) for v in layer.translate)


def placement(layer) -> np.ndarray:
    """Homogeneous matrix from the layer's scale/translate world (``data * scale +
    translate``, where the core registers it) to the world napari displays it in
    (``affine @ (translate + rotate @ shear @ scale @ data)``): the identity unless
    the layer is rotated, sheared or has an affine. Raises ValueError if napari's
    placement cannot be inverted (a zero scale, a degenerate affine)."""
    sp, org = scale_translate(layer)
    grid = np.eye(len(sp) + 1)
    grid[:-1, :-1] = np.diag(sp)
    grid[:-1, -1] = org
    full = affine_matrix(layer) @ physical_matrix(layer)
    if abs(np.linalg.det(grid)) < 1e-12 or abs(np.linalg.det(full)) < 1e-12:
        raise ValueError(f"layer {layer.name!r} is placed by a matrix that cannot be "
                         "inverted (a zero scale or a degenerate affine/shear): fix its "
                         "scale/affine first")
    return full @ np.linalg.inv(grid)


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


_IN_PLACE = {"image": ("scale", "translate", "rotate", "shear", "affine", "colormap",
                       "contrast_limits", "blending", "visible", "opacity"),
             "labels": ("scale", "translate", "affine", "opacity"),
             "points": ("scale", "translate", "size", "face_color", "border_color"),
             # removing and re-adding a Vectors layer of ~3,800 matches took ~1 s
             "vectors": ("scale", "translate", "edge_color", "edge_width", "length")}


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
    if kwargs.get("multiscale") or getattr(layer, "multiscale", False):
        return False  # a pyramid: replaced as a whole
    settable = _IN_PLACE.get(layer_type)
    if settable is None or type(layer).__name__.lower() != layer_type:
        return False
    if set(kwargs) - set(settable) - {"rgb"}:
        return False
    ndim = (np.asarray(data).shape[1] if layer_type == "points"
            else np.asarray(data).shape[-1] if layer_type == "vectors"
            else np.ndim(data) - (1 if kwargs.get("rgb") else 0))
    if ndim != layer.ndim or bool(kwargs.get("rgb", False)) != bool(getattr(layer, "rgb", False)):
        return False
    if layer_type == "image" and "contrast_limits" not in kwargs:
        return False  # let napari work the range out for new data
    layer.data = data  # napari refreshes the layer for new data
    for key in settable:
        # each change of a property makes napari refresh the layer again (~10-20 ms of
        # GUI thread each, measured): set only what differs
        if key in kwargs and not _same_value(getattr(layer, key, None), kwargs[key]):
            setattr(layer, key, kwargs[key])
    layer.metadata = metadata
    return True


def _same_value(current, new) -> bool:
    if hasattr(current, "affine_matrix"):
        current = current.affine_matrix
    if key_like(current) or key_like(new):
        return str(getattr(current, "name", current)) == str(getattr(new, "name", new))
    try:
        a, b = np.asarray(current, float), np.asarray(new, float)
    except (TypeError, ValueError):
        return False
    return a.shape == b.shape and np.allclose(a, b)


def key_like(value) -> bool:
    """A colormap, blending mode or other named setting (compared by name)."""
    return isinstance(value, str) or (hasattr(value, "name") and not hasattr(value, "shape"))


def colour_checkerboard(a, b, tile: float | None = None, spacing=None) -> np.ndarray:
    """:func:`core.qc.checkerboard` as RGB: tiles of ``a`` in green, tiles of ``b`` in
    magenta, so tile borders stay visible when the two line up perfectly (a grey
    checkerboard of a good alignment shows no borders at all). Shape ``a.shape + (3,)``,
    float32 in [0, 1]; the brightest channel of each pixel is the grey checkerboard."""
    from ..core.qc import checkerboard

    a = np.asarray(a)
    board = checkerboard(a, b, tile=tile, spacing=spacing)
    spacing = np.ones(a.ndim) if spacing is None else np.asarray(spacing, float)
    if tile is None:
        tile = float(np.min(np.asarray(a.shape) * spacing)) / 8
    parity = np.zeros(a.shape, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(a.shape, spacing)):
        shape = [1] * a.ndim
        shape[axis] = n
        parity = parity + (np.arange(n) * s // tile).astype(np.int64).reshape(shape)
    first = (parity % 2 == 0)
    rgb = np.zeros(a.shape + (3,), np.float32)
    rgb[..., 1] = np.where(first, board, 0.0)
    rgb[..., 0] = rgb[..., 2] = np.where(first, 0.0, board)
    return rgb


def find_output(viewer, name: str):
    for ly in viewer.layers:
        if ly.name == name and OUTPUT_KEY in ly.metadata:
            return ly
    return None


def fixed_lines(label, lines: int) -> None:
    """Word-wrap a magicgui Label and fix its height to ``lines`` lines of text, so the
    dock keeps its size when the text changes."""
    from qtpy.QtWidgets import QSizePolicy

    native = label.native
    native.setWordWrap(True)
    native.setFixedHeight(native.fontMetrics().lineSpacing() * lines + 6)
    # and never widens the dock: it wraps to the width it is given
    native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    native.setMinimumWidth(0)


def show_error(message: str) -> None:
    """A napari notification (not a traceback)."""
    from napari.utils.notifications import show_error as _show

    _show(message)


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as _show

    _show(message)


def points_world(layer) -> np.ndarray:
    """A Points layer's data in world coordinates (data * scale + translate)."""
    return np.asarray(layer.data, float) * np.asarray(layer.scale) + np.asarray(layer.translate)


# ------------------------------------------------------------------------ options form
def option_docs(func) -> dict[str, str]:
    """``{option: description}`` from a function's numpydoc docstring (its "Parameters"
    or, as the backends write it, "Options" section); ``a, b : type`` documents both."""
    import docstring_parser

    doc = inspect.getdoc(func) or ""
    doc = re.sub(r"^Options\n-+$", "Parameters\n----------", doc, flags=re.MULTILINE)
    out: dict[str, str] = {}
    for param in docstring_parser.parse(doc, docstring_parser.DocstringStyle.NUMPYDOC).params:
        for name in param.arg_name.split(","):
            if name.strip():
                out[name.strip()] = " ".join((param.description or "").split())
    return out


def option_hints(func) -> dict[str, Any]:
    """The resolved type hints of a function (``from __future__ import annotations``
    leaves them as strings); {} where they cannot be resolved."""
    try:
        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - a name only known to a type checker
        pass
    # one by one, so one unresolvable annotation costs only its own option's hint
    names = {"Literal": typing.Literal, "Optional": typing.Optional, "Union": typing.Union,
             "Any": typing.Any, "Sequence": typing.Sequence}
    out = {}
    for name, text in getattr(func, "__annotations__", {}).items():
        if not isinstance(text, str):
            out[name] = text
            continue
        try:
            out[name] = eval(text, dict(getattr(func, "__globals__", {})), names)  # noqa: S307
        except Exception:  # noqa: BLE001
            continue
    return out


def _split_hint(hint):
    """(literal values or None, None allowed, the other members) of a type hint."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else (hint,)
    literals, others, none_ok = None, [], False
    for m in members:
        if m is type(None):
            none_ok = True
        elif typing.get_origin(m) is typing.Literal:
            literals = (literals or ()) + typing.get_args(m)
        else:
            others.append(m)
    return literals, none_ok, others


def _parse(text: str):
    text = text.strip()
    if text in ("", "None", "none"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _float_widget(name, default, **kw):
    from magicgui.widgets import create_widget

    text = np.format_float_positional(default, trim="-")
    decimals = max(2, len(text.partition(".")[2]) + 1)
    step = float(f"{abs(default) / 10:.1g}") if default else 0.1
    w = create_widget(annotation=float, name=name,
                      options=dict(min=-1e12, max=1e12, step=step, **kw))
    w.native.setDecimals(decimals)  # before the value: Qt rounds to the decimals
    w.value = default
    return w


class OptionalNumber(Container):
    """A number that may also be None (the backend then chooses): a check box "set"
    and a spin box; unchecked reads as None."""

    def __init__(self, name, default, kind, example, tooltip=""):
        super().__init__(name=name, label=name, layout="horizontal", labels=False)
        start = example if default is None else default
        if kind is int:
            from magicgui.widgets import create_widget

            self.number = create_widget(value=int(start), annotation=int,
                                        options=dict(min=-10**9, max=10**9))
        else:
            self.number = _float_widget("number", float(start))
        self.number.native.setMinimumWidth(70)
        self.number.native.setMaximumWidth(140)
        self.use = CheckBox(text="set", value=default is not None)
        self.number.enabled = default is not None
        self.use.changed.connect(lambda on: setattr(self.number, "enabled", bool(on)))
        self.extend([self.use, self.number])
        self.margins = (0, 0, 0, 0)
        self.tooltip = tooltip

    @property
    def value(self):
        return self.number.value if self.use.value else None

    @value.setter
    def value(self, v):
        self.use.value = v is not None
        if v is not None:
            self.number.value = v


#: a start value for optional numbers whose default is None (shown when "set")
_EXAMPLES = {int: 1, float: 0.1}


def option_widget(name, default, hint, help_text="", points_choices=None):
    """One form field for a backend option, from its default and type hint:

    * ``Literal[...]`` (also inside a union, e.g. ``Literal["auto", ...] | Transform``)
      -> drop-down (with "none" if ``None`` is allowed);
    * ``bool`` -> check box; ``int``/``float`` -> spin box; ``int | None``,
      ``float | None`` -> :class:`OptionalNumber`; ``str`` -> line edit;
    * ``*_points`` (paired landmarks) -> a Points layer picker, read in world units;
    * anything else (tuples, sequences) -> a line edit read as a Python literal ("" =
      None).

    Returns ``(widget, reader)`` or None for an option that is set from Python only
    (e.g. an ``init`` Transform). The tooltip is the docstring's description."""
    from magicgui.widgets import create_widget

    literals, none_ok, others = _split_hint(hint)
    tip = f"{name} (default {default!r})" + (f": {help_text}" if help_text else "")
    if name.endswith("_points") and default is None:
        if points_choices is None:
            return None
        w = ComboBox(name=name, label=name, choices=points_choices, nullable=True, value=None)
        w.tooltip = help_text or "a Points layer (world coordinates)"
        return w, (lambda: None if w.value is None else points_world(w.value))
    if literals is not None:
        if default not in literals and not (none_ok and default is None):
            return None
        if none_ok or default is None:
            choices = [(str(v), v) for v in literals] + [("none", None)]
            w = ComboBox(name=name, label=name, choices=choices, value=default, tooltip=tip)
        else:
            w = create_widget(value=default, annotation=typing.Literal[tuple(literals)],
                              name=name, label=name, options={"tooltip": tip})
        return w, (lambda: w.value)
    plain = others[0] if len(others) == 1 else None
    if isinstance(default, bool) and (plain is bool or plain is None or not others):
        w = create_widget(value=default, annotation=bool, name=name, label=name,
                          options={"tooltip": tip})
        return w, (lambda: bool(w.value))
    if plain in (int, float) and (none_ok or default is None):
        w = OptionalNumber(name, default, plain, _EXAMPLES[plain],
                           tooltip=tip + " (unchecked: None, the method chooses)")
        return w, (lambda: w.value)
    if plain is int or (plain is None and not others and type(default) is int):
        w = create_widget(value=default, annotation=int, name=name, label=name,
                          options={"tooltip": tip, "min": -10**9, "max": 10**9})
        return w, (lambda: int(w.value))
    if plain is float or (plain is None and not others and type(default) is float):
        w = _float_widget(name, float(default), tooltip=tip)
        w.label = name
        return w, (lambda: float(w.value))
    if plain is str and isinstance(default, str):
        w = create_widget(value=default, annotation=str, name=name, label=name,
                          options={"tooltip": tip})
        return w, (lambda: w.value.strip() or default)
    if default is not None and not isinstance(default, (str, int, float, tuple, list)):
        return None  # e.g. an object: set from Python, not from a form
    w = LineEdit(name=name, label=name, value=_literal_text(default),
                 tooltip=tip + ("; empty = None" if none_ok or default is None else ""))
    w.literal = True  # read as a Python literal: see OptionsForm.set
    return w, (lambda: _parse(w.value))


def _literal_text(value) -> str:
    return "" if value is None else repr(value)


class Collapsible(Container):
    """A magicgui Container showing ``inner`` in a foldable ``superqt.QCollapsible``
    (ships with napari), folded unless ``expanded``. ``reset_choices`` reaches the
    pickers inside."""

    def __init__(self, inner, title: str, expanded: bool = False):
        from superqt import QCollapsible

        super().__init__(labels=False, name=title.lower().replace(" ", "_"), label=" ")
        self.margins = (0, 0, 0, 0)
        self.inner = inner
        self.collapsible = QCollapsible(title)
        self.collapsible.addWidget(inner.native)
        if expanded:
            self.collapsible.expand(animate=False)
        else:
            self.collapsible.collapse(animate=False)
        self.native.layout().addWidget(self.collapsible)

    def reset_choices(self, *_):
        self.inner.reset_choices()


def collapsible(container, title: str, expanded: bool = False) -> Collapsible:
    return Collapsible(container, title, expanded)


class OptionsForm(Container):
    """The options form of a backend entry function (``backends/*.register``), built
    with magicgui from its signature, type hints and numpydoc docstring (see
    :func:`option_widget`). Options named in ``basic`` (at most ~5) are shown; the
    others sit in a folded "Advanced" section (``self.advanced``).

    ``form.values()`` -> the options that differ from the function's defaults;
    ``form.set(name=value, ...)``; ``form.fields`` -> {name: widget} of every option.
    """

    def __init__(self, func, points_choices=None, basic=None, **kwargs):
        super().__init__(labels=True, **kwargs)
        self.margins = (0, 0, 0, 0)
        sig = inspect.signature(func)
        hints = option_hints(func)
        docs = option_docs(func)
        from ..core.register import _BACKEND_PLUMBING

        skip = set(_BACKEND_PLUMBING)  # what the core passes, not the user
        self.defaults: dict[str, Any] = {}
        self.fields: dict[str, Any] = {}
        self._readers = {}
        self.advanced = Container(labels=True, name="advanced")
        self.advanced.margins = (0, 0, 0, 0)
        for name, p in sig.parameters.items():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or name in skip:
                continue
            made = option_widget(name, p.default, hints.get(name, typing.Any),
                                 docs.get(name, ""), points_choices)
            if made is None:
                continue
            widget, reader = made
            self.defaults[name] = p.default
            self.fields[name] = widget
            self._readers[name] = reader
            if basic is None or name in basic:
                self.append(widget)
            else:
                self.advanced.append(widget)
        self.advanced_section = None
        if len(self.advanced):
            self.advanced_section = collapsible(self.advanced, f"Advanced ({len(self.advanced)})")
            self.append(self.advanced_section)

    def __getattr__(self, name):
        fields = self.__dict__.get("fields")
        if fields is not None and name in fields:
            return fields[name]
        return super().__getattr__(name)

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
            if name not in self.fields:
                raise ValueError(f"no option {name!r} in this form; options: {list(self.fields)}")
            widget = self.fields[name]
            if getattr(widget, "literal", False) and not isinstance(value, str):
                value = _literal_text(value)
            widget.value = value

    def reset(self) -> None:
        """Every option back to the backend's default."""
        self.set(**self.defaults)


# ------------------------------------------------------------------------- threading
class ProgressBridge(QObject):
    """Created on the GUI thread; a worker thread calls ``progress.emit`` and Qt queues
    the call to the connected slots on the GUI thread."""

    progress = Signal(float, str)


def tidy(values: Iterable[float], digits: int = 4) -> str:
    return ", ".join(f"{v:.{digits}g}" for v in values)
