"""Untrusted transform files (issue #16): JSON and ITK .tfm/.h5.

Read each table as: case | file content | what must happen. The only acceptable
outcomes are a Transform (``OK``) or a ValueError whose message names the problem.
Anything that could crash the interpreter (ITK's reader segfaults on some inputs) is
loaded in a child process: a crash there fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_registration import Transform, load_transform, save_transform
from napari_registration.core import transform as tmod

# CI runs a fixed, seeded budget; benchmarks/fuzz.py raises it (and draws new seeds)
FUZZ_SCALE = int(os.environ.get("NAPARI_REGISTRATION_FUZZ_SCALE", "1"))
SEEDED = FUZZ_SCALE == 1
SRC = str(Path(__file__).resolve().parents[1] / "src")
OK = "ok"
EYE3 = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def _steps(matrix):
    return {"steps": [{"kind": "matrix", "matrix": matrix}]}


def _written(t, **edit):
    d = t.to_dict()
    d.update(edit)
    return d


T2 = Transform(np.array([[0.9, -0.1, 3.0], [0.1, 0.9, -4.0], [0, 0, 1.0]]))
RNG = np.random.default_rng(0)
TPS_SRC = RNG.uniform(0, 500, (4000, 2))
TPS_BIG = RNG.uniform(0, 500, (10_000, 2))

# ------------------------------------------------------------- transform JSON table
JSON_CASES = [
    # case, text (or object dumped to JSON), expected: OK or a regex of the ValueError
    ("nested 5000 deep", "[" * 5000 + "]" * 5000, "nested 5000 levels"),
    ("nested dicts 100 deep", '{"a":' * 100 + "1" + "}" * 100, "nested 100 levels"),
    ("matrix entry 10**400", '{"steps": [{"kind": "matrix", "matrix": [[1, 0, 1%s], [0, 1, 0], [0, 0, 1]]}]}'
     % ("0" * 400), "finite"),
    ("matrix entry 1e400", '{"steps": [{"kind": "matrix", "matrix": [[1, 0, 1e400], [0, 1, 0], [0, 0, 1]]}]}',
     "finite"),
    ("Infinity", '{"steps": [{"kind": "matrix", "matrix": [[1, 0, Infinity], [0, 1, 0], [0, 0, 1]]}]}',
     "finite"),
    ("matrix entry 1e308", _steps([[1e308, 0, 0], [0, 1, 0], [0, 0, 1]]), "at most 1e\\+12"),
    ("near-singular matrix", _steps([[1, 1, 0], [1, 1 + 1e-14, 0], [0, 0, 1]]), "invertible"),
    ("scaled near-singular matrix", _steps([[1e6, 1e6, 0], [1e6, 1e6 + 1e-7, 0], [0, 0, 1]]),
     "nearly singular"),
    ("kind is a list", {"steps": [{"kind": ["matrix"], "matrix": EYE3}]}, "'kind' string"),
    ("direction is a list", {"steps": [{"kind": "tps", "direction": ["forward"],
                                        "source": TPS_SRC[:5].tolist(),
                                        "target": TPS_SRC[:5].tolist()}]}, "'direction' must be a string"),
    ("matrix of strings of numbers", _steps([["1", "0", "0"], ["0", "1", "0"], ["0", "0", "1"]]),
     "only numbers"),
    ("matrix of booleans", _steps([[True, False, 0], [0, 1, 0], [0, 0, 1]]), "only numbers"),
    ("matrix holds a dict", _steps([[{"a": 1}, 0, 0], [0, 1, 0], [0, 0, 1]]), "only numbers"),
    ("steps is a dict", {"steps": {"kind": "matrix"}}, "'steps' must be a list"),
    ("step is a string", {"steps": ["matrix"]}, "'kind' string"),
    ("200 steps", {"steps": [{"kind": "matrix", "matrix": EYE3}] * 200}, "at most 64 steps"),
    ("version 99", _written(T2, version=99), "unknown transform format version 99"),
    ("version is a string", _written(T2, version="1"), "version"),
    ("type of another tool", _written(T2, type="elastix"), "'type' is 'elastix'"),
    ("ndim edited to 3", _written(T2, ndim=3), "'ndim' is 3 but the steps are 2D"),
    ("kind edited", _written(T2, kind="tps"), "'kind' is 'tps'"),
    ("visible matrix edited, steps not", _written(T2, matrix=np.eye(3).tolist()),
     "disagrees with the matrix of 'steps'"),
    ("visible matrix null for a linear transform", _written(T2, matrix=None), "'matrix' is null"),
    ("matrix only (hand-written)", {"matrix": [[1, 0, 5], [0, 1, -2], [0, 0, 1]]},
     OK),
    ("as written by save_transform", T2.to_dict(), OK),
    ("field dtype object", {"steps": [{"kind": "field", "field": {"dtype": "|O", "shape": [1, 1, 2],
                                                                  "data": "AAAAAAAAAAA="},
                                       "spacing": [1, 1], "origin": [0, 0], "direction": "backward"}]},
     "float type"),
    ("field shape -1", {"steps": [{"kind": "field", "field": {"dtype": "<f4", "shape": [-1, 1, 2],
                                                              "data": "AAAAAAAAAAA="},
                                   "spacing": [1, 1], "origin": [0, 0], "direction": "backward"}]},
     "positive whole numbers"),
    ("tps with 10,000 points", {"steps": [{"kind": "tps", "source": TPS_BIG.tolist(),
                                           "target": (TPS_BIG + 1).tolist()}]},
     "at most 5000 landmark pairs"),
    ("tps landmarks on a line", {"steps": [{"kind": "tps", "source": [[0, 0], [1, 1], [2, 2], [3, 3]],
                                            "target": [[0, 0], [1, 1], [2, 2], [3, 3]]}]}, "one line"),
    ("UTF-8 byte-order mark", "\ufeff" + json.dumps(T2.to_dict()), OK),
]


@pytest.mark.parametrize("name,content,expected", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_transform_json_table(tmp_path, name, content, expected):
    path = tmp_path / "t.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    t0 = time.perf_counter()
    if expected is OK:
        assert isinstance(load_transform(path), Transform)
    else:
        with pytest.raises(ValueError, match=expected):
            load_transform(path)
    assert time.perf_counter() - t0 < 5, "a bad file must be refused quickly"


def test_edited_matrix_alone_is_honoured():
    """A dict with only the visible 'matrix' is that transform (never ignored)."""
    t = Transform.from_dict({"matrix": [[1, 0, 5], [0, 1, -2], [0, 0, 1]], "ndim": 2})
    np.testing.assert_allclose(t.apply([[0.0, 0.0]]), [[5.0, -2.0]])


def test_tps_file_loads_in_time_proportional_to_use(tmp_path):
    """4000 landmark pairs: loading reads points (no O(N^3) solve, which takes seconds
    and ~1 GB here); the spline is fitted on first use and then maps the landmarks onto
    their targets."""
    def tps_file(name, source, target):
        path = tmp_path / name
        path.write_text(json.dumps({"steps": [{"kind": "tps", "source": source.tolist(),
                                               "target": target.tolist()}]}))
        return path

    target = TPS_SRC + np.sin(TPS_SRC / 50.0)
    path = tps_file("big.json", TPS_SRC, target)
    t0 = time.perf_counter()
    t = load_transform(path)
    load_seconds = time.perf_counter() - t0
    assert t.steps[0]._f_cache is None, "the spline was solved while loading"
    assert load_seconds < 2.0, f"loading 4000 TPS points took {load_seconds:.1f} s"
    small = load_transform(tps_file("small.json", TPS_SRC[:300], target[:300]))
    np.testing.assert_allclose(small.apply(TPS_SRC[:10]), target[:10], atol=1e-6)
    np.testing.assert_allclose(small.inverse().apply(target[:10]), TPS_SRC[:10], atol=1e-6)


JSON_LEAVES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _replace(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


TPS_T = Transform(steps=[__import__("napari_registration.core.tps", fromlist=["TpsStep"])
                         .TpsStep(TPS_SRC[:6], TPS_SRC[:6] + 1.0)])
FIELD_T = Transform(steps=[tmod.FieldStep(np.zeros((3, 3, 2), np.float32))])
VALID = [T2.to_dict(), TPS_T.to_dict(), FIELD_T.to_dict(), T2.then(TPS_T).to_dict()]


@settings(max_examples=150 * FUZZ_SCALE, deadline=None, derandomize=SEEDED,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(which=st.integers(0, len(VALID) - 1), pick=st.integers(0, 10**6), value=JSON_LEAVES)
def test_any_edit_of_a_valid_file_gives_a_transform_or_value_error(which, pick, value):
    """Replace any one node of a valid transform dict with any JSON value: the loader
    returns a Transform or raises ValueError -- never TypeError, KeyError, ... ."""
    base = VALID[which]
    paths = list(_paths(base))
    data = _replace(base, paths[pick % len(paths)], value)
    try:
        t = Transform.from_dict(tmod.parse_transform_json(json.dumps(data)))
    except ValueError:
        return
    assert isinstance(t, Transform)


# ---------------------------------------------------------------- ITK .tfm table
TFM = "#Insight Transform File V1.0\n#Transform 0\nTransform: %s\nParameters: %s\nFixedParameters: %s\n"
TFM_CASES = [
    ("nan in a 2D Euler", TFM % ("Euler2DTransform_double_2_2", "nan 1 2", "0 0"), "finite"),
    ("nan in a versor", TFM % ("VersorRigid3DTransform_double_3_3", "nan 0 0 1 2 3", "0 0 0"), "finite"),
    ("inf in an affine", TFM % ("AffineTransform_double_2_2", "1 0 0 1 inf 0", "0 0"), "finite"),
    ("empty parameters", TFM % ("Euler2DTransform_double_2_2", "", "0 0"), "0 parameters; it needs 3"),
    ("missing FixedParameters line", "#Insight Transform File V1.0\nTransform: Euler2DTransform_double_2_2\n"
     "Parameters: 0 1 2\n", "needs both"),
    ("malformed rigid (Rigid2D)", TFM % ("Rigid2DTransform_double_2_2", "0.1 1 2", "0 0"), "does not support"),
    ("3D Euler with 5 parameters", TFM % ("Euler3DTransform_double_3_3", "0 0 0 1 2", "0 0 0"), "needs 6"),
    ("versor of norm 2", TFM % ("VersorRigid3DTransform_double_3_3", "2 0 0 1 2 3", "0 0 0"), "norm > 1"),
    ("2D composite wrapping a 3D affine",
     "#Insight Transform File V1.0\n#Transform 0\nTransform: CompositeTransform_double_2_2\n#Transform 1\n"
     "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n",
     "dimensions \\[2, 3\\]"),
    ("2D to 3D transform", TFM % ("AffineTransform_double_2_3", "1 0 0 1 0 0", "0 0"), "maps 2D to 3D"),
    ("4D affine", TFM % ("AffineTransform_double_4_4", " ".join(["1"] * 20), "0 0 0 0"), "maps 4D to 4D"),
    ("huge B-spline grid", TFM % ("BSplineTransform_double_2_2", "0 0", "100000 100000 0 0 1 1 1 0 0 1"),
     "at most 30000000 parameters"),
    ("B-spline with zero spacing", TFM % ("BSplineTransform_double_2_2", " ".join(["0"] * 8),
                                           "2 2 0 0 0 0 1 0 0 1"), "must be positive"),
    ("words as numbers", TFM % ("AffineTransform_double_2_2", "1 0 0 1 zero 0", "0 0"), "not a number"),
    ("binary junk", "#Insight Transform File V1.0\n\x00\x01\x02", "unexpected line"),
    ("no header", "Transform: AffineTransform_double_2_2\n", "header"),
    ("a valid 2D Euler", TFM % ("Euler2DTransform_double_2_2", "0.1 1 2", "0 0"), OK),
    ("a valid 3D Euler (ITK writes 4 fixed parameters)",
     TFM % ("Euler3DTransform_double_3_3", "0 0 0.1 1 2 3", "0 0 0 0"), OK),
]

_LOADER = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, sys.argv[1])
    from napari_registration import load_transform
    for path in sys.argv[2:]:
        print(path, flush=True)
        try:
            t = load_transform(path)
            print(json.dumps({"path": path, "outcome": "ok", "ndim": t.ndim}), flush=True)
        except ValueError as err:
            print(json.dumps({"path": path, "outcome": "ValueError", "message": str(err)}), flush=True)
""")


def _load_in_child(paths, timeout=120):
    """Load each file in one child process; a crash names the file it died on."""
    proc = subprocess.run([sys.executable, "-c", _LOADER, SRC, *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, (f"the loader died (status {proc.returncode}) on "
                                  f"{lines[-1] if lines else '?'}: {proc.stderr[-800:]}")
    return {r["path"]: r for r in map(json.loads, (ln for ln in lines if ln.startswith("{")))}


def test_tfm_table_in_a_child_process(tmp_path):
    import re

    paths = []
    for k, (name, text, _) in enumerate(TFM_CASES):
        path = tmp_path / f"case{k}.tfm"
        path.write_bytes(text.encode("latin-1"))
        paths.append(path)
    results = _load_in_child(paths)
    for (name, _, expected), path in zip(TFM_CASES, paths):
        r = results[str(path)]
        if expected is OK:
            assert r["outcome"] == "ok", f"{name}: {r}"
        else:
            assert r["outcome"] == "ValueError", f"{name}: loaded, should be refused"
            assert re.search(expected, r["message"]), f"{name}: {r['message']}"


def test_random_tfm_edits_never_crash(tmp_path):
    """200 seeded random edits of valid .tfm files (tokens replaced by nan, inf, words,
    huge numbers, dropped or duplicated; lines dropped): a transform or a ValueError in
    a child process that must not crash."""
    import SimpleITK as sitk

    bases = []
    for k, tx in enumerate([sitk.Euler2DTransform((1, 2), 0.1, (3, 4)), sitk.AffineTransform(3),
                            sitk.VersorRigid3DTransform(), sitk.Similarity2DTransform(),
                            sitk.CompositeTransform([sitk.AffineTransform(2),
                                                     sitk.TranslationTransform(2, (1, 2))])]):
        sitk.WriteTransform(tx, str(tmp_path / f"base{k}.tfm"))
        bases.append((tmp_path / f"base{k}.tfm").read_text())
    rng = random.Random(16 if SEEDED else None)
    junk = ["nan", "-inf", "inf", "1e400", "abc", "", "1e308", "0", "-1", "2", "1 1", "NaN"]
    paths = []
    for n in range(200 * FUZZ_SCALE):
        lines = rng.choice(bases).splitlines()
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            op = rng.random()
            if op < 0.6 and ":" in lines[i]:
                key, _, vals = lines[i].partition(":")
                toks = vals.split() or [""]
                toks[rng.randrange(len(toks))] = rng.choice(junk)
                lines[i] = key + ": " + " ".join(toks)
            elif op < 0.8:
                del lines[i]
                if not lines:
                    lines = ["#Insight Transform File V1.0"]
            else:
                lines.insert(i, lines[i])
        path = tmp_path / f"edit{n}.tfm"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    results = _load_in_child(paths)
    assert len(results) == len(paths)
    assert {r["outcome"] for r in results.values()} <= {"ok", "ValueError"}


def test_h5_with_nan_is_refused_without_crashing(tmp_path):
    """Binary ITK files cannot be checked in Python: ITK reads them in a child process
    first, so a file that crashes or fools ITK is a ValueError here."""
    import SimpleITK as sitk

    tx = sitk.AffineTransform(2)
    tx.SetTranslation((float("nan"), 1.0))
    sitk.WriteTransform(tx, str(tmp_path / "nan.h5"))
    good = save_transform(T2, tmp_path / "good.h5")
    results = _load_in_child([tmp_path / "nan.h5", good])
    assert results[str(tmp_path / "nan.h5")]["outcome"] == "ValueError"
    assert results[str(good)]["outcome"] == "ok"
