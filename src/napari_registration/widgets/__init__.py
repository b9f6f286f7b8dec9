"""napari dock widgets (Qt): imported only by napari through the manifest."""
