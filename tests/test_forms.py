"""Backends declare every option with a fixed set of values as a ``Literal`` (the
Register dock turns it into a drop-down); the values match what the backend accepts."""

from __future__ import annotations

import typing

import pytest

from napari_registration import available_methods
from napari_registration.core.register import _backend

#: option -> the tuple the backend validates against (module attribute)
DECLARED = {
    "features": {"detector": "DETECTORS", "matcher": "MATCHERS", "estimator": "ESTIMATORS"},
    "intensity": {"metric": "METRICS", "optimizer": "OPTIMIZERS", "sampling": "SAMPLINGS",
                  "init": "INITS", "demons": "DEMONS"},
}


def _literal(hint):
    for member in (typing.get_args(hint) if typing.get_origin(hint) is not typing.Literal
                   else (hint,)):
        if typing.get_origin(member) is typing.Literal:
            return typing.get_args(member)
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


@pytest.mark.parametrize("method", sorted(DECLARED))
def test_fixed_value_options_are_literals_matching_the_backend(method):
    if method not in available_methods():
        pytest.skip(f"{method} backend not installed")
    mod = _backend(method)
    hints = typing.get_type_hints(mod.register)
    for option, attr in DECLARED[method].items():
        assert _literal(hints[option]) == tuple(getattr(mod, attr)), option


def test_linear_stage_and_auto_metric_are_literals():
    hints = typing.get_type_hints(_backend("intensity").register)
    stage = _literal(hints["linear_stage"])
    assert stage[:2] == ("auto", "none")
    assert set(stage[2:]) == set(_backend("intensity").LINEAR)
    assert _literal(typing.get_type_hints(_backend("auto").register)["metric"]) == ("auto", "mi", "ncc")


def test_option_docs_split_shared_entries_and_read_the_options_section():
    from napari_registration.widgets._common import option_docs  # imports magicgui only

    docs = option_docs(_backend("intensity").register)
    assert "Mattes" in docs["metric"] or "mattes" in docs["metric"]
    assert docs["grid_spacing"] == docs["mesh_size"] and "B-spline" in docs["grid_spacing"]
    assert "numpydoc" not in docs and "fixed_mask" not in docs
