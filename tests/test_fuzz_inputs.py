"""Untrusted image files, CLI options and API arguments (issue #16).

Each table row: case | input | outcome. Outcomes are a result, or a ValueError (CLI:
exit status 2 and a one-line message) -- never a raw library error, a crash, a hang,
or a partly written output folder.
"""

from __future__ import annotations

import gzip
import os
import struct
import threading
import time

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import data

from napari_registration import RegistrationCancelled, available_methods, register, register_stack
from napari_registration.cli import main
from napari_registration.io import read_image

# CI runs a fixed, seeded budget; benchmarks/fuzz.py raises it (and draws new seeds)
FUZZ_SCALE = int(os.environ.get("NAPARI_REGISTRATION_FUZZ_SCALE", "1"))
SEEDED = FUZZ_SCALE == 1
_CAM = data.camera().astype(np.float32)
FIXED = _CAM[60:188, 100:228].copy()
MOVING = _CAM[63:191, 96:224].copy()   # moving -> fixed: (+3, -4)


# ------------------------------------------------------------ API arguments table
API_CASES = [
    # case, kwargs for register(FIXED, MOVING, ...), expected: None (a result) or regex
    ("upsample 1e8", dict(method="fourier", upsample=100_000_000), "between 1 and 1000"),
    ("upsample 0", dict(method="fourier", upsample=0), "between 1 and 1000"),
    ("spacing 1e-300", dict(fixed_spacing=(1e-300, 1e-300), moving_spacing=(1e-300, 1e-300)),
     "outside 1e-09..1e\\+09"),
    ("spacing 1e300", dict(fixed_spacing=(1e300, 1e300)), "outside"),
    ("fixed/moving pixel sizes 1e6 apart", dict(fixed_spacing=(1e-9, 1e-9), moving_spacing=(1e-3, 1e-3)),
     "differ by a factor of 1e\\+06"),
    ("anisotropy 1e9", dict(fixed_spacing=(1e-6, 1e3), moving_spacing=(1e-6, 1e3)), "differ by a factor"),
    ("origin 1e300", dict(fixed_origin=(1e300, 0)), "beyond"),
    ("cancel is not callable", dict(cancel=5), "threading.Event"),
    ("cancel is an unset Event", dict(cancel=threading.Event()), None),
]
if "intensity" in available_methods():
    API_CASES += [
        ("intensity at 1e-9 spacing (nm in metres)",
         dict(method="intensity", transform="rigid", seed=0, fixed_spacing=(1e-9, 1e-9),
              moving_spacing=(1e-9, 1e-9)), 1e-9),
        ("intensity at 1e9 spacing", dict(method="intensity", transform="rigid", seed=0,
                                          fixed_spacing=(1e9, 1e9), moving_spacing=(1e9, 1e9)), 1e9),
        ("intensity B-spline at 1e-6 spacing",
         dict(method="intensity", transform="bspline", seed=0, fixed_spacing=(1e-6, 1e-6),
              moving_spacing=(1e-6, 1e-6)), 1e-6),
    ]


@pytest.mark.parametrize("name,kwargs,expected", API_CASES, ids=[c[0] for c in API_CASES])
def test_register_arguments_table(name, kwargs, expected):
    fixed, moving = FIXED.copy(), MOVING.copy()
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            register(fixed, moving, **kwargs)
    else:
        result = register(fixed, moving, **kwargs)
        scale = 1.0 if expected is None else expected
        centre = np.array([[64.0, 64.0]]) * scale
        shift = (result.transform.apply(centre) - centre)[0] / scale
        np.testing.assert_allclose(shift, [3.0, -4.0], atol=0.3)
    np.testing.assert_array_equal(fixed, FIXED)
    np.testing.assert_array_equal(moving, MOVING)


def test_cancel_accepts_a_threading_event_everywhere():
    ev = threading.Event()
    ev.set()
    with pytest.raises(RegistrationCancelled):
        register(FIXED, MOVING, cancel=ev)
    with pytest.raises(RegistrationCancelled):
        register_stack(np.stack([FIXED, MOVING, FIXED]), cancel=ev)


@pytest.mark.skipif("intensity" not in available_methods(), reason="needs SimpleITK")
def test_bspline_cancel_returns_within_a_fraction_of_the_run():
    """Cancel requested early in a B-spline run: it used to go on for ~a third of the
    run (L-BFGS-B finishes its level); now it returns within a few iterations."""
    from scipy import ndimage

    fixed = _CAM[::2, ::2].copy()
    moving = ndimage.shift(fixed, (2, -1))
    t0 = time.perf_counter()
    register(fixed, moving, method="intensity", transform="bspline", seed=0)
    full = time.perf_counter() - t0
    seen = []
    ev = threading.Event()

    def progress(fraction, message):
        if message.startswith("bspline") and not ev.is_set():
            ev.set()
            seen.append(time.perf_counter())

    with pytest.raises(RegistrationCancelled):
        register(fixed, moving, method="intensity", transform="bspline", seed=0, cancel=ev,
                 progress=progress)
    latency = time.perf_counter() - seen[0]
    assert latency < max(0.25 * full, 0.3), f"cancel took {latency:.2f} s of a {full:.2f} s run"


# ---------------------------------------------------------------- image files table
def _nifti(path, pixdim=(1.0, 1.0), shape=(16, 16), gz=False, header_size=348):
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, header_size)
    struct.pack_into("<8h", hdr, 40, 2, *shape, 1, 1, 1, 1, 1)
    struct.pack_into("<h", hdr, 70, 16)          # float32
    struct.pack_into("<h", hdr, 72, 32)
    struct.pack_into("<8f", hdr, 76, 1.0, *pixdim, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)      # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)        # scl_slope
    hdr[344:348] = b"n+1\x00"
    raw = bytes(hdr) + np.arange(np.prod(shape), dtype="<f4").tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _raw(path, content: bytes):
    path.write_bytes(content)
    return path


IMAGE_CASES = [
    ("NIfTI with voxel size 0", lambda p: _nifti(p / "a.nii", (0.0, 1.0)), "voxel sizes \\[0.0, 1.0\\]"),
    ("NIfTI.gz with voxel size 0", lambda p: _nifti(p / "a.nii.gz", (1.0, 0.0), gz=True), "must be positive"),
    ("NIfTI with negative voxel size", lambda p: _nifti(p / "a.nii", (-1.0, 1.0)), "must be positive"),
    ("NIfTI with NaN voxel size", lambda p: _nifti(p / "a.nii", (float("nan"), 1.0)), "must be positive"),
    ("NIfTI header truncated", lambda p: _raw(p / "a.nii", b"\x5c\x01\x00\x00" + b"\x00" * 50),
     "truncated"),
    ("not a NIfTI at all", lambda p: _raw(p / "a.nii", b"hello" * 100), "not a NIfTI header"),
    ("valid NIfTI (voxel 0.5 x 2)", lambda p: _nifti(p / "a.nii", (0.5, 2.0)), (2.0, 0.5)),
    ("TIFF cut short", lambda p: _raw(p / "a.tif", b"II*\x00\x08\x00\x00\x00"), "cannot read image"),
    ("PNG that is text", lambda p: _raw(p / "a.png", b"not a png"), "cannot read image"),
]


@pytest.mark.parametrize("name,make,expected", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_read_image_table(tmp_path, name, make, expected):
    path = make(tmp_path)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            read_image(path)
    else:
        array, spacing, _ = read_image(path)
        assert tuple(spacing) == expected


# ---------------------------------------------------------------- CLI options table
@pytest.fixture
def files(tmp_path):
    tifffile.imwrite(tmp_path / "fixed.tif", FIXED)
    tifffile.imwrite(tmp_path / "moving.tif", MOVING)
    tifffile.imwrite(tmp_path / "line.tif", FIXED[0])
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 16, 16), np.float32))
    return tmp_path


CLI_CASES = [
    ("1D input", ["register", "line.tif", "line.tif"], "1D"),
    ("4D input", ["register", "4d.tif", "4d.tif"], "4D"),
    ("-o upsample=100000000", ["register", "fixed.tif", "moving.tif", "-o", "upsample=100000000"],
     "between 1 and 1000"),
    ("spacing 1e-300", ["register", "fixed.tif", "moving.tif", "--fixed-spacing", "1e-300", "1e-300"],
     "outside"),
    ("spacing nan", ["register", "fixed.tif", "moving.tif", "--fixed-spacing", "nan", "1"], "finite"),
    ("unknown option", ["register", "fixed.tif", "moving.tif", "-o", "nosuch=1"], "unknown option"),
    ("option with a list", ["register", "fixed.tif", "moving.tif", "-o", "upsample=[1,2]"], "upsample"),
]


@pytest.mark.parametrize("name,argv,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_options_table(files, capsys, name, argv, message):
    out = files / "out"
    argv = [argv[0], *[str(files / a) if a.endswith(".tif") else a for a in argv[1:]],
            "--out", str(out), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir()), "a refused run wrote outputs"


# ------------------------------------------------------- hypothesis: API arguments
@settings(max_examples=60 * FUZZ_SCALE, deadline=None, derandomize=SEEDED,
          suppress_health_check=[HealthCheck.too_slow])
@given(spacing=st.tuples(st.floats(allow_nan=True, allow_infinity=True, width=64),
                         st.floats(allow_nan=True, allow_infinity=True, width=64)),
       origin=st.tuples(st.floats(width=64), st.floats(width=64)),
       upsample=st.one_of(st.integers(-10, 10**9), st.floats(allow_nan=True)))
def test_any_geometry_or_upsample_gives_a_result_or_value_error(spacing, origin, upsample):
    fixed, moving = FIXED[::2, ::2].copy(), MOVING[::2, ::2].copy()
    try:
        result = register(fixed, moving, method="fourier", fixed_spacing=spacing,
                          fixed_origin=origin, upsample=upsample)
    except ValueError:
        pass
    else:
        assert np.all(np.isfinite(result.transform.matrix))
    np.testing.assert_array_equal(fixed, FIXED[::2, ::2])


# ------------------------------------------------------- memory: large feature images
@pytest.mark.skipif("features" not in available_methods(), reason="needs OpenCV")
def test_features_detect_in_bounded_tiles_with_full_resolution_accuracy(monkeypatch):
    """A 1024^2 pair with tile_size=256: no detector call sees more than one tile plus
    its margin (OpenCV's SIFT needs ~230 B per pixel it sees: 3.6 GB for one 4096^2
    image), and the recovered transform is as accurate as detecting on the whole image."""
    from scipy import ndimage

    from napari_registration.backends import features
    from napari_registration.data import grid_points, tre_against_truth
    from napari_registration import Transform

    rng = np.random.default_rng(1)
    fixed = ndimage.zoom(_CAM / 255.0, 2.0, order=1).astype(np.float32)
    fixed += 0.1 * ndimage.gaussian_filter(rng.standard_normal(fixed.shape), 1.5).astype(np.float32)
    a = np.deg2rad(2.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = (np.array(fixed.shape) - 1) / 2
    off = c - rot @ c + np.array([7.3, -5.1])
    moving = ndimage.affine_transform(fixed, rot, offset=off, order=1).astype(np.float32)
    truth = np.eye(3)
    truth[:2, :2], truth[:2, 2] = rot, off

    seen = []
    real = features._make_detector

    class Spy:
        def __init__(self, det):
            self.det = det

        def detectAndCompute(self, image, mask):
            seen.append(image.size)
            return self.det.detectAndCompute(image, mask)

    monkeypatch.setattr(features, "_make_detector", lambda *a: Spy(real(*a)))
    tiled = register(fixed, moving, method="features", transform="rigid", tile_size=256,
                     score=False, warp=False)
    assert max(seen) <= (256 + 2 * 64) ** 2, "a detector call saw more than one tile"
    assert len(seen) == 2 * 16  # 4 x 4 tiles per image
    monkeypatch.setattr(features, "_make_detector", real)
    whole = register(fixed, moving, method="features", transform="rigid", tile_size=0,
                     score=False, warp=False)
    pts = grid_points(fixed.shape)
    tre_tiled = tre_against_truth(tiled.transform, Transform(truth), pts)["mean"]
    tre_whole = tre_against_truth(whole.transform, Transform(truth), pts)["mean"]
    assert tre_tiled < 0.1 and tre_tiled < 2 * tre_whole + 0.02, (tre_tiled, tre_whole)


# ------------------------------------- ITK-read image headers, in a child process
_READER = """
import sys, json
sys.path.insert(0, sys.argv[1])
from napari_registration.io import read_image
for path in sys.argv[2:]:
    print(path, flush=True)
    try:
        a, sp, _ = read_image(path)
        print(json.dumps({"path": path, "outcome": "ok", "shape": list(a.shape)}), flush=True)
    except ValueError as err:
        print(json.dumps({"path": path, "outcome": "ValueError", "message": str(err)}), flush=True)
"""

ITK_HEADER_CASES = [
    ("MHA claiming 10^6 x 10^6 voxels", "a.mha",
     b"ObjectType = Image\nNDims = 2\nDimSize = 1000000 1000000\nElementType = MET_FLOAT\n"
     b"ElementDataFile = LOCAL\n" + b"\x00" * 64),
    ("MHA with NDims = 0", "b.mha", b"ObjectType = Image\nNDims = 0\nElementDataFile = LOCAL\n"),
    ("MHA with a negative size", "c.mha",
     b"ObjectType = Image\nNDims = 2\nDimSize = -4 4\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
     + b"\x00" * 16),
    ("MHA pointing at another file", "d.mha",
     b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
     b"ElementDataFile = /etc/hostname\n"),
    ("NRRD claiming 10^6 x 10^6", "e.nrrd",
     b"NRRD0004\ntype: float\ndimension: 2\nsizes: 1000000 1000000\nencoding: raw\n\n" + b"\x00" * 64),
    ("NRRD with zero spacing", "f.nrrd",
     b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 4 4\nspacings: 0 0\nencoding: raw\n\n" + b"\x00" * 16),
    ("gzip NIfTI that is not gzip", "g.nii.gz", b"not gzip at all" * 10),
    ("NRRD data file elsewhere", "h.nhdr",
     b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 4 4\nencoding: raw\ndata file: ../../x.raw\n"),
    ("MHD with its data beside it", "i.mhd",
     b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
     b"ElementDataFile = i.raw\n"),
]


def test_itk_read_image_headers_never_crash(tmp_path):
    """Hostile MHA/NRRD/NIfTI headers read in a child process: each gives an image or a
    ValueError; none crashes the interpreter or takes more than a few seconds."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    paths = []
    (tmp_path / "i.raw").write_bytes(bytes(range(16)))
    for name, filename, content in ITK_HEADER_CASES:
        (tmp_path / filename).write_bytes(content)
        paths.append(str(tmp_path / filename))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _READER, src, *paths], capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, f"the reader died on {lines[-1] if lines else '?'}: {proc.stderr[-500:]}"
    results = {r["path"]: r for r in map(json.loads, (ln for ln in lines if ln.startswith("{")))}
    assert set(results) == set(paths)
    assert time.perf_counter() - t0 < 60
    for (name, filename, _), path in zip(ITK_HEADER_CASES, paths):
        r = results[path]
        if name in ("MHA pointing at another file", "NRRD data file elsewhere"):
            assert r["outcome"] == "ValueError" and "outside" in r["message"], f"{name}: {r}"
        if name in ("MHA claiming 10^6 x 10^6 voxels", "NRRD claiming 10^6 x 10^6",
                    "gzip NIfTI that is not gzip", "MHA with NDims = 0", "MHA with a negative size"):
            assert r["outcome"] == "ValueError", f"{name}: {r}"
    assert results[paths[-1]] == {"path": paths[-1], "outcome": "ok", "shape": [4, 4]}
