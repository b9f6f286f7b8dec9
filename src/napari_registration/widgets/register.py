"""*Register images*: pick a fixed and a moving layer, a method and its options, run
:func:`napari_registration.register` in a worker thread, and push the result back as
layers (warped image, checkerboard, difference, keypoints and matches).

The options form is built from ``method_info(method)``, so a new backend shows up here
without changes to this file.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from qtpy.QtCore import QTimer
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)

from ..core.register import (
    RegistrationCancelled,
    RegistrationError,
    available_methods,
    method_info,
    register,
)
from ._common import (
    OptionsForm,
    ProgressBridge,
    collapsible,
    colour_checkerboard,
    affine_matrix,
    find_output,
    default_level,
    fixed_lines,
    image_data,
    is_output,
    layer_choices,
    level_shape,
    level_spacing,
    levels,
    placement,
    put_layer,
    same_layer,
    scale_translate,
    show_error,
    show_info,
)
from ..core.transform import Transform

PROGRESS_INTERVAL = 0.25  # s between progress updates of the widget
# said where a preset would explain itself (the label keeps a fixed height either way)
CUSTOM_NOTE = ("No preset: set method, transform and options below, or pick a preset "
               "for your kind of data.")
MAX_KEYPOINTS_SHOWN = 500  # per image, in the keypoint layers (all matches are shown)
# a lazy multiscale result (benchmarks/bench_gui_slide.py): blocks this size compute in
# tens of ms each, and the levels up to this many pixels are computed in the worker
DISPLAY_CHUNKS = 512
EAGER_PIXELS = 8 * 2 ** 20  # 2896^2: a slide's 2500^2 level (19 MB RGB) is ready

RESAMPLE = "resample"
AFFINE = "affine"

NOTE_3D = ("3D: the result is resampled onto the fixed grid. napari cannot slice a volume "
           "whose affine rotates out of plane in the 2D view, so 'set moving affine' is "
           "only a 3D-view preview.")


#: the options each method shows at first; the rest are under "Advanced"
BASIC_OPTIONS = {
    "fourier": ("upsample", "lowpass", "refine"),
    "features": ("detector", "n_features", "ratio", "estimator", "reproj_threshold"),
    "intensity": ("metric", "optimizer", "iterations", "sampling_percentage", "seed"),
    "landmarks": ("fixed_points", "moving_points", "regularization"),
    "auto": ("metric", "use_features", "refine", "seed"),
}

CUSTOM = "custom (set everything below)"

#: presets by kind of data: (method, transform, options, why). Options not named keep
#: the method's defaults; the user can change everything afterwards.
PRESETS = {
    "two channels / same sample": (
        "fourier", "rigid", {},
        "channels of one sample are offset by a small shift and rotation: Fourier phase "
        "correlation, rigid (fast, sub-pixel)"),
    "time-lapse drift": (
        "fourier", "translation", {},
        "drift between frames is a shift: Fourier phase correlation, translation (for a "
        "whole movie use the Register stack dock)"),
    "CT/MR volumes (same modality)": (
        "intensity", "rigid", {"metric": "correlation", "seed": 0},
        "same contrast: intensity (SimpleITK), rigid, correlation metric, seeded "
        "sampling (reproducible)"),
    "CT/MR volumes (different modality)": (
        "intensity", "rigid", {"metric": "mattes", "seed": 0},
        "different contrast (e.g. T1 vs T2, CT vs MR): intensity, rigid, Mattes mutual "
        "information, seeded sampling"),
    "slides and photos": (
        "features", "affine", {"detector": "sift", "estimator": "usac_magsac"},
        "textured 2D images, any rotation/scale: SIFT keypoints, MAGSAC, affine (try "
        "homography for photos taken at an angle)"),
    "deformable tissue": (
        "intensity", "bspline", {"metric": "mattes", "seed": 0},
        "tissue that bends: an affine stage, then a B-spline (intensity, Mattes mutual "
        "information); check the result with the checkerboard"),
}


def _backend_function(method: str):
    from ..core.register import _backend

    return _backend(method).register


class RegisterWidget(Container):
    """Dock widget: register a moving Image layer onto a fixed Image layer.

    ``make_worker()`` returns the unstarted worker of a run (tests start it inside
    ``qtbot.waitSignal(worker.finished)``); the *Register* button starts it.

    Layout for a 1280x800 screen: everything scrolls; a preset by kind of data,
    the layers, the method with its few basic options, then folded sections
    ("Advanced" options of the method, "Preprocessing and output").
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):  # noqa: F821
        super().__init__(labels=False)
        self.viewer = napari_viewer
        images = layer_choices(napari_viewer, "image")
        labels = layer_choices(napari_viewer, "labels")
        self.preset = ComboBox(label="preset", choices=[CUSTOM, *PRESETS], value=CUSTOM,
                               tooltip="a kind of data: sets method, transform and options")
        self.preset_note = Label(label="", value=CUSTOM_NOTE)
        self.fixed = ComboBox(label="fixed", choices=images, nullable=True)
        self.moving = ComboBox(label="moving", choices=images, nullable=True)
        self.level = ComboBox(label="pyramid level", choices=self._level_choices,
                              tooltip="multiscale layers: the level registered (the transform "
                                      "is in world units, so it applies to every level)")
        methods = available_methods()
        self.method = ComboBox(label="method", choices=methods,
                               value="fourier" if "fourier" in methods else methods[0])
        self.description = Label(label="")
        self.transform = ComboBox(label="transform", choices=self._transform_choices)
        self._points = layer_choices(napari_viewer, "points")
        self.method_options = self._make_form(self.method.value)
        self.equalize = ComboBox(label="equalize",
                                 choices=[("none", None), ("histogram", "hist"), ("CLAHE", "clahe")])
        self.smooth = FloatSpinBox(label="smooth (world σ)", value=0.0, min=0.0, max=1000.0, step=0.5)
        self.fixed_mask = ComboBox(label="fixed mask", choices=labels, nullable=True, value=None)
        self.moving_mask = ComboBox(label="moving mask", choices=labels, nullable=True, value=None)
        self.output = ComboBox(label="output", choices=[
            ("new layer, resampled on the fixed grid", RESAMPLE),
            ("set moving layer's affine (linear, no resampling)", AFFINE),
        ])
        self.overlay = CheckBox(label="green/magenta", value=True,
                                tooltip="colour fixed green and result magenta, additive")
        self.checkerboard = CheckBox(label="checkerboard", value=True,
                                     tooltip="tiles of fixed (green) and result (magenta)")
        self.tile = FloatSpinBox(label="tile (world, 0=auto)", value=0.0, min=0.0, max=1e6, step=1.0)
        self.difference = CheckBox(label="difference", value=False)
        self.show_matches = CheckBox(
            label="keypoints + matches", value=False,
            tooltip="features/auto: add the keypoints (Points) and inlier matches (Vectors) "
                    "as layers")
        self.note = Label(label="")
        self.run_button = PushButton(text="Register")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="", min=0, max=1000, value=0)
        self.status = Label(label="", value="")
        self.summary = Label(label="", value="")
        try:
            from qtpy.QtGui import QFontDatabase

            self.summary.native.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        except Exception:  # pragma: no cover - cosmetic
            pass
        # labels whose text changes keep a fixed height: a dock that grows or shrinks
        # while napari removes a layer made the software-OpenGL canvas segfault (the
        # window relayout and the removal's redraw coincide; measured under Xvfb)
        for label, lines in ((self.preset_note, 3), (self.description, 3), (self.note, 2),
                             (self.status, 2), (self.summary, 9)):
            fixed_lines(label, lines)
        self.main = Container(labels=True, name="main")
        self.main.extend([self.preset, self.preset_note, self.fixed, self.moving, self.level,
                          self.method,
                          self.description, self.transform])
        self.main.margins = (0, 0, 0, 0)
        self.options_box = Container(labels=False, name="options_box")
        self.options_box.margins = (0, 0, 0, 0)
        self.options_box.append(self.method_options)
        self.more = Container(labels=True, name="more")
        self.more.extend([self.equalize, self.smooth, self.fixed_mask, self.moving_mask,
                          self.output, self.overlay, self.checkerboard, self.tile,
                          self.difference, self.show_matches])
        buttons = Container(layout="horizontal", labels=False, name="buttons")
        buttons.margins = (0, 0, 0, 0)
        buttons.extend([self.run_button, self.cancel_button])
        # everything scrolls inside the dock (napari docks the Container's inner widget,
        # so magicgui's own scrollable=True would be bypassed): the dock fits a
        # 1280x800 screen whatever is unfolded
        self.body = Container(labels=False, name="body")
        self.body.extend([self.main, self.options_box,
                          collapsible(self.more, "Preprocessing and output"),
                          self.note, buttons, self.progress, self.status, self.summary])
        from qtpy.QtWidgets import QFrame, QScrollArea

        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setWidget(self.body.native)
        self.native.layout().addWidget(self.scroll)
        self.margins = (0, 0, 0, 0)
        self.native.setMinimumWidth(340)

        self._summary_lines = 9
        self._bridge = ProgressBridge()
        self._bridge.progress.connect(self._on_progress)
        self._worker = None
        self._cancel_event: threading.Event | None = None
        self._started_at = 0.0
        self._last: dict | None = None  # inputs + result of the last run, for the tile spin box
        self.timing: dict = {}
        self._running = False  # from the click until the results are placed
        self._worker_running = False
        self._placing = False
        self._run_inputs = None  # (fixed, moving) of the running registration
        self._aborted: str | None = None  # why the running registration was cancelled
        self._outcome_shown = False
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)

        self.method.changed.connect(self._on_method)
        self.preset.changed.connect(self._on_preset)
        # choosing the shown preset again (after changing the method) applies it again
        self.preset.native.activated.connect(lambda *_: self._on_preset(self.preset.value))
        self._applying_preset = False
        self.fixed.changed.connect(self._forget)
        self.moving.changed.connect(self._forget)
        self.fixed.changed.connect(self._on_fixed)
        self.moving.changed.connect(self._on_fixed)
        self.output.changed.connect(self._on_fixed)
        self.tile.changed.connect(self._refresh_checkerboard)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.reset_choices()
        self._default_layers()
        self._on_method(self.method.value)

    # ------------------------------------------------------------------ form updates
    def reset_choices(self, *_):
        """napari calls this when layers are added, removed, moved or renamed. magicgui
        matches the previous choice by its *name*, so a rename would silently switch a
        picker to another layer: keep each picker on the layer it showed."""
        keep = [(w, w.value) for w in self._pickers()]
        super().reset_choices()
        if hasattr(self, "body"):
            self.body.reset_choices()
        for widget, old in keep:
            if old is None:
                continue
            match = [c for c in widget.choices if c is not None and same_layer(c, old)]
            if match and not same_layer(widget.value, old):
                widget.value = match[0]
            elif not match and widget.value is not None:
                widget.value = None  # the layer is gone: pick a default below
        if self.fixed.value is None or self.moving.value is None:
            self._default_layers()

    def _pickers(self):
        return [w for w in (getattr(self, n, None) for n in
                            ("fixed", "moving", "fixed_mask", "moving_mask")) if w is not None]

    def _default_layers(self):
        """Bottom-most input image as fixed, the next one as moving; our own outputs
        (``<moving> registered``, checkerboards...) are never picked by default."""
        layers = [c for c in self.fixed.choices if c is not None and not is_output(c)]
        if self.fixed.value is None and layers:
            self.fixed.value = layers[-1]  # bottom-most image: usually the reference
        if self.moving.value is None:
            others = [ly for ly in layers if not same_layer(ly, self.fixed.value)]
            if others:
                self.moving.value = others[0]

    def _forget(self, *_):
        """A new selection: the tile spin box must not redraw the previous result."""
        self._last = None

    def _transform_choices(self, widget=None):
        return list(method_info(self.method.value)["transforms"])

    def _make_form(self, method: str) -> OptionsForm:
        return OptionsForm(_backend_function(method), self._points,
                           basic=BASIC_OPTIONS.get(method), name="method_options")

    def _on_method(self, name):
        if not getattr(self, "_applying_preset", True) and self.preset.value != CUSTOM:
            # the user left the preset's method: the preset no longer describes the form
            self.preset.value = CUSTOM
            self.preset_note.value = f"Method changed to {name}: no preset applies."
        # import what the method needs now, while the user is still choosing, rather
        # than on the click (SimpleITK: ~0.3-0.5 s of GUI thread, once)
        QTimer.singleShot(0, lambda: _warm_up(self.method.value))
        info = method_info(name)
        self.description.value = info["description"]
        self.transform.reset_choices()  # keeps the current choice if the method has it
        self.options_box.remove(self.method_options)
        self.method_options = self._make_form(name)
        self.options_box.append(self.method_options)
        self._fit_width()
        self._on_fixed()

    def _fit_width(self):
        """Open the dock as wide as the form needs, up to 520 px (a 1280 px screen
        keeps the canvas); beyond that the form scrolls sideways."""
        if hasattr(self, "scroll"):
            from qtpy.QtWidgets import QComboBox

            for combo in self.body.native.findChildren(QComboBox):
                # a long entry (a layer name, an option) must not widen the whole dock
                combo.setSizeAdjustPolicy(
                    QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
                combo.setMinimumContentsLength(12)
            bar = self.scroll.verticalScrollBar().sizeHint().width()
            need = self.body.native.minimumSizeHint().width() + bar + 4
            self.scroll.setMinimumWidth(min(need, 520))

    def _on_preset(self, name):
        """Set method, transform and options for a kind of data, and say so."""
        if name not in PRESETS:
            self.preset_note.value = CUSTOM_NOTE
            return
        method, transform, options, why = PRESETS[name]
        if method not in available_methods():
            self.preset_note.value = f"{name}: needs the {method!r} method, not installed"
            return
        self._applying_preset = True
        try:
            if self.method.value != method:
                self.method.value = method  # rebuilds the form with the method's defaults
            else:
                self.method_options.reset()
        finally:
            self._applying_preset = False
        if transform in self.transform.choices:
            self.transform.value = transform
        self.method_options.set(**options)
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        self.preset_note.value = (f"Preset: {method} / {transform}" + (f", {shown}" if shown else "")
                                  + f". {why}. Change anything below.")

    def _level_choices(self, widget=None):
        layer = next((ly for ly in (self.fixed.value, self.moving.value)
                      if ly is not None and getattr(ly, "multiscale", False)), None)
        if layer is None:
            return [("(single-scale layers)", None)]
        auto = default_level(layer)
        return [(f"auto: {auto} ({' x '.join(map(str, level_shape(layer, auto)))})", None)] + [
            (f"{i}: {' x '.join(map(str, level_shape(layer, i)))}", i)
            for i in range(len(levels(layer)))]

    def _pick_level(self, layer) -> int:
        if not getattr(layer, "multiscale", False):
            return 0
        choice = self.level.value
        return default_level(layer) if choice is None else min(int(choice), len(levels(layer)) - 1)

    def _on_fixed(self, *_):
        layer = self.fixed.value
        if hasattr(self, "level"):
            self.level.reset_choices()
            self.level.visible = any(getattr(ly, "multiscale", False)
                                     for ly in (self.fixed.value, self.moving.value)
                                     if ly is not None)
        notes = []
        if layer is not None and layer.ndim >= 3:
            if self.output.value == AFFINE:
                notes.append(NOTE_3D)
            else:
                notes.append("3D: the result is resampled onto the fixed grid.")
        ndims = method_info(self.method.value)["ndims"]
        if layer is not None and ndims is not None and layer.ndim not in ndims:
            notes.append(f"{self.method.value} works on "
                         f"{'/'.join(f'{d}D' for d in ndims)} images only.")
        self.note.value = " ".join(notes)

    # ---------------------------------------------------------------------- running
    def _collect(self) -> dict:
        """Everything the worker needs, read on the GUI thread. Raises ValueError."""
        fixed, moving = self.fixed.value, self.moving.value
        if fixed is None or moving is None:
            raise ValueError("pick a fixed and a moving Image layer (open two images first)")
        if same_layer(fixed, moving):
            raise ValueError("fixed and moving are the same layer: pick two different layers")
        f_sp, f_or = scale_translate(fixed)
        m_sp, m_or = scale_translate(moving)
        # pyramids: register one level each, with that level's pixel size
        f_level, m_level = self._pick_level(fixed), self._pick_level(moving)
        f_sp, m_sp = level_spacing(fixed, f_level), level_spacing(moving, m_level)
        # a layer napari already moves (rotate, shear, affine: a manual alignment, a
        # file's orientation) is registered in the world napari shows: its current
        # placement relative to the fixed layer is where the registration starts
        if fixed.ndim == moving.ndim:
            f_place, m_place = placement(fixed), placement(moving)
        else:  # register() says what to do about it
            f_place, m_place = np.eye(fixed.ndim + 1), np.eye(moving.ndim + 1)
        start = np.linalg.inv(f_place) @ m_place if fixed.ndim == moving.ndim else np.eye(1)
        # (start: moving grid world -> fixed grid world)
        options = self.method_options.values()
        moved = not np.allclose(start, np.eye(start.shape[0]), atol=1e-9)
        start_note = ""
        if moved:
            form = self.method_options.fields
            if "init" in form and form["init"].value == "auto":
                options["init"] = Transform(start)
                start_note = "started from the moving layer's current placement"
            else:
                start_note = (f"{self.method.value} takes no starting transform: the images "
                              "alone decide; the moving layer's current placement is replaced")
        options.update(equalize=self.equalize.value, smooth=float(self.smooth.value))
        if fixed.rgb == moving.rgb:
            options["rgb"] = bool(fixed.rgb)
        for key, layer in (("fixed_mask", self.fixed_mask.value), ("moving_mask", self.moving_mask.value)):
            if layer is not None:
                options[key] = np.asarray(image_data(layer)) != 0
        return dict(
            fixed=fixed, moving=moving,
            fixed_data=levels(fixed)[f_level], moving_data=levels(moving)[m_level],
            fixed_level=f_level, moving_level=m_level,
            method=self.method.value, transform=self.transform.value,
            fixed_spacing=f_sp, fixed_origin=f_or, moving_spacing=m_sp, moving_origin=m_or,
            options=options, output=self.output.value, show_matches=bool(self.show_matches.value),
            fixed_placement=f_place, moving_placement=m_place, start_note=start_note,
            pyramid=_pyramid_geometry(fixed, moving, f_level, m_level),
        )

    def make_worker(self):
        """Read the form and return an unstarted worker (None if the form is invalid,
        after showing why). Its ``returned`` signal carries ``(outcome, payload)``."""
        from napari.qt.threading import create_worker

        try:
            params = self._collect()
        except ValueError as err:
            self._refused(str(err))
            return None
        cancel_event = threading.Event()
        bridge = self._bridge
        _warm_up(params["method"])  # done already when the method was chosen: no cost
        qc = dict(checkerboard=self.checkerboard.value, tile=float(self.tile.value) or None,
                  difference=self.difference.value)

        last = [0.0, ""]

        def report(fraction, message):
            # at most ~4 GUI updates a second: each repaint of the window costs the GUI
            # thread 50-150 ms under software OpenGL (Xvfb, measured), a real GPU far less
            now = time.perf_counter()
            if now - last[0] >= PROGRESS_INTERVAL or fraction >= 1.0:
                last[0] = now
                bridge.progress.emit(fraction, message)

        def job():
            try:
                result = register(
                    params["fixed_data"], params["moving_data"], method=params["method"],
                    transform=params["transform"], fixed_spacing=params["fixed_spacing"],
                    moving_spacing=params["moving_spacing"], fixed_origin=params["fixed_origin"],
                    moving_origin=params["moving_origin"],
                    progress=report,
                    cancel=cancel_event.is_set, **params["options"],
                )
            except RegistrationCancelled as err:
                return "cancelled", err
            except (ValueError, RegistrationError) as err:
                return "error", err
            except Exception as err:  # noqa: BLE001 - shown to the user, not swallowed
                return "bug", err
            # QC images are plain numpy: make them here, not on the GUI thread
            bridge.progress.emit(1.0, "quality-control images")
            images = _qc_images(params, result, qc)
            as_affine = (params["output"] == AFFINE and result.transform.is_linear
                         and not result.transform.is_projective)
            if params["pyramid"] is not None and result.warped is not None and not as_affine:
                # the multiscale result: graphs built and coarse levels computed here,
                # not on the GUI thread
                bridge.progress.emit(1.0, "coarse levels of the registered pyramid")
                images["pyramid"] = _pyramid_output(result, params)
            self.timing["worker_done"] = time.perf_counter()
            return "ok", (result, images)

        self._run_inputs = (params["fixed"], params["moving"])
        self._aborted = None
        self._outcome_shown = False
        self.timing = {}  # perf_counter stamps: worker_done (set by the worker), shown
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.started.connect(self._on_started)
        worker.returned.connect(lambda out: self._on_returned(out, params))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._cancel_event = cancel_event
        # closing the widget (or napari) mid-run stops the run instead of leaving it going
        self.native.destroyed.connect(cancel_event.set)
        return worker

    def _refused(self, reason: str) -> None:
        """A run that did not start: nothing of the previous run may stay on screen as
        if it were this run's outcome."""
        self.status.value = f"not run: {reason}"
        self.summary.value = ""
        self.progress.value = 0
        self._last = None
        show_error(reason)

    def _on_layer_removed(self, event) -> None:
        """An input layer removed mid-run: cancel the run; its results must not appear.
        The dock's text changes on the next turn of the event loop, once napari has
        finished removing the layer (a repaint or notification while the layer list is
        half updated crashed napari under software OpenGL)."""
        inputs = self._run_inputs
        if not self._running or inputs is None or self._cancel_event is None:
            return
        removed = getattr(event, "value", None)
        for role, layer in zip(("fixed", "moving"), inputs):
            if same_layer(removed, layer):
                self._aborted = f"the {role} layer {layer.name!r} was removed"
                self._cancel_event.set()
                from qtpy.QtCore import QTimer

                QTimer.singleShot(0, lambda: self._say(f"cancelling: {self._aborted}"))
                return

    def _say(self, text: str) -> None:
        """A deferred status line; dropped if the run's outcome is on screen already."""
        if self._running and not self._outcome_shown:
            self.status.value = text

    def run(self, *_):
        """Start a registration (the *Register* button)."""
        if self._running:
            return None  # one registration at a time
        worker = self.make_worker()
        if worker is not None:
            self._running = self._worker_running = True
            self.run_button.enabled = False  # now, not when the queued `started` arrives
            worker.start()
        return worker

    def cancel(self, *_):
        """Ask the running registration to stop (polled by the method)."""
        if self._cancel_event is not None:
            self._cancel_event.set()
            self.status.value = "cancelling…"

    def _on_started(self):
        self._started_at = time.perf_counter()
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.status.value = "starting…"

    def _on_progress(self, fraction: float, message: str):
        self.progress.value = int(round(1000 * fraction))
        self.status.value = message

    def _on_finished(self):
        self._worker_running = False
        if not self._placing:
            self._end_run()

    def _end_run(self):
        self._running = False
        self._run_inputs = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self._cancel_event = None

    def _on_returned(self, out, params):
        outcome, payload = out
        self._outcome_shown = True
        if self._aborted is not None or not self._inputs_present(params):
            self._abandon(self._aborted or "an input layer was removed")
            return
        if outcome == "cancelled":
            self.status.value = "cancelled"
            self.progress.value = 0
            show_info("registration cancelled; no layers were changed")
            return
        if outcome in ("error", "bug"):
            self.status.value = "failed"
            self.summary.value = ""
            prefix = "" if outcome == "error" else f"unexpected {type(payload).__name__}: "
            show_error(prefix + str(payload))
            return
        self._show_result(*payload, params, deferred=True)

    def _abandon(self, reason: str) -> None:
        self.status.value = f"cancelled: {reason}; no layers were added"
        self.summary.value = ""
        self.progress.value = 0
        self._last = None

    def _inputs_present(self, params) -> bool:
        layers = list(self.viewer.layers)
        return all(any(same_layer(ly, params[k]) for ly in layers) for k in ("fixed", "moving"))

    # --------------------------------------------------------------------- results
    def _show_result(self, result, qc, params, deferred: bool = False):
        """Put the result in the viewer. Each new layer costs napari ~0.1-0.15 s on the
        GUI thread (vispy visual, layer controls, selection; measured under Xvfb), so
        with ``deferred`` every layer is added in its own turn of the event loop: the
        viewer keeps drawing in between instead of freezing for the sum."""
        steps = self._result_steps(result, qc, params)
        if not deferred:
            for step in steps:
                step()
            return
        self._placing = True

        def next_step():
            if not steps:
                self._placing = False
                if not self._worker_running:
                    self._end_run()
                return
            if self._aborted is not None or not self._inputs_present(params):
                steps.clear()
                self._abandon(self._aborted or "an input layer was removed")
            else:
                try:
                    steps.pop(0)()
                except (ValueError, RegistrationError) as err:
                    steps.clear()
                    show_error(str(err))
                    self.status.value = "failed"
            QTimer.singleShot(0, next_step)

        next_step()

    def _result_steps(self, result, qc, params) -> list:
        viewer = self.viewer
        fixed, moving = params["fixed"], params["moving"]
        meta = {"registration": result.to_dict(),
                "registration_layers": {"fixed": fixed.name, "moving": moving.name}}
        grid = dict(scale=params["fixed_spacing"], translate=params["fixed_origin"],
                    rotate=np.asarray(fixed.rotate), shear=np.asarray(fixed.shear),
                    affine=affine_matrix(fixed))
        colour = self.overlay.value
        notes = [params["start_note"]] if params.get("start_note") else []
        output = params["output"]
        # the transform in the worlds napari shows: moving displayed -> fixed displayed
        f_place, m_place = params["fixed_placement"], params["moving_placement"]
        shown = None
        if result.transform.is_linear:
            shown = f_place @ result.transform.matrix @ np.linalg.inv(m_place)
            if not np.allclose(shown, result.transform.matrix):
                meta["registration"] = dict(meta["registration"])
                meta["registration"]["transform_grid"] = meta["registration"]["transform"]
                meta["registration"]["transform"] = Transform(shown).to_dict()
        elif not (np.allclose(f_place, np.eye(len(f_place)))
                  and np.allclose(m_place, np.eye(len(m_place)))):
            notes.append(f"the {result.transform.kind} transform is stored between the "
                         "layers' scale/translate grids (a rotated/affine placement is not "
                         "folded into a deformable transform)")
        if output == AFFINE and (not result.transform.is_linear or result.transform.is_projective):
            notes.append(f"{result.transform.kind} transform cannot be shown as a napari affine: "
                         "resampled instead")
            output = RESAMPLE
        self._last = dict(fixed=fixed, moving=moving, grid=grid, result=result, params=params)
        placed = {}

        def warped():
            if output == AFFINE:
                # napari: world = affine @ (physical placement of the data): the new
                # affine puts the moving layer where the registration says, composed
                # with its own rotate/shear/affine (equal to fixed affine @ transform
                # for layers moved by scale/translate only)
                moving.affine = shown @ affine_matrix(moving)
                moving.metadata["registration"] = meta["registration"]
                if colour and not moving.rgb:
                    moving.colormap = "magenta"
                    moving.blending = "additive"
                placed["warped"] = moving
            else:
                kwargs = {}
                if not moving.rgb and colour:
                    kwargs.update(colormap="magenta", blending="additive")
                elif not moving.rgb:
                    kwargs.update(colormap=moving.colormap.name)
                if not moving.rgb:
                    kwargs.update(contrast_limits=tuple(moving.contrast_limits))
                data, layer_grid = result.warped, grid
                if qc.get("pyramid") is not None:
                    data, layer_grid = qc["pyramid"], dict(grid, scale=scale_translate(fixed)[0])
                    if isinstance(data, list):
                        kwargs["multiscale"] = True
                    if _lazy(data) and not _async_slicing():
                        placed["advice"] = ASYNC_ADVICE  # a notification, not the status
                placed["warped"] = put_layer(
                    viewer, data, "image", name=f"{moving.name} registered",
                    role="warped", metadata=meta, rgb=moving.rgb, **layer_grid, **kwargs)
            if colour and not fixed.rgb:
                fixed.colormap = "green"  # display only: data and geometry stay as they were
            text = summary_text(result)
            # grow (never shrink: see fixed_lines) to show every line, e.g. auto's stages
            fixed_lines(self.summary, max(text.count("\n") + 1, self._summary_lines))
            self._summary_lines = max(text.count("\n") + 1, self._summary_lines)
            self.summary.value = text
            self.status.value = "placing the result layers…"

        steps = [warped]
        if qc.get("checkerboard") is not None:
            steps.append(lambda: self._put_checkerboard(qc["checkerboard"]))
        if qc.get("difference") is not None:
            steps.append(lambda: put_layer(
                viewer, qc["difference"], "image", name=f"difference: {moving.name}",
                role="difference", colormap="PiYG", contrast_limits=(-1, 1), **grid))
        steps.extend(self._extras_steps(result, moving.name, params.get("show_matches", False)))

        def done():
            if placed.get("warped") is not None:
                viewer.layers.selection.active = placed["warped"]
            seconds = result.info.get("seconds", float("nan"))
            self.status.value = (f"done in {seconds:.2f} s"
                                 + (f" ({'; '.join(notes)})" if notes else ""))
            self.progress.value = 1000
            self.timing["shown"] = time.perf_counter()
            for note in notes + ([placed["advice"]] if "advice" in placed else []):
                show_info(note)

        steps.append(done)
        return steps

    def _refresh_checkerboard(self, *_):
        """The tile spin box: redo the checkerboard of the last result."""
        last = self._last
        if last is None or not self.checkerboard.value or last["result"].warped is None:
            return
        qc = dict(checkerboard=True, tile=float(self.tile.value) or None, difference=False)
        self._put_checkerboard(_qc_images(last["params"], last["result"], qc)["checkerboard"])

    def _put_checkerboard(self, board):
        last = self._last
        put_layer(self.viewer, board, "image", name=f"checkerboard: {last['moving'].name}",
                  role="checkerboard", rgb=True, blending="translucent",
                  contrast_limits=(0.0, 1.0), **last["grid"])

    def _extras_steps(self, result, name, show: bool) -> list:
        """Keypoints (Points) and inlier matches (a Vectors layer: napari draws thousands
        of them at once, where a Shapes layer of ~3,800 lines took 3.4 s to triangulate
        on the GUI thread), only when asked for. Stale ones of an earlier run go."""
        viewer = self.viewer
        ex = result.extras or {}
        names = [f"{name} keypoints (fixed)", f"{name} keypoints (moving)", f"{name} matches"]
        if not show:
            stale = [ly for ly in (find_output(viewer, n) for n in names) if ly is not None]
            return [lambda ly=ly: viewer.layers.remove(ly) for ly in stale]
        steps = []
        for side in ("fixed", "moving"):
            pts = ex.get(f"{side}_keypoints")
            if isinstance(pts, np.ndarray) and pts.ndim == 2 and len(pts):
                # a Points layer of 5,000 keypoints took ~1 s to add (measured): show an
                # even subset; the metadata says how many there are
                shown = pts[np.linspace(0, len(pts) - 1, min(len(pts), MAX_KEYPOINTS_SHOWN))
                            .round().astype(int)]
                steps.append(lambda pts=shown, side=side, total=len(pts): put_layer(
                    viewer, pts, "points", name=f"{name} keypoints ({side})", role="keypoints",
                    size=6, face_color="transparent",
                    metadata={"keypoints_total": total, "keypoints_shown": len(pts)},
                    border_color="green" if side == "fixed" else "magenta"))
        fm, mm = ex.get("fixed_matches"), ex.get("moving_matches")
        if (isinstance(fm, np.ndarray) and isinstance(mm, np.ndarray) and fm.ndim == 2
                and fm.shape == mm.shape and len(fm)):
            vectors = np.stack([fm, mm - fm], axis=1)  # (N, 2, D): start, direction

            steps.append(lambda: put_layer(viewer, vectors, "vectors", name=f"{name} matches",
                                           role="matches", edge_color="yellow", edge_width=1.0,
                                           length=1.0))
        elif find_output(viewer, f"{name} matches") is not None:
            steps.append(lambda: viewer.layers.remove(find_output(viewer, f"{name} matches")))
        return steps


ASYNC_ADVICE = ("the registered pyramid is lazy: its tiles are computed as you browse, on "
                "the GUI thread with napari's default slicing (a second or more per zoom step "
                "on a slide). To keep the viewer responsive, turn on Preferences > "
                "Experimental > 'Render Layers Asynchronously'.")


def _lazy(data) -> bool:
    from ..core.lazy import is_dask

    return any(is_dask(d) for d in (data if isinstance(data, list) else [data]))


def _async_slicing() -> bool:
    try:
        from napari.settings import get_settings

        return bool(get_settings().experimental.async_)
    except (ImportError, AttributeError):  # a napari without the setting
        return False


def _pyramid_geometry(fixed, moving, f_level: int, m_level: int):
    """What the worker needs to warp every level (read on the GUI thread), or None when
    the result is a single image (a single-scale fixed layer registered on level 0)."""
    if not (getattr(fixed, "multiscale", False) or m_level):
        return None
    n_fixed, n_moving = len(levels(fixed)), len(levels(moving))
    return dict(
        moving_levels=levels(moving), rgb=bool(moving.rgb),
        shapes=[level_shape(fixed, j) for j in range(n_fixed)],
        spacings=[level_spacing(fixed, j) for j in range(n_fixed)],
        moving_spacings=[level_spacing(moving, j) for j in range(n_moving)],
        fixed_origin=scale_translate(fixed)[1], moving_origin=scale_translate(moving)[1])


def display_levels(moving_levels, transform, shapes, *, output_spacings, moving_spacings,
                   output_origin=None, moving_origin=None, rgb=False, dtype=None, known=None):
    """The registered pyramid the dock shows: every level lazy, in 2D in blocks of
    ``DISPLAY_CHUNKS`` px warped by OpenCV (linear transforms: it releases the GIL, so
    the viewer keeps drawing while tiles compute; 1/32-pixel weights, fine for display:
    write files with the exact warp; 3D: the input's blocks, or 128^3), levels of at
    most ``EAGER_PIXELS`` computed now."""
    from ..core.lazy import warp_levels

    chunks = DISPLAY_CHUNKS if len(shapes[0]) == 2 else None
    return warp_levels(moving_levels, transform, shapes, output_spacings=output_spacings,
                       output_origin=output_origin, moving_spacings=moving_spacings,
                       moving_origin=moving_origin, rgb=rgb, chunks=chunks,
                       fast=True, eager_pixels=EAGER_PIXELS, dtype=dtype, known=known)


def _pyramid_output(result, params):
    """The registered moving image on every level of the fixed pyramid (a single-scale
    fixed layer: one level), from the moving level of the same index (or the coarsest
    there is); the transform is in world units, so it is the same for all. Runs in the
    worker. A list of levels (numpy for the coarse ones, lazy dask for the rest), or one
    array."""
    geo = params["pyramid"]
    known = {}
    n_moving = len(geo["moving_levels"])
    j = params["fixed_level"]
    if params["moving_level"] == min(j, n_moving - 1):
        known[j] = result.warped  # computed already, on exactly this grid
    out = display_levels(geo["moving_levels"], result.transform, geo["shapes"],
                         output_spacings=geo["spacings"], moving_spacings=geo["moving_spacings"],
                         output_origin=geo["fixed_origin"], moving_origin=geo["moving_origin"],
                         rgb=geo["rgb"], dtype=result.warped.dtype, known=known)
    return out if len(out) > 1 else out[0]


def _qc_images(params, result, qc) -> dict:
    """Checkerboard and difference of fixed and warped (grey), on the fixed grid."""
    from ..core.preprocess import to_grey
    from ..core.qc import difference

    out = {"checkerboard": None, "difference": None}
    if result.warped is None or not (qc["checkerboard"] or qc["difference"]):
        return out
    f = np.asarray(params["fixed_data"])
    f = to_grey(f) if params["fixed"].rgb else f
    w = to_grey(result.warped) if params["moving"].rgb else result.warped
    if qc["checkerboard"]:
        out["checkerboard"] = colour_checkerboard(f, w, tile=qc["tile"],
                                                  spacing=params["fixed_spacing"])
    if qc["difference"]:
        out["difference"] = difference(f, w)
    return out


def _warm_up(method: str) -> None:
    """Import on the GUI thread what the run will import: an import in the worker holds
    the GIL for its whole duration and would freeze the viewer (measured: ~0.15 s)."""
    import importlib

    for name in ("scipy.ndimage", "scipy.fft", "skimage.metrics", "skimage.exposure",
                 "napari_registration.core.metrics", "napari_registration.core.qc",
                 "SimpleITK", "cv2"):  # backends import these on first use (SimpleITK: 0.5 s)
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - optional pieces
            pass
    method_info(method)  # imports the backend module


def summary_text(result) -> str:
    """Before/after metrics and the method's diagnostics, as a small table."""
    before = result.metrics.get("before", {})
    after = result.metrics.get("after", {})
    lines = [f"{'':8}{'before':>10}{'after':>10}"]
    for key, label in (("mse", "MSE"), ("ncc", "NCC"), ("mi", "MI"), ("ssim", "SSIM"),
                       ("overlap", "overlap")):
        if key in before or key in after:
            lines.append(f"{label:8}{_fmt(before.get(key)):>10}{_fmt(after.get(key)):>10}")
    info = result.info
    bits = [f"{info.get('method')}/{info.get('transform')}"]
    for key in ("iterations", "inliers", "matches", "refine_evaluations"):
        value = info.get(key)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
            value = "+".join(str(v) for v in value) + (f" = {sum(value)}" if len(value) > 1 else "")
        if value is not None:
            bits.append(f"{key.replace('_', ' ')} {value}")
    bits.append(f"{info.get('seconds', float('nan')):.2f} s")
    lines.append(" | ".join(str(b) for b in bits))
    lines.extend(stage_lines(info))
    stop = info.get("stop_reason") or info.get("stop_condition")
    if stop:
        stop = str(stop)
        lines.append("stop: " + (stop if len(stop) <= 90 else stop[:87] + "..."))
    return "\n".join(lines)


def stage_lines(info: dict) -> list[str]:
    """``auto``: one line per stage with its score, the winner marked with ``>``."""
    stages = info.get("stages")
    if not isinstance(stages, list) or not stages:
        return []
    metric = info.get("metric", "mi")
    chosen = (info.get("chosen") or {}).get("stage")
    out = [f"auto stages ({metric}; > = kept):"]
    for i, st in enumerate(stages):
        score = (st.get("score") or {}).get(metric)
        what = f"{st.get('method')} {st.get('model')} ({st.get('on')})"
        tail = _fmt(score) if score is not None else ("failed" if st.get("error") else "-")
        if st.get("rejected"):
            tail += " rejected"
        out.append(f"{'>' if i == chosen else ' '} {what[:34]:34} {tail}")
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if not np.isfinite(v) else f"{v:.4g}"
