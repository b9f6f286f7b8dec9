"""The input matrix (issue #8): bad, odd and hostile inputs against every public entry
point, for every installed method.

Read each table as: case name | how the inputs are made | what must happen. An outcome
is either a documented result (``OK(check)``) or an error type whose message names the
problem and the fix (``Raises(ValueError, "regex")``). Anything else -- a raw
``cv2.error``, an ITK ``RuntimeError``, a ``TypeError`` from deep inside, a crash -- fails
the test, and so does any change to an input: every numpy input is made read-only
before the call and compared with a copy afterwards.

Documented behaviours pinned here (the "OK" rows):

* bool / integer / float16 / uint64 images register on their intensities; ``warped``
  keeps the moving image's dtype (float16 and lists come back as float32/float64).
* labels as the moving image are registered as intensities and warped linearly (dtype
  kept); carry labels with ``apply_transform(..., labels=True)`` instead.
* RGB(A) is guessed from a last axis of 3/4 on a 2D image; grey vs colour pairs work.
* NaN/inf are refused unless a mask excludes them.
* non-overlapping or unrelated images: ``features`` raises RegistrationError; fourier
  returns its strongest peak with ``info["peak"]`` < 0.2 (its confidence; a match is
  ~0.8-1); ``landmarks`` does not look at the images; ``auto`` and ``intensity`` return
  their best-scoring candidate or raise RegistrationError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from skimage import data

import napari_registration as nr
from napari_registration import (RegistrationError, Transform, apply_transform,
                                 available_methods, load_transform, method_info, register,
                                 register_stack, save_transform)
from napari_registration.core.register import TRANSFORM_CHOICES

METHODS = available_methods()
SHIFT = np.array([3.0, -4.0])  # moving -> fixed, for the base pair


# ------------------------------------------------------------------------ outcomes
@dataclass
class OK:
    """A result; ``check(result, case)`` asserts what it must contain."""
    check: Callable | None = None


@dataclass
class Raises:
    error: type
    match: str


@dataclass
class Either:
    """A documented choice between outcomes (e.g. a result, or RegistrationError)."""
    options: tuple


def per_method(default, **by_method):
    return lambda method: by_method.get(method, default)


# --------------------------------------------------------------------------- inputs
_CAM = data.camera().astype(np.float32)


def base(size=96):
    """(fixed, moving): camera crops with ``moving -> fixed`` = translation (3, -4)."""
    return (_CAM[100:100 + size, 150:150 + size].copy(),
            _CAM[103:103 + size, 146:146 + size].copy())


def case(fixed, moving, **kwargs):
    return {"fixed": fixed, "moving": moving, "kwargs": kwargs}


def shift_is(expected_world, tol_px=0.6):
    """Check: the transform is the known translation (world units), within tol_px pixels."""
    def check(result, c):
        m = result.transform.matrix
        assert m is not None
        sp = np.asarray(result.fixed_spacing)
        err = np.abs((m[:-1, -1] - np.asarray(expected_world)) / sp)
        assert np.all(err <= tol_px), (m[:-1, -1], expected_world)
        assert np.allclose(m[:-1, :-1], np.eye(len(sp)), atol=0.02)
    return check


def warped_like(shape=None, dtype=None):
    def check(result, c):
        shape_ = shape or np.shape(c["fixed"])
        assert result.warped.shape == tuple(shape_)
        if dtype is not None:
            assert result.warped.dtype == np.dtype(dtype)
        assert np.isfinite(result.transform.apply(np.full((1, result.transform.ndim), 10.0))).all()
    return check


def both(*checks):
    def check(result, c):
        for ch in checks:
            ch(result, c)
    return check


def _noisy_pair():
    rng = np.random.default_rng(1)
    f, m = base()
    return case(f + rng.normal(0, 12, f.shape).astype(np.float32),
                m + rng.normal(0, 12, m.shape).astype(np.float32))


def _nan_masked():
    f, m = base()
    m[:8] = np.nan
    mask = np.ones(m.shape, bool)
    mask[:8] = False
    return case(f, m, moving_mask=mask)


def _dask_pair():
    import dask.array as da

    f, m = base()
    return case(da.from_array(f, chunks=48), da.from_array(m, chunks=48))


def _non_contiguous():
    f, m = base()
    fs, ms = np.repeat(f, 2, axis=1)[:, ::2], np.repeat(m, 2, axis=1)[:, ::2]
    assert not fs.flags.c_contiguous
    return case(fs, np.asfortranarray(ms))


VOLUME_SHIFT = np.array([2.0, -3.0, 1.0])  # voxels, moving -> fixed


def _volumes():
    from napari_registration.data import blobs_volume

    vol = blobs_volume(shape=(28, 48, 48), seed=3)
    fixed = vol[2:22, 4:40, 3:39].copy()
    moving = vol[4:24, 1:37, 4:40].copy()  # moving(q) = fixed(q + VOLUME_SHIFT)
    return case(fixed, moving, fixed_spacing=(2.0, 1.0, 1.0), moving_spacing=(2.0, 1.0, 1.0))


def _other_methods_option(method):
    for other in METHODS:
        if other != method:
            for key in method_info(other)["options"]:
                if key not in method_info(method)["options"]:
                    return key
    return "no_such_option"


def _wrong_type_option(method):
    for key, default in method_info(method)["options"].items():
        if isinstance(default, (bool, int, float, str)):
            return {key: [1, 2]}
    return {"order": "linear"}


def _unsupported(method):
    return next(t for t in TRANSFORM_CHOICES if t not in method_info(method)["transforms"])


# nonoverlap/unrelated: documented per method (see module docstring)
def _low_peak(result, c):
    assert result.info["peak"] < 0.2


UNRELATED = per_method(Either((OK(warped_like()), Raises(RegistrationError, "."))),
                       fourier=OK(_low_peak),
                       features=Raises(RegistrationError, "matches|keypoints|inliers"),
                       landmarks=OK(shift_is(SHIFT)))
FEW_FEATURES = per_method(Either((OK(warped_like()), Raises(RegistrationError, "."))),
                          features=Raises(RegistrationError, "keypoints|matches"),
                          landmarks=OK(shift_is(SHIFT)))
ND_ONLY_2D3D = per_method(Raises(ValueError, r"works on .*images, not"), fourier=OK(warped_like()))

# (case name, make inputs (method -> dict), expected outcome (method -> outcome))
REGISTER_CASES = [
    ("matching 2D pair", lambda m: case(*base()), OK(shift_is(SHIFT))),
    ("same image, different noise", lambda m: _noisy_pair(), OK(shift_is(SHIFT))),
    ("fixed 2D, moving 3D", lambda m: case(base()[0], np.stack([base()[1]] * 5)),
     Raises(ValueError, "same number of axes")),
    ("empty moving", lambda m: case(base()[0], np.zeros((0, 0), np.float32)),
     Raises(ValueError, "moving image is empty")),
    ("constant fixed", lambda m: case(np.full((96, 96), 7.0, np.float32), base()[1]),
     Raises(ValueError, "fixed image is constant")),
    ("NaN in moving", lambda m: case(base()[0], np.where(base()[1] > 150, np.nan, base()[1])),
     Raises(ValueError, "NaN/inf.*moving_mask")),
    ("inf in fixed", lambda m: case(np.where(base()[0] > 150, np.inf, base()[0]), base()[1]),
     Raises(ValueError, "fixed image has .* NaN/inf")),
    ("NaN outside moving_mask", lambda m: _nan_masked(), OK(shift_is(SHIFT))),
    ("3x3 images", lambda m: case(base()[0][:3, :3], base()[1][:3, :3]),
     Raises(ValueError, "too small")),
    ("8x8 images", lambda m: case(base()[0][:8, :8], base()[1][:8, :8]), FEW_FEATURES),
    ("3D volumes, anisotropic voxels", lambda m: _volumes(),
     per_method(OK(shift_is(VOLUME_SHIFT * [2.0, 1.0, 1.0])),
                features=Raises(ValueError, "works on 2D images, not 3D"))),
    ("1D signals", lambda m: case(base()[0][40], base()[1][40]), ND_ONLY_2D3D),
    ("spacing 1e6", lambda m: case(*base(), fixed_spacing=1e6, moving_spacing=1e6),
     OK(shift_is(SHIFT * 1e6))),
    ("spacing 1e-6", lambda m: case(*base(), fixed_spacing=1e-6, moving_spacing=1e-6),
     OK(shift_is(SHIFT * 1e-6))),
    ("anisotropic 4:1 pixels", lambda m: case(*base(), fixed_spacing=(4.0, 1.0),
                                                moving_spacing=(4.0, 1.0)),
     OK(shift_is(SHIFT * [4.0, 1.0]))),
    ("spacings 1e4 apart (units)", lambda m: case(*base(), moving_spacing=(1e4, 1.0)),
     per_method(Either((OK(warped_like()), Raises(RegistrationError, "."))),
                fourier=Raises(ValueError, "same units"),
                features=Raises(ValueError, "spacing units|isotropic=False"))),
    ("zero spacing", lambda m: case(*base(), fixed_spacing=(0.0, 1.0)),
     Raises(ValueError, "fixed_spacing must be positive")),
    ("spacing 'abc'", lambda m: case(*base(), moving_spacing="abc"),
     Raises(ValueError, "moving_spacing must be")),
    ("NaN origin", lambda m: case(*base(), fixed_origin=(np.nan, 0.0)),
     Raises(ValueError, "fixed_origin must be finite")),
    ("bool images", lambda m: case(base()[0] > 120, base()[1] > 120),
     per_method(OK(warped_like(dtype=bool)),
                features=Either((OK(warped_like(dtype=bool)), Raises(RegistrationError, "."))))),
    ("complex fixed", lambda m: case(base()[0].astype(np.complex64), base()[1]),
     Raises(ValueError, "complex.*np.abs")),
    ("uint64 images", lambda m: case(*(a.astype(np.uint64) for a in base())),
     OK(both(shift_is(SHIFT), warped_like(dtype=np.uint64)))),
    ("float16 images", lambda m: case(*(a.astype(np.float16) for a in base())),
     OK(shift_is(SHIFT))),
    ("int8 with negatives", lambda m: case(*((a - 128).astype(np.int8) for a in base())),
     OK(both(shift_is(SHIFT), warped_like(dtype=np.int8)))),
    ("object dtype", lambda m: case(base()[0], np.array([[None] * 8] * 8)),
     Raises(ValueError, "dtype object")),
    ("nested lists", lambda m: case(*(a.tolist() for a in base())), OK(shift_is(SHIFT))),
    ("RGB fixed, grey moving", lambda m: case(np.stack([base()[0]] * 3, -1).astype(np.uint8),
                                              base()[1]),
     OK(both(shift_is(SHIFT), warped_like(shape=(96, 96))))),
    ("RGBA uint8 both", lambda m: case(*(np.stack([a] * 4, -1).astype(np.uint8) for a in base())),
     OK(both(shift_is(SHIFT), warped_like(shape=(96, 96, 4), dtype=np.uint8)))),
    ("rgb=True on grey", lambda m: case(*base(), rgb=True),
     Raises(ValueError, "rgb=True needs a last axis of 3 or 4")),
    ("non-overlapping images", lambda m: case(base()[0], _CAM[400:496, 0:96].copy()), UNRELATED),
    ("unrelated noise images", lambda m: case(
        *np.random.default_rng(2).random((2, 96, 96)).astype(np.float32)), UNRELATED),
    ("too few features (blurred)", lambda m: case(
        *(np.asarray(__import__("scipy.ndimage", fromlist=["x"]).gaussian_filter(a, 10))
          for a in base())), FEW_FEATURES),
    ("labels as moving", lambda m: case(base()[0], (base()[1] > 120).astype(np.int32) * 3),
     per_method(OK(warped_like(dtype=np.int32)),
                features=Either((OK(warped_like(dtype=np.int32)), Raises(RegistrationError, "matches"))))),
    ("non-contiguous views", lambda m: _non_contiguous(), OK(shift_is(SHIFT))),
    ("dask arrays", lambda m: _dask_pair(), OK(shift_is(SHIFT))),
    ("unknown option", lambda m: case(*base(), foo=1), Raises(ValueError, "unknown option 'foo'")),
    ("option of another method", lambda m: case(*base(), **{_other_methods_option(m): 1}),
     Raises(ValueError, "is an option of method")),
    ("option of the wrong type", lambda m: case(*base(), **_wrong_type_option(m)),
     Raises(ValueError, r"option '\w+' of method .* must be")),
    ("order=7", lambda m: case(*base(), order=7), Raises(ValueError, "order .* 0-5")),
    ("mask of the wrong shape", lambda m: case(*base(), fixed_mask=np.ones((10, 10), bool)),
     Raises(ValueError, "fixed_mask must have the image's shape")),
    ("all-False mask", lambda m: case(*base(), moving_mask=np.zeros((96, 96), bool)),
     Raises(ValueError, "moving_mask is empty")),
    ("unsupported transform", lambda m: case(*base(), transform=_unsupported(m)),
     Raises(ValueError, "does not support transform")),
]


def _landmarks_for(c):
    """Paired points consistent with the base pair's shift, in each image's world."""
    ndim = np.ndim(c["fixed"]) - (1 if np.ndim(c["fixed"]) == 3 and np.shape(c["fixed"])[-1] in (3, 4) else 0)
    if ndim == 3 and np.shape(c["fixed"])[-1] not in (3, 4):
        idx = np.array([[2, 5, 5], [2, 30, 8], [15, 8, 30], [10, 20, 20]], float)
        sp = np.array(c["kwargs"].get("moving_spacing", (1.0, 1.0, 1.0)), float)
        return {"moving_points": idx * sp, "fixed_points": (idx + VOLUME_SHIFT) * sp}
    idx = np.array([[10, 10], [10, 70], [70, 30], [50, 50]], float)
    if ndim != 2:
        return {}
    try:
        sp = np.broadcast_to(np.asarray(c["kwargs"].get("moving_spacing", 1.0), float), (2,))
        fsp = np.broadcast_to(np.asarray(c["kwargs"].get("fixed_spacing", 1.0), float), (2,))
        return {"moving_points": idx * sp, "fixed_points": (idx + SHIFT) * fsp}
    except (TypeError, ValueError):
        return {"moving_points": idx, "fixed_points": idx + SHIFT}


def _freeze(obj):
    """Read-only numpy inputs, and copies to compare with afterwards."""
    if isinstance(obj, np.ndarray):
        obj.setflags(write=False)
        return obj.copy()
    return None


def _run(call, expected, c):
    frozen = {k: _freeze(v) for k, v in c.items() if k != "kwargs"}
    frozen.update({f"kw:{k}": _freeze(v) for k, v in c.get("kwargs", {}).items()})
    outcome = _outcome(call, expected, c)
    for key, copy in frozen.items():
        if copy is not None:
            value = c[key] if not key.startswith("kw:") else c["kwargs"][key[3:]]
            np.testing.assert_array_equal(value, copy, err_msg=f"input {key} was modified")
    return outcome


def _outcome(call, expected, c):
    options = expected.options if isinstance(expected, Either) else (expected,)
    try:
        result = call()
    except (ValueError, RegistrationError) as err:
        wanted = [o for o in options if isinstance(o, Raises) and isinstance(err, o.error)]
        assert wanted, f"unexpected {type(err).__name__}: {err}"
        assert any(re.search(o.match, str(err), re.S) for o in wanted), str(err)
        assert len(str(err)) > 20, "an error message must say what to change"
        return err
    oks = [o for o in options if isinstance(o, OK)]
    assert oks, f"expected {options}, got a result"
    for o in oks[:1]:
        if o.check is not None:
            o.check(result, c)
    return result


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,make,expected", REGISTER_CASES, ids=[r[0] for r in REGISTER_CASES])
def test_register_input_matrix(method, name, make, expected):
    c = make(method)
    if callable(expected):
        expected = expected(method)
    kwargs = dict(c["kwargs"])
    transform = kwargs.pop("transform", "translation")
    if method == "landmarks":
        kwargs.update(_landmarks_for(c))
    if method in ("intensity", "auto"):
        kwargs.update(seed=0) if "seed" in method_info(method)["options"] else None

    def call():
        return register(c["fixed"], c["moving"], method=method, transform=transform, **kwargs)

    _run(call, expected, c)


def test_unknown_method_lists_the_installed_ones():
    f, m = base()
    with pytest.raises(ValueError, match="choose one of"):
        register(f, m, method="elastix")


# ---------------------------------------------------------------- register_stack
def _frames(n=4, size=64):
    return np.stack([_CAM[100 + 2 * k:100 + 2 * k + size, 150:150 + size] for k in range(n)])


def _stack_shifts(result, c):
    shifts = np.array([t.matrix[:-1, -1] for t in result.transforms])
    assert np.allclose(shifts, [[2.0 * k, 0.0] for k in range(len(shifts))], atol=0.3)
    assert result.warped.shape == np.shape(c["frames"])


STACK_CASES = [
    ("drifting stack", lambda: {"frames": _frames()}, OK(_stack_shifts)),
    ("dask stack", lambda: {"frames": __import__("dask.array", fromlist=["x"]).from_array(
        _frames(), chunks=(1, 64, 64))}, OK(lambda r, c: _stack_shifts(
            type(r)(**{**r.__dict__, "warped": np.asarray(r.warped)}), c))),
    ("uint64 stack", lambda: {"frames": _frames().astype(np.uint64)}, OK(_stack_shifts)),
    ("one 2D image", lambda: {"frames": _frames()[0]}, Raises(ValueError, "frames must be 2D or 3D")),
    ("no frames", lambda: {"frames": _frames()[:0]}, Raises(ValueError, "no frames along axis 0")),
    ("frames of different shapes", lambda: {"frames": [_frames()[0], _frames()[1][:32]]},
     Raises(ValueError, "different shapes")),
    ("complex frames", lambda: {"frames": _frames().astype(np.complex64)},
     Raises(ValueError, "real numeric")),
    ("NaN in a frame", lambda: {"frames": np.where(_frames() > 200, np.nan, _frames())},
     Raises(ValueError, "frame .*NaN/inf")),
    ("constant frame", lambda: {"frames": np.concatenate([_frames(), np.zeros((1, 64, 64))])},
     Raises(ValueError, "frame 4: .*constant")),
    ("RGB frames without channel_axis", lambda: {"frames": np.stack([_frames()] * 3, -1)},
     Raises(ValueError, "channel_axis=-1")),
    ("axis out of range", lambda: {"frames": _frames(), "axis": 5}, Raises(ValueError, "out of range")),
    ("reference 'last'", lambda: {"frames": _frames(), "reference": "last"},
     Raises(ValueError, "reference must be one of")),
    ("spacing 'ab'", lambda: {"frames": _frames(), "spacing": "ab"}, Raises(ValueError, "spacing must be")),
    ("downsample larger than frames", lambda: {"frames": _frames(), "downsample": 100},
     Raises(ValueError, "downsample=.*smaller factor")),
    ("unknown option", lambda: {"frames": _frames(), "foo": 1}, Raises(ValueError, "unknown option 'foo'")),
]


@pytest.mark.parametrize("name,make,expected", STACK_CASES, ids=[r[0] for r in STACK_CASES])
def test_register_stack_input_matrix(name, make, expected):
    c = make()
    kwargs = {k: v for k, v in c.items() if k != "frames"}
    _run(lambda: register_stack(c["frames"], **kwargs), expected, {"frames": c["frames"], "kwargs": {}})


# --------------------------------------------------------------- apply_transform
T2 = Transform.from_translation([2.0, -1.0])


def _applied(dtype, shape=(96, 96)):
    def check(out, c):
        assert out.shape == shape and out.dtype == np.dtype(dtype)
    return check


APPLY_CASES = [
    ("float32 image", lambda: {"image": base()[1]}, {}, OK(_applied(np.float32))),
    ("uint16 labels, nearest", lambda: {"image": (base()[1] // 40).astype(np.uint16)},
     {"labels": True}, OK(lambda out, c: (_applied(np.uint16)(out, c),
                                         set(np.unique(out)) <= set(np.unique(c["image"])) | {0}))),
    ("float16 labels", lambda: {"image": (base()[1] // 40).astype(np.float16)}, {"labels": True},
     OK(_applied(np.float16))),
    ("bool mask", lambda: {"image": base()[1] > 100}, {"labels": True}, OK(_applied(bool))),
    ("RGB with rgb=True", lambda: {"image": np.stack([base()[1]] * 3, -1)}, {"rgb": True},
     OK(_applied(np.float32, (96, 96, 3)))),
    ("RGB without rgb=True", lambda: {"image": np.stack([base()[1]] * 3, -1)}, {},
     Raises(ValueError, "pass rgb=True")),
    ("dask image", lambda: {"image": __import__("dask.array", fromlist=["x"]).from_array(base()[1], chunks=32)},
     {}, OK(_applied(np.float32))),
    ("empty image", lambda: {"image": np.zeros((0, 5))}, {}, Raises(ValueError, "empty")),
    ("complex image", lambda: {"image": base()[1].astype(complex)}, {}, Raises(ValueError, "complex")),
    ("object image", lambda: {"image": np.array([[None] * 4] * 4)}, {}, Raises(ValueError, "numeric")),
    ("3D image, 2D transform", lambda: {"image": np.stack([base()[1]] * 5)}, {},
     Raises(ValueError, "transform is 2D")),
    ("order=7", lambda: {"image": base()[1]}, {"order": 7}, Raises(ValueError, "order")),
    ("negative output_shape", lambda: {"image": base()[1]}, {"output_shape": (-1, 5)},
     Raises(ValueError, "output_shape must be 2 positive")),
    ("output_shape 'ab'", lambda: {"image": base()[1]}, {"output_shape": "ab"},
     Raises(ValueError, "output_shape must be")),
    ("zero input_spacing", lambda: {"image": base()[1]}, {"input_spacing": (0, 1)},
     Raises(ValueError, "input_spacing must be positive")),
]


@pytest.mark.parametrize("name,make,kwargs,expected", APPLY_CASES, ids=[r[0] for r in APPLY_CASES])
def test_apply_transform_input_matrix(name, make, kwargs, expected):
    c = make()
    kw = {"output_shape": (96, 96), **kwargs}
    _run(lambda: apply_transform(c["image"], T2, **kw), expected, {"image": c["image"], "kwargs": {}})


def test_apply_transform_needs_a_transform():
    """Passing a matrix where a Transform goes is a programming error: TypeError, with the fix."""
    with pytest.raises(TypeError, match="load_transform"):
        apply_transform(base()[1], np.eye(3), output_shape=(96, 96))


# ---------------------------------------------------------- transform files
def _text(s):
    return s


FIELD = ('{"kind":"field","field":{"dtype":"<f4","shape":[1,1,2],"data":"AAAAAAAAAAA="},'
         '"spacing":%s,"origin":[0,0],"direction":"%s"}')
TFM = "#Insight Transform File V1.0\n#Transform 0\nTransform: %s\nParameters: %s\nFixedParameters: %s\n"

FILE_CASES = [
    ("empty .json", "t.json", "", Raises(ValueError, "not valid JSON")),
    ("truncated .json", "t.json", '{"steps": [', Raises(ValueError, "not valid JSON")),
    ("binary in .json", "t.json", b"\x89PNG\r\n\x1a\n\x00\x00", Raises(ValueError, "not valid JSON")),
    ("JSON list", "t.json", "[1, 2]", Raises(ValueError, "not a napari-registration transform")),
    ("foreign JSON object", "t.json", '{"type": "elastix"}', Raises(ValueError, "expected a dict with 'steps'")),
    ("steps not a list", "t.json", '{"steps": 5}', Raises(ValueError, "'steps' must be a list")),
    ("unknown step kind", "t.json", '{"steps": [{"kind": "magic"}]}', Raises(ValueError, "unknown transform step kind")),
    ("matrix of strings", "t.json", '{"steps": [{"kind": "matrix", "matrix": "abc"}]}',
     Raises(ValueError, "corrupt 'matrix' step")),
    ("ragged matrix", "t.json", '{"steps": [{"kind": "matrix", "matrix": [[1, 0], [0]]}]}',
     Raises(ValueError, "corrupt 'matrix' step")),
    ("NaN in matrix", "t.json", '{"steps": [{"kind": "matrix", "matrix": [[1,0,NaN],[0,1,0],[0,0,1]]}]}',
     Raises(ValueError, "finite")),
    ("singular matrix", "t.json", '{"steps": [{"kind": "matrix", "matrix": [[0,0,0],[0,0,0],[0,0,1]]}]}',
     Raises(ValueError, "invertible")),
    ("steps of mixed dimension", "t.json",
     '{"steps": [{"kind": "matrix", "matrix": [[1,0,0],[0,1,0],[0,0,1]]}, '
     '{"kind": "matrix", "matrix": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]}]}',
     Raises(ValueError, "same dimension")),
    ("field with corrupt data", "t.json",
     '{"steps": [{"kind":"field","field":{"dtype":"<f4","shape":[4,4,2],"data":"AAAA"},'
     '"spacing":[1,1],"origin":[0,0],"direction":"backward"}]}', Raises(ValueError, "corrupt 'field' step")),
    ("field with bad spacing", "t.json", '{"steps": [%s]}' % (FIELD % ("[0, 1, 4]", "backward")),
     Raises(ValueError, "positive spacings")),
    ("field with bad direction", "t.json", '{"steps": [%s]}' % (FIELD % ("[1, 1]", "sideways")),
     Raises(ValueError, "direction")),
    ("tps without points", "t.json", '{"steps": [{"kind": "tps"}]}', Raises(ValueError, "corrupt 'tps' step")),
    ("empty .tfm", "t.tfm", "", Raises(ValueError, "not a transform ITK can read")),
    ("garbage .tfm", "t.tfm", "#Insight Transform File V1.0\nhello\n", Raises(ValueError, "not a transform ITK can read")),
    ("binary .h5", "t.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 40, Raises(ValueError, "not a transform ITK can read")),
    ("B-spline .tfm with missing parameters", "t.tfm", TFM % ("BSplineTransform_double_2_2", "0 0", "0 0"),
     Raises(ValueError, "not a transform ITK can read")),
    ("foreign 2D Euler .tfm (ITK, fixed->moving, x/y)", "t.tfm",
     TFM % ("Euler2DTransform_double_2_2", "0.1 1 2", "0 0"),
     OK(lambda t, c: (t.ndim == 2 and t.is_linear
                      and np.allclose(t.inverse().matrix[:2, 2], [2, 1])))),
    ("foreign 3D versor .tfm", "t.tfm", TFM % ("VersorRigid3DTransform_double_3_3", "0 0 0 1 2 3", "0 0 0"),
     OK(lambda t, c: np.allclose(t.matrix[:3, 3], [-3, -2, -1]))),
    ("unknown suffix", "t.xyz", "hello", Raises(ValueError, "unknown transform file type")),
    ("a folder", "t.json/", None, Raises(ValueError, "is a folder")),
]


@pytest.mark.parametrize("name,filename,content,expected", FILE_CASES, ids=[r[0] for r in FILE_CASES])
def test_load_transform_input_matrix(tmp_path, name, filename, content, expected):
    path = tmp_path / filename
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    _outcome(lambda: load_transform(path), expected, {})


def test_load_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_transform(tmp_path / "nope.json")


@pytest.mark.parametrize("name,transform,filename,expected", [
    ("projective to .tfm", Transform(np.array([[1, 0, 0], [0, 1, 0], [1e-3, 0, 1.0]])), "p.tfm",
     Raises(ValueError, "save it as .json")),
    ("unknown suffix", T2, "t.xyz", Raises(ValueError, "unknown transform file type")),
    ("linear to .json", T2, "t.json", OK(lambda p, c: load_transform(p) == T2)),
    ("linear to .tfm", T2, "t.tfm", OK(lambda p, c: np.allclose(load_transform(p).matrix, T2.matrix))),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_save_transform_input_matrix(tmp_path, name, transform, filename, expected):
    def check_ok(path):
        if isinstance(expected, OK):
            assert expected.check(path, {})

    out = _outcome(lambda: save_transform(transform, tmp_path / filename), expected, {})
    if isinstance(expected, OK):
        check_ok(out)


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import tifffile

    d = tmp_path_factory.mktemp("cli")
    f, m = base(64)
    tifffile.imwrite(d / "fixed.tif", f)
    tifffile.imwrite(d / "moving.tif", m)
    tifffile.imwrite(d / "const.tif", np.zeros((64, 64), np.float32))
    tifffile.imwrite(d / "volume.tif", np.stack([m] * 5))
    (d / "damaged.tif").write_bytes(b"II*\x00garbage")
    (d / "text.png").write_text("not a png")
    (d / "a_file").write_text("x")
    return d


CLI_CASES = [
    ("register a pair", ["register", "fixed.tif", "moving.tif"], 0, ""),
    ("constant moving", ["register", "fixed.tif", "const.tif"], 2, "constant"),
    ("missing file", ["register", "fixed.tif", "nope.tif"], 2, "not found"),
    ("damaged TIFF", ["register", "fixed.tif", "damaged.tif"], 2, "cannot read image"),
    ("text named .png", ["register", "fixed.tif", "text.png"], 2, "cannot read image"),
    ("2D vs 3D", ["register", "fixed.tif", "volume.tif"], 2, "same number of axes"),
    ("unknown method", ["register", "fixed.tif", "moving.tif", "--method", "magic"], 2, "choose one of"),
    ("unknown option", ["register", "fixed.tif", "moving.tif", "-o", "foo=1"], 2, "unknown option 'foo'"),
    ("option without =", ["register", "fixed.tif", "moving.tif", "-o", "foo"], 2, "key=value"),
    ("option of another method", ["register", "fixed.tif", "moving.tif", "-o", "detector=orb"], 2,
     "is an option of method"),
    ("option of the wrong type", ["register", "fixed.tif", "moving.tif", "-o", "upsample=abc"], 2,
     "must be a whole number"),
    ("zero spacing", ["register", "fixed.tif", "moving.tif", "--fixed-spacing", "0", "1"], 2, "positive"),
    ("--out is a file", ["register", "fixed.tif", "moving.tif", "--out", "a_file"], 2, "exists"),
    ("stack of a damaged TIFF", ["stack", "damaged.tif"], 2, "cannot read image"),
    ("stack of one 2D image", ["stack", "fixed.tif"], 2, "frames must be 2D or 3D"),
    ("batch of a damaged TIFF", ["batch", "damaged.tif", "--fixed", "fixed.tif"], 1, "cannot read image"),
    ("batch with no matches", ["batch", "nope*.tif", "--fixed", "fixed.tif"], 2, "no moving images match"),
]


@pytest.mark.parametrize("name,argv,code,message", CLI_CASES, ids=[r[0] for r in CLI_CASES])
def test_cli_input_matrix(files, tmp_path, monkeypatch, capsys, name, argv, code, message):
    from napari_registration.cli import main

    monkeypatch.chdir(files)
    if "--out" not in argv and argv[0] in ("register", "stack", "batch"):
        argv = argv + ["--out", str(tmp_path / "out")]
    assert main(argv + ["-q"]) == code
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert re.search(message, text), text
    assert "Traceback" not in text
