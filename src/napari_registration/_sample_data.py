"""Sample data contributions for napari (File > Open Sample > napari-registration)."""

from __future__ import annotations


def _meta(truth):
    return {"registration_truth": truth.to_dict()}


def fluorescence_pair():
    from .data import fluorescence_pair as make

    fixed, moving, truth = make()
    return [
        (fixed, {"name": "nuclei (fixed)", "colormap": "green", "blending": "additive"}, "image"),
        (moving, {"name": "nuclei shifted (moving)", "colormap": "magenta", "blending": "additive",
                  "metadata": _meta(truth)}, "image"),
    ]


def photo_pair():
    from .data import photo_pair as make

    fixed, moving, truth = make()
    return [
        (fixed, {"name": "astronaut (fixed)"}, "image"),
        (moving, {"name": "astronaut perspective (moving)", "metadata": _meta(truth)}, "image"),
    ]


def volume_pair():
    from .data import volume_pair as make

    fixed, moving, truth, spacing = make()
    return [
        (fixed, {"name": "volume (fixed)", "scale": spacing, "colormap": "green",
                 "blending": "additive"}, "image"),
        (moving, {"name": "volume moved (moving)", "scale": spacing, "colormap": "magenta",
                  "blending": "additive", "metadata": _meta(truth)}, "image"),
    ]
