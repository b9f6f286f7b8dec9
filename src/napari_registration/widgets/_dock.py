"""A magicgui Container that napari docks inside a scroll area.

``Container(scrollable=True)`` puts its widgets in a ``QScrollArea``, but its ``native``
is the inner widget, and napari's ``add_dock_widget`` docks ``native``: the scroll area
was left out and a tall dock squeezed the canvas (or grew the window past the screen).
:class:`ScrollableDock` hands out the scroll area instead.
"""

from __future__ import annotations

from magicgui.widgets import Container


class ScrollableDock(Container):
    """A vertical, labelled, scrollable magicgui Container for a napari dock."""

    def __init__(self, **kwargs):
        kwargs.setdefault("labels", True)
        super().__init__(scrollable=True, **kwargs)
        # widgets are inserted before this stretch: the rows keep their natural height
        # at the top instead of being spread over a tall dock
        self.inner.layout().addStretch(1)

    @property
    def native(self):
        """The scroll area (what napari docks)."""
        return self.root_native_widget

    @property
    def inner(self):
        """The widget that holds the form, inside the scroll area."""
        return self._widget._mgui_get_native_widget()
