"""`napari-registration batch` with pairs of slides (OME-Zarr, pyramidal OME-TIFF): each
item goes through the same pyramid path as `register`, on a dask.distributed cluster
too, and a batch killed mid-write resumes without redoing finished items or blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_registration import load_transform
from napari_registration.cli import main

SIZE = 4096
LEVELS = 4  # 4096 .. 512
BUDGET = "512"  # estimate on the 512^2 level, refine on tiles up to level 0


def _write_pair(folder: Path, angle, shift, fmt="zarr"):
    from napari_registration.bigdata import slide_pair
    from napari_registration.io_big import write_ome_tiff, write_ome_zarr

    fixed, moving, truth = slide_pair(SIZE, angle=angle, shift=shift, levels=LEVELS, chunks=512)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pyr in (("fixed", fixed), ("moving", moving)):
        if fmt == "zarr":
            path = write_ome_zarr(folder / f"{name}.ome.zarr", pyr, rgb=True, chunks=512)
        else:
            path = write_ome_tiff(folder / f"{name}.ome.tif", pyr, rgb=True)
        paths.append(path)
    return paths[0], paths[1], truth


def _tre(path: Path, truth) -> float:
    est = load_transform(path)
    pts = np.array([[0.0, 0.0], [0.0, SIZE - 1.0], [SIZE - 1.0, 0.0], [SIZE / 2, SIZE / 3]])
    return float(np.max(np.linalg.norm(est.apply(pts) - truth.apply(pts), axis=1)))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    a = _write_pair(root / "a", 3.0, (41.3, -27.8), "zarr")
    b = _write_pair(root / "b", -2.0, (-35.5, 22.25), "tiff")
    table = root / "pairs.csv"
    table.write_text("fixed,moving,out\n"
                     f"{a[0].relative_to(root)},{a[1].relative_to(root)},zarr_pair\n"
                     f"{b[0].relative_to(root)},{b[1].relative_to(root)},tiff_pair\n")
    return root, table, {"zarr_pair": a, "tiff_pair": b}


def _levels(path):
    from napari_registration.io_big import read_big

    return read_big(path).levels


@pytest.mark.slow
def test_batch_of_slides_on_a_local_cluster_matches_register(slides, tmp_path, capsys):
    pytest.importorskip("distributed")
    root, table, pairs = slides
    out = tmp_path / "batch"
    code = main(["batch", str(table), "--out", str(out), "--method", "fourier",
                 "--transform", "rigid", "--pixel-budget", BUDGET, "--format", "ome-zarr",
                 "--scheduler", "local", "--workers", "2", "-q"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "2 registered" in text
    for name, (fixed, moving, truth) in pairs.items():
        item = out / name
        report = json.loads((item / "report.json").read_text())
        assert report["info"]["pyramid"]["fixed_level"] == LEVELS - 1, report["info"]["pyramid"]
        assert _tre(item / "transform.json", truth) < 0.5
        warped = _levels(item / "warped.ome.zarr")
        assert [lv.shape for lv in warped] == [lv.shape for lv in _levels(fixed)]
        assert not (item / "warped.ome.zarr.tmp").exists()
    # the same code path as a local `register` of one pair: the same transform and pixels
    fixed, moving, _ = pairs["zarr_pair"]
    local = tmp_path / "local"
    assert main(["register", str(fixed), str(moving), "--method", "fourier", "--transform",
                 "rigid", "--pixel-budget", BUDGET, "--format", "ome-zarr", "--out", str(local),
                 "-q"]) == 0
    a = json.loads((local / "transform.json").read_text())
    b = json.loads((out / "zarr_pair" / "transform.json").read_text())
    assert np.array_equal(a["matrix"], b["matrix"])
    np.testing.assert_array_equal(np.asarray(_levels(local / "warped.ome.zarr")[2]),
                                  np.asarray(_levels(out / "zarr_pair" / "warped.ome.zarr")[2]))
    # run again: both items are finished (an OME-Zarr output is a folder) and skipped
    assert main(["batch", str(table), "--out", str(out), "--method", "fourier", "--transform",
                 "rigid", "--pixel-budget", BUDGET, "--format", "ome-zarr", "-q"]) == 0
    assert "0 registered, 2 skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_batch_of_slides_on_a_scheduler_address(slides, tmp_path, capsys):
    """An existing cluster (here: in this process, two single-thread workers, fewer
    threads than pairs): every pair registered and written, nothing left waiting."""
    distributed = pytest.importorskip("distributed")
    root, table, pairs = slides
    out = tmp_path / "batch"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        code = main(["batch", str(table), "--out", str(out), "--method", "fourier",
                     "--transform", "rigid", "--pixel-budget", BUDGET, "--format", "ome-zarr",
                     "--scheduler", cluster.scheduler_address, "-q"])
    assert code == 0, capsys.readouterr()
    assert "2 registered" in capsys.readouterr().out
    for name, (fixed, moving, truth) in pairs.items():
        assert _tre(out / name / "transform.json", truth) < 0.5
        assert len(_levels(out / name / "warped.ome.zarr")) == LEVELS


def _chunk_files(store: Path) -> dict:
    """Level-0 chunk files of an OME-Zarr store being written, with their mtimes."""
    files = {}
    for path in (store / "scale0").rglob("*") if (store / "scale0").exists() else []:
        if path.is_file() and "c" in path.relative_to(store).parts:
            files[str(path.relative_to(store))] = path.stat().st_mtime_ns
    return files


@pytest.mark.slow
def test_a_killed_batch_of_slides_resumes_without_redoing_items_or_blocks(slides, tmp_path, capsys):
    root, table, pairs = slides
    out = tmp_path / "batch"
    argv = ["batch", str(table), "--out", str(out), "--method", "fourier", "--transform",
            "rigid", "--pixel-budget", BUDGET, "--format", "ome-zarr", "-q"]
    # the exact (SciPy) warp: slow enough per block to be caught mid-write
    code = f"from napari_registration.cli import main; raise SystemExit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))
    partial = out / "tiff_pair" / "warped.ome.zarr.tmp"
    done_dir = partial / ".done" / "0"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.exists() and len(os.listdir(done_dir)) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the batch finished before it could be killed"
        assert done_dir.exists(), "the second item never started writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    first = out / "zarr_pair" / "report.json"
    assert first.exists() and not (out / "tiff_pair" / "report.json").exists()
    first_mtime = first.stat().st_mtime_ns
    done_before = set(os.listdir(done_dir))
    assert 0 < len(done_before) < 64
    files_before = _chunk_files(partial)
    # blocks marked done: their chunk files must not be written again
    kept = {f: t for f, t in files_before.items()
            if ".".join(Path(f).parts[-3:]) in done_before}  # .../c/0/i/j <-> 0.i.j
    assert kept, (sorted(files_before)[:3], sorted(done_before)[:3])

    assert main(argv) == 0
    text = capsys.readouterr()
    assert "1 registered, 1 skipped" in text.out
    assert "1 of 2 already done" in text.err
    assert first.stat().st_mtime_ns == first_mtime  # the finished item was not redone
    store = out / "tiff_pair" / "warped.ome.zarr"
    assert store.is_dir() and not partial.exists()
    after = _chunk_files(store)
    assert all(after.get(f) == t for f, t in kept.items()), "finished blocks were rewritten"
    assert len(after) > len(kept)  # the rest was written by the resumed run
    # and the resumed store holds the warp of its transform, every block of it
    from napari_registration.core.pyramid import level_warper
    from napari_registration.io_big import read_big

    fixed, moving, truth = pairs["tiff_pair"]
    assert _tre(out / "tiff_pair" / "transform.json", truth) < 0.5
    m = read_big(moving)
    warp = level_warper(m.data, load_transform(out / "tiff_pair" / "transform.json"),
                        spacing=m.spacing, origin=m.origin, rgb=True)
    level0 = _levels(store)[0]
    expect = np.asarray(warp(level0.shape[:2], np.asarray(m.spacing), np.asarray(m.origin))
                        [1024:2048, 512:2048])
    np.testing.assert_array_equal(np.asarray(level0[1024:2048, 512:2048]), expect)


def test_a_partial_warp_of_another_transform_is_not_resumed(tmp_path):
    from napari_registration import Transform, save_transform
    from napari_registration.cli import _drop_stale_partial_warp

    partial = tmp_path / "warped.ome.zarr.tmp"
    partial.mkdir()
    save_transform(Transform.from_translation((1.0, 2.0)), tmp_path / "transform.json")
    _drop_stale_partial_warp(tmp_path, Transform.from_translation((1.0, 2.0)))
    assert partial.exists()  # same transform: its finished blocks are kept
    _drop_stale_partial_warp(tmp_path, Transform.from_translation((1.0, 2.5)))
    assert not partial.exists()  # another one: started over
    partial.mkdir()
    (tmp_path / "transform.json").write_text("{not json")
    _drop_stale_partial_warp(tmp_path, Transform.from_translation((1.0, 2.0)))
    assert not partial.exists()  # unreadable: started over


def test_pairs_in_threads_of_one_worker_keep_the_threaded_scheduler_until_the_last_ends():
    import dask

    from napari_registration.cli import _local_threads

    with dask.config.set(scheduler="sync"):
        first, second = _local_threads(), _local_threads()
        first.__enter__()
        second.__enter__()
        assert dask.config.get("scheduler") == "threads"
        first.__exit__(None, None, None)  # the first pair ends: the second still writes
        assert dask.config.get("scheduler") == "threads"
        second.__exit__(None, None, None)
        assert dask.config.get("scheduler") == "sync"  # what was there before
