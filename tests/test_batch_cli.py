"""The `stack` and `batch` subcommands, run in-process through cli.main."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_registration import Transform
from napari_registration.cli import main
from napari_registration.data import grid_points, tre_against_truth


def crop(image, d, corner=(150, 180), size=(128, 128), margin=12):
    """``out(q) = image(q + corner + d)``: registered onto the d=0 crop by a translation
    of ``+d``."""
    lo = np.asarray(corner) - margin
    region = np.asarray(image, np.float32)[lo[0]:lo[0] + size[0] + 2 * margin,
                                           lo[1]:lo[1] + size[1] + 2 * margin]
    return ndimage.shift(region, -np.asarray(d, float), order=3, mode="nearest")[
        margin:margin + size[0], margin:margin + size[1]]


@pytest.fixture(scope="module")
def camera():
    from skimage import data

    return data.camera()


DRIFTS = np.array([[0, 0], [1.3, -0.4], [2.7, 0.6], [3.1, 2.2], [2.2, 3.9], [-0.6, 4.4]])


def test_stack_command_writes_aligned_tiff_report_and_drift(camera, tmp_path, capsys):
    frames = np.stack([crop(camera, d) for d in DRIFTS])
    src = tmp_path / "series.tif"
    tifffile.imwrite(src, frames)                      # uncompressed: memory-mapped
    out = tmp_path / "out"
    assert main(["stack", str(src), "--out", str(out), "--reference", "previous", "-q"]) == 0
    aligned = tifffile.imread(out / "aligned.tif")
    assert aligned.shape == frames.shape and aligned.dtype == frames.dtype
    report = json.loads((out / "report.json").read_text())
    pts = grid_points(frames.shape[1:])
    for d, t in zip(DRIFTS, report["transforms"]):
        err = tre_against_truth(Transform.from_dict(t), Transform.from_translation(d), pts)
        assert err["mean"] <= 0.1
    rows = (out / "drift.csv").read_text().strip().splitlines()
    assert rows[0].startswith("frame,drift_row,drift_col") and len(rows) == 1 + len(DRIFTS)
    assert np.allclose([float(v) for v in rows[3].split(",")[1:3]], -DRIFTS[2], atol=0.1)
    printed = capsys.readouterr().out
    assert "6 frames" in printed and "aligned" in printed


def test_stack_command_reads_imagej_channels(camera, tmp_path):
    from skimage import data

    other = data.moon()
    frames = np.stack([np.stack([crop(camera, d), crop(other, d)]) for d in DRIFTS[:4]])
    src = tmp_path / "hyper.tif"
    tifffile.imwrite(src, frames.astype(np.float32), imagej=True, metadata={"axes": "TCYX"})
    out = tmp_path / "out"
    assert main(["stack", str(src), "--out", str(out), "--driver-channel", "1", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["channel_axis"] == 1 and report["info"]["driver_channel"] == 1
    shifts = np.array([t["matrix"][0][2:] + t["matrix"][1][2:] for t in report["transforms"]])
    assert np.allclose(shifts, DRIFTS[:4], atol=0.1)
    assert tifffile.imread(out / "aligned.tif").shape == frames.shape


def _pairs(camera, tmp_path):
    fixed = tmp_path / "fixed.tif"
    tifffile.imwrite(fixed, crop(camera, (0, 0)))
    movings = []
    for k, d in enumerate(DRIFTS[1:4]):
        path = tmp_path / f"moving_{k}.tif"
        tifffile.imwrite(path, crop(camera, d))
        movings.append(path)
    return fixed, movings


def test_batch_csv_reports_a_failing_item_and_skips_finished_ones(camera, tmp_path, capsys):
    fixed, movings = _pairs(camera, tmp_path)
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((128, 128), 7, np.uint16))    # nothing to align
    rows = ["fixed,moving,out"] + [f"fixed.tif,{m.name}," for m in movings]
    rows.insert(2, "fixed.tif,blank.tif,custom/blank")
    rows.append("fixed.tif,missing.tif,")
    table = tmp_path / "pairs.csv"
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "batch"

    assert main(["batch", str(table), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "2 failed of 5" in captured.out and "blank.tif" in captured.out
    assert "constant" in captured.out and "not found" in captured.out
    assert "[" in captured.err and "5/5" in captured.err          # the progress bar
    for k, m in enumerate(movings):
        report = json.loads((out / m.stem / "report.json").read_text())
        t = Transform.from_dict(report["transform"])
        assert np.allclose(t.matrix[:2, 2], DRIFTS[1 + k], atol=0.1)
        assert (out / m.stem / "warped.tif").exists()
    assert not (tmp_path / "custom" / "blank" / "report.json").exists()
    summary = json.loads((out / "batch.json").read_text())
    assert [i["status"] for i in summary["items"]] == ["ok", "failed", "ok", "ok", "failed"]

    # a re-run redoes only what is not finished
    stamp = (out / movings[0].stem / "report.json").stat().st_mtime_ns
    assert main(["batch", str(table), "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert "3 skipped" in captured.out and "3 of 5 already done" in captured.err
    assert (out / movings[0].stem / "report.json").stat().st_mtime_ns == stamp


def test_batch_glob_in_a_process_pool(camera, tmp_path, capsys):
    fixed, movings = _pairs(camera, tmp_path)
    out = tmp_path / "glob"
    code = main(["batch", str(tmp_path / "moving_*.tif"), "--fixed", str(fixed), "--out",
                 str(out), "--workers", "2", "-o", "upsample=50"])
    assert code == 0, capsys.readouterr()
    assert "3 registered, 0 skipped, 0 failed" in capsys.readouterr().out
    for k, m in enumerate(movings):
        report = json.loads((out / m.stem / "report.json").read_text())
        assert report["info"]["options"]["upsample"] == 50
        assert np.allclose(report["transform"]["matrix"][0][2], DRIFTS[1 + k][0], atol=0.1)


def test_batch_on_a_dask_scheduler_address(camera, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    fixed, movings = _pairs(camera, tmp_path)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        code = main(["batch", *map(str, movings), "--fixed", str(fixed), "--out",
                     str(tmp_path / "d"), "--scheduler", cluster.scheduler_address, "-q"])
    assert code == 0
    assert "3 registered" in capsys.readouterr().out


def test_batch_input_errors(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main(["batch", str(tmp_path / "bad.csv")]) == 2
    assert "fixed,moving" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "m_*.tif")]) == 2
    assert "--fixed" in capsys.readouterr().err
