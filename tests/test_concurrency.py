"""Faults and concurrency: cancel at any point leaves nothing behind; registrations at
the same time (threads, processes) give the results they give one at a time."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing

import numpy as np
import pytest
import tifffile
from skimage import data

from napari_registration import (RegistrationCancelled, available_methods, method_info,
                                 register, register_stack)

_CAM = data.camera().astype(np.float32)
FIXED = _CAM[60:188, 100:228].copy()
MOVING = _CAM[63:191, 96:224].copy()
LANDMARKS = {"fixed_points": [[10, 10], [10, 100], [100, 50], [60, 60]],
             "moving_points": [[7, 14], [7, 104], [97, 54], [57, 64]]}

# (method, transform, options): every installed method, the slow ones seeded
JOBS = [j for j in [
    ("fourier", "translation", {}),
    ("fourier", "rigid", {}),
    ("features", "rigid", {}),
    ("features", "affine", {"detector": "orb"}),
    ("landmarks", "affine", LANDMARKS),
    ("intensity", "rigid", {"seed": 0}),
    ("auto", "rigid", {"seed": 0} if "seed" in (method_info("auto")["options"]
                                               if "auto" in available_methods() else {}) else {}),
] if j[0] in available_methods()]


def _matrix(job):
    method, transform, options = job
    return register(FIXED, MOVING, method=method, transform=transform, **options).transform.matrix


@pytest.fixture(scope="module")
def serial():
    return [_matrix(j) for j in JOBS]


# -------------------------------------------------------------------------- cancel
def _polls(job):
    method, transform, options = job
    n = [0]

    def count():
        n[0] += 1
        return False

    register(FIXED, MOVING, method=method, transform=transform, cancel=count, **options)
    return n[0]


@pytest.mark.parametrize("job", JOBS, ids=[f"{j[0]}-{j[1]}" for j in JOBS])
def test_cancel_at_any_poll_raises_and_returns_nothing(job):
    """cancel() turning True at the k-th poll, for polls spread over the whole run
    (every poll for short runs): RegistrationCancelled, no result, no 'done' progress,
    inputs untouched."""
    method, transform, options = job
    n = _polls(job)
    assert n >= 2, "a registration must poll cancel more than once"
    ks = sorted(set(np.linspace(0, n - 1, min(n, 8)).astype(int)))
    fixed, moving = FIXED.copy(), MOVING.copy()
    fixed.setflags(write=False)
    moving.setflags(write=False)
    fired = 0
    for k in ks:
        calls, seen = [0], []

        def cancel():
            calls[0] += 1
            return calls[0] > k

        # the number of polls can vary a little between runs (progress reports are
        # throttled by time); the rule: once cancel() has said True, the call raises
        try:
            result = register(fixed, moving, method=method, transform=transform, cancel=cancel,
                              progress=lambda f, msg: seen.append((f, msg)), **options)
        except RegistrationCancelled:
            fired += 1
            assert calls[0] > k
            assert (1.0, "done") not in seen, f"cancelled at poll {k} but reported done"
        else:
            assert calls[0] <= k, f"cancel() said True at poll {k + 1} but a result came back"
            assert result.transform is not None
    assert fired >= len(ks) - 1
    np.testing.assert_array_equal(fixed, FIXED)
    np.testing.assert_array_equal(moving, MOVING)


def test_cancel_stack_mid_run_raises():
    frames = np.stack([_CAM[100 + k:164 + k, 150:214] for k in range(6)])
    calls = [0]

    def cancel():
        calls[0] += 1
        return calls[0] > 12

    with pytest.raises(RegistrationCancelled):
        register_stack(frames, cancel=cancel)


def _write_tif(path, array):
    tifffile.imwrite(path, array)
    return path


@pytest.mark.parametrize("interrupt_at", ["warped.tif", "transform.json", "transform.tfm",
                                          "checkerboard.png", "report.json"])
def test_batch_interrupted_item_is_not_counted_as_done(tmp_path, monkeypatch, interrupt_at):
    """An interrupt (Ctrl-C) while an item's outputs are written -- at each file in
    turn, half-way through writing it -- must leave the item unfinished: the next run
    registers it again instead of skipping it, and then it is complete."""
    import pathlib

    from napari_registration import cli, io

    fixed = _write_tif(tmp_path / "fixed.tif", FIXED)
    moving = _write_tif(tmp_path / "moving.tif", MOVING)
    out = tmp_path / "out"

    real_write_text, real_write_image = pathlib.Path.write_text, io.write_image
    real_save = __import__("napari_registration").save_transform

    def half_then_interrupt(path, writer):
        # the file itself or its temporary name (".partial-<pid>-<name>")
        if pathlib.Path(path).name.endswith(interrupt_at):
            pathlib.Path(path).write_bytes(b"{\"half\": ")
            raise KeyboardInterrupt
        return writer()

    monkeypatch.setattr(pathlib.Path, "write_text",
                        lambda self, text, *a, **k: half_then_interrupt(
                            self, lambda: real_write_text(self, text, *a, **k)))
    monkeypatch.setattr(io, "write_image", lambda path, *a, **k: half_then_interrupt(
        path, lambda: real_write_image(path, *a, **k)))
    import napari_registration

    monkeypatch.setattr(napari_registration, "save_transform", lambda t, path: half_then_interrupt(
        path, lambda: real_save(t, path)))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["batch", str(moving), "--fixed", str(fixed), "--out", str(out), "-q"])
    item = out / "moving"
    assert not (item / "report.json").exists(), "a half-written item looks finished"
    monkeypatch.undo()

    assert cli.main(["batch", str(moving), "--fixed", str(fixed), "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "batch.json").read_text())
    assert summary["ok"] == 1 and summary["skipped"] == 0
    report = json.loads((item / "report.json").read_text())
    assert report["outputs"]["warped"].endswith("warped.tif")
    assert not [p for p in item.iterdir() if p.name.startswith(".partial")]


# --------------------------------------------------------------------- concurrency
def test_threads_give_the_serial_results(serial):
    """Every job twice, four at a time in threads: identical matrices to the serial run."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(_matrix, JOBS * 2))
    for job, want, got in zip(JOBS * 2, serial * 2, parallel):
        np.testing.assert_array_equal(got, want, err_msg=f"{job[0]} {job[1]} differs in a thread")


def test_threads_leave_simpleitk_thread_count_alone():
    if "intensity" not in available_methods():
        pytest.skip("intensity backend not installed")
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    job = ("intensity", "translation", {"seed": 1})
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(_matrix, [job] * 4))
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


def test_processes_give_the_serial_results(serial):
    """Two worker processes (spawned, as the batch CLI does): identical matrices."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [pool.submit(register, FIXED, MOVING, method=m, transform=t, **o)
                   for m, t, o in JOBS]
        results = [f.result() for f in futures]
    for job, want, got in zip(JOBS, serial, results):
        np.testing.assert_array_equal(got.transform.matrix, want,
                                      err_msg=f"{job[0]} {job[1]} differs in a process")
