"""napari dock widgets (Qt). Nothing here is imported by ``import napari_registration``;
the manifest (napari.yaml) points at the widget modules directly.

* :mod:`.register` - *Register images*: two layers -> registered layer, QC layers, summary
* :mod:`.qc` - *Inspect alignment*: checkerboard, difference and metrics for two layers
* :mod:`.transform` - *Apply / save / load transform*: reuse a transform on other layers
* :mod:`.landmarks` - *Landmark registration*: click paired points, live fit, refine
* :mod:`.stack` - *Register stack*: drift correction of time series and z-stacks
"""
