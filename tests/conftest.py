"""Shared fixtures. Qt fixtures (a real napari viewer under Xvfb, started by
pytest-xvfb) are only touched by tests that ask for them, so the core tests run without
napari installed."""

from __future__ import annotations

import pytest

PLUGIN = "napari-registration"


@pytest.fixture
def viewer(make_napari_viewer):
    """A shown napari viewer: vispy needs a real (X) OpenGL context, which Xvfb gives."""
    return make_napari_viewer(show=True)


@pytest.fixture
def open_widget(viewer, qtbot):
    """Open one of our dock widgets through the manifest (as the Plugins menu does)."""

    def _open(display_name: str):
        dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, display_name)
        qtbot.wait(10)
        return widget

    return _open


@pytest.fixture
def notifications(monkeypatch):
    """Record messages our widgets send to napari's notifications."""
    from napari_registration.widgets import _common

    seen = {"error": [], "info": []}
    monkeypatch.setattr(_common, "show_error", lambda m: seen["error"].append(m))
    monkeypatch.setattr(_common, "show_info", lambda m: seen["info"].append(m))
    for mod in ("register", "qc", "transform"):
        module = __import__(f"napari_registration.widgets.{mod}", fromlist=["x"])
        if hasattr(module, "show_error"):
            monkeypatch.setattr(module, "show_error", lambda m: seen["error"].append(m))
        if hasattr(module, "show_info"):
            monkeypatch.setattr(module, "show_info", lambda m: seen["info"].append(m))
    return seen
