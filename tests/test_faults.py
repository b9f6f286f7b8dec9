"""Crashed and hostile runs (issue #16): batch CSVs from untrusted hands, processes
killed while writing, a full disk, a stack resumed after a kill.

Outcomes pinned here: a batch writes only under --out; a bad CSV is refused before
anything is written, with the line number; an output under its real name is always
complete (temp name + rename), and report.json -- the "done" marker -- is written last
and removed before an item is redone, so a killed or failed item is never skipped as
done; a full disk gives a non-zero exit, a correct summary and no truncated files.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import data

from napari_registration.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
_CAM = data.camera().astype(np.float32)
FIXED = _CAM[60:188, 100:228].copy()
MOVINGS = [_CAM[60 + dy:188 + dy, 100 + dx:228 + dx].copy() for dy, dx in
           [(3, -4), (-2, 5), (1, 1), (4, 2)]]


@pytest.fixture
def pairs(tmp_path):
    """fixed.tif and m0..m3.tif in tmp_path/data."""
    d = tmp_path / "data"
    d.mkdir()
    tifffile.imwrite(d / "fixed.tif", FIXED)
    for k, m in enumerate(MOVINGS):
        tifffile.imwrite(d / f"m{k}.tif", m)
    return d


def _files(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _csv(folder: Path, text: str, name="pairs.csv", encoding="utf-8") -> Path:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


# ----------------------------------------------------------------- batch CSV table
CSV_CASES = [
    # case, csv text, expected exit code, regex in stderr (or None)
    ("out with ..", "fixed,moving,out\nfixed.tif,m0.tif,../../escaped\n", 2, "contains '..'"),
    ("out absolute", "fixed,moving,out\nfixed.tif,m0.tif,{abs}\n", 2, "absolute path"),
    ("duplicate out", "fixed,moving,out\nfixed.tif,m0.tif,same\nfixed.tif,m1.tif,same\n", 2,
     "same folder"),
    ("duplicate via ./", "fixed,moving,out\nfixed.tif,m0.tif,same\nfixed.tif,m1.tif,./same\n", 2,
     "same folder"),
    ("out is --out itself", "fixed,moving,out\nfixed.tif,m0.tif,.\n", 2, "--out itself"),
    ("row with fewer columns", "fixed,moving,out\nfixed.tif,m0.tif,a\nfixed.tif\n", 2,
     "line 3 has 1 columns"),
    ("row with more columns", "fixed,moving\nfixed.tif,m0.tif,extra\n", 2, "line 2 has 3 columns"),
    ("empty moving", "fixed,moving\nfixed.tif,\n", 2, "'moving' column is empty"),
    ("no header", "fixed.tif,m0.tif\n", 2, "needs a header row"),
    ("unknown column", "fixed,moving,output\nfixed.tif,m0.tif,x\n", 2, "needs a header row"),
    ("empty file", "", 2, "empty file"),
    ("not UTF-8", "fixed,moving\n\xff\xfe\x00bad,m0.tif\n", 2, None),
    ("UTF-8 byte-order mark (spreadsheet)", "\ufefffixed,moving,out\nfixed.tif,m0.tif,a\n", 0, None),
    ("blank lines and spaces", "\nfixed, moving ,out\n\nfixed.tif , m0.tif,a\n,,\n\n", 0, None),
    ("Windows line ends, upper-case header", "FIXED,MOVING\r\nfixed.tif,m0.tif\r\n", 0, None),
]


@pytest.mark.parametrize("name,text,code,message", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_batch_csv_table(pairs, tmp_path, capsys, name, text, code, message):
    out = tmp_path / "results"
    text = text.replace("{abs}", str(tmp_path / "abs-target"))
    table = _csv(pairs, text, encoding="latin-1" if name == "not UTF-8" else "utf-8")
    before = _files(tmp_path)
    assert main(["batch", str(table), "--out", str(out), "-q"]) == code
    err = capsys.readouterr().err
    if message:
        import re

        assert re.search(message, err), err
    written = _files(tmp_path) - before
    assert all(w.startswith("results") for w in written), f"wrote outside --out: {written}"
    if code != 0:
        assert not written, f"a refused batch wrote {written}"
    else:
        assert any(w.endswith("report.json") for w in written)


def test_batch_symlink_out_of_the_output_folder_is_refused(pairs, tmp_path, capsys):
    out = tmp_path / "results"
    outside = tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    table = _csv(pairs, "fixed,moving,out\nfixed.tif,m0.tif,link/item\n")
    assert main(["batch", str(table), "--out", str(out), "-q"]) == 2
    assert "outside --out" in capsys.readouterr().err
    assert not list(outside.iterdir())
    # a default folder name that is a symlink leading out is refused too
    (out / "m1").symlink_to(outside, target_is_directory=True)
    assert main(["batch", str(pairs / "m1.tif"), "--fixed", str(pairs / "fixed.tif"),
                 "--out", str(out), "-q"]) == 2
    assert not list(outside.iterdir())


def test_csv_out_is_under_the_output_folder_not_the_csv_folder(pairs, tmp_path):
    out = tmp_path / "results"
    table = _csv(pairs, "fixed,moving,out\nfixed.tif,m0.tif,sub/one\n")
    assert main(["batch", str(table), "--out", str(out), "-q"]) == 0
    assert (out / "sub" / "one" / "report.json").is_file()
    assert not (pairs / "sub").exists()


# --------------------------------------------------------- interrupted / failed writes
def test_force_rerun_interrupted_while_writing_is_redone_next_time(pairs, tmp_path, monkeypatch):
    """batch --force over a finished item, interrupted half-way through writing
    warped.tif: the old report.json is gone, warped.tif is the old complete file (never
    a truncated one), and the next run (without --force) redoes the item."""
    from napari_registration import io

    out = tmp_path / "results"
    argv = ["batch", str(pairs / "m0.tif"), "--fixed", str(pairs / "fixed.tif"), "--out", str(out), "-q"]
    assert main(argv) == 0
    item = out / "m0"
    old_warped = (item / "warped.tif").read_bytes()

    real = tifffile.imwrite

    def half_then_interrupt(path, array, *a, **k):
        Path(path).write_bytes(b"II*\x00" + b"\x00" * 100)  # a truncated TIFF
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--force"])
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert not (item / "report.json").exists(), "the old marker survived an interrupted redo"
    assert (item / "warped.tif").read_bytes() == old_warped
    assert not [p for p in item.iterdir() if p.name.startswith(".partial")]
    assert main(argv) == 0
    summary = json.loads((out / "batch.json").read_text())
    assert summary["ok"] == 1 and summary["skipped"] == 0


def test_report_listing_a_missing_or_changed_output_is_not_done(pairs, tmp_path):
    out = tmp_path / "results"
    argv = ["batch", str(pairs / "m0.tif"), "--fixed", str(pairs / "fixed.tif"), "--out", str(out), "-q"]
    assert main(argv) == 0
    (out / "m0" / "warped.tif").write_bytes(b"II*\x00")  # truncated behind our back
    assert main(argv) == 0
    assert json.loads((out / "batch.json").read_text())["skipped"] == 0
    (out / "m0" / "report.json").write_text('{"outputs": ')  # cut short
    assert main(argv) == 0
    assert json.loads((out / "batch.json").read_text())["skipped"] == 0
    assert main(argv) == 0
    assert json.loads((out / "batch.json").read_text())["skipped"] == 1


@pytest.mark.parametrize("victim", ["tifffile", "json", "itk", "png"])
def test_full_disk_fails_the_item_cleanly(pairs, tmp_path, monkeypatch, capsys, victim):
    """ENOSPC while writing any output: exit status 1, the summary counts the item as
    failed with the reason, and no truncated or temp file is left, no report.json."""
    import imageio.v3 as iio

    import napari_registration.core.itk as itk

    def full(path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"\x00" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    if victim == "tifffile":
        monkeypatch.setattr(tifffile, "imwrite", full)
    elif victim == "png":
        monkeypatch.setattr(iio, "imwrite", full)
    elif victim == "itk":
        monkeypatch.setattr(itk, "write_itk_transform", lambda t, path: full(path))
    else:
        real = Path.write_text

        def write_text(self, text, *a, **k):
            if self.name.endswith("transform.json"):
                full(self)
            return real(self, text, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "results"
    code = main(["batch", str(pairs / "m0.tif"), str(pairs / "m1.tif"), "--fixed",
                 str(pairs / "fixed.tif"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "No space left" in captured.out
    summary = json.loads((out / "batch.json").read_text())
    assert summary["failed"] == 2 and summary["ok"] == 0
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != "batch.json"]
    for p in leftovers:
        assert not p.name.startswith(".partial"), p
        assert p.name != "report.json", p
        if p.suffix == ".tif":
            tifffile.imread(p)  # anything left under a real name is complete


def test_register_on_a_full_disk_exits_non_zero_without_truncated_files(pairs, tmp_path,
                                                                         monkeypatch, capsys):
    def full(path, *a, **k):
        Path(path).write_bytes(b"\x00" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full)
    out = tmp_path / "reg"
    assert main(["register", str(pairs / "fixed.tif"), str(pairs / "m0.tif"), "--out", str(out),
                 "-q"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert not [p for p in out.rglob("*") if p.is_file()]


# ------------------------------------------------------------------ real kills
_KILLABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import napari_registration.core.stack as stack
    from napari_registration import cli
    slow = float(sys.argv[2])
    real = stack._register_task
    def slow_task(*a, **k):
        time.sleep(slow)
        return real(*a, **k)
    stack._register_task = slow_task
    real_write = cli.write_outputs
    def slow_write(*a, **k):
        time.sleep(slow)
        return real_write(*a, **k)
    cli.write_outputs = slow_write
    sys.exit(cli.main(sys.argv[3:]))
""")


def _start(args, slow=0.15):
    return subprocess.Popen([sys.executable, "-c", _KILLABLE, SRC, str(slow), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, condition, timeout=60.0):
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-500:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting to kill the run")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_killed_stack_resumes_from_its_finished_frames(tmp_path, capsys, monkeypatch):
    """SIGKILL a `stack` run after some frames: no report.json (the earlier one was
    removed at the start), no aligned.tif; the next run registers only the missing
    frames and its result equals an uninterrupted run's."""
    import napari_registration.core.stack as stack

    rng = np.random.default_rng(3)
    drifts = np.cumsum(rng.normal(0, 1.0, (10, 2)), axis=0).round()
    frames = np.stack([_CAM[100 + int(dy):228 + int(dy), 150 + int(dx):278 + int(dx)]
                       for dy, dx in drifts]).astype(np.float32)
    src = tmp_path / "series.tif"
    tifffile.imwrite(src, frames)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(["stack", str(src), "--out", str(out), "-q"]) == 0   # an earlier, finished run
    assert main(["stack", str(src), "--out", str(fresh), "-q"]) == 0
    checkpoint = out / "checkpoint.jsonl"

    def frames_logged():
        try:
            return len(checkpoint.read_text().splitlines()) - 1 >= 3
        except OSError:
            return False

    proc = _start(["stack", src, "--out", out, "-q", "--force"])
    _kill_when(proc, frames_logged)
    assert not (out / "report.json").exists(), "a killed run left a report.json that looks done"
    logged = len(checkpoint.read_text().splitlines()) - 1

    calls = []
    real = stack._register_task
    monkeypatch.setattr(stack, "_register_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["stack", str(src), "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err
    assert len(calls) == len(frames) - 1 - logged
    np.testing.assert_array_equal(tifffile.imread(out / "aligned.tif"),
                                  tifffile.imread(fresh / "aligned.tif"))
    assert json.loads((out / "report.json").read_text())["outputs"]["aligned"].endswith("aligned.tif")
    assert not checkpoint.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]


def test_checkpoint_of_other_settings_or_cut_short_is_not_trusted(tmp_path, capsys):
    frames = np.stack([_CAM[100 + k:228 + k, 150:278] for k in range(5)]).astype(np.float32)
    src = tmp_path / "series.tif"
    tifffile.imwrite(src, frames)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.jsonl").write_text('{"run": "another run"}\n{"frame": 1, "transform": '
                                          '{"matrix": [[1, 0, 50], [0, 1, 0], [0, 0, 1]]}}\n'
                                          '{"frame": 2, "transf')
    assert main(["stack", str(src), "--out", str(out)]) == 0
    assert "resuming" not in capsys.readouterr().err
    drift = np.loadtxt(out / "drift.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    np.testing.assert_allclose(np.abs(drift[:, 0]), np.arange(5), atol=0.2)


def test_killed_batch_never_leaves_a_half_written_item_marked_done(pairs, tmp_path):
    """SIGKILL a batch at several moments: every item with a report.json has complete,
    readable outputs of the recorded sizes; a rerun finishes the rest."""
    from napari_registration.cli import _finished

    movings = [pairs / f"m{k}.tif" for k in range(4)]
    for delay in (0.4, 1.2):
        out = tmp_path / f"results{delay}"
        proc = _start(["batch", *movings, "--fixed", pairs / "fixed.tif", "--out", out, "-q"],
                      slow=0.3)
        t0 = time.monotonic()
        _kill_when(proc, lambda: time.monotonic() - t0 > delay and (out / "m0").exists())
        for item in out.iterdir() if out.exists() else []:
            if (item / "report.json").exists():
                assert _finished(item)
                report = json.loads((item / "report.json").read_text())
                tifffile.imread(report["outputs"]["warped"])
            for p in item.iterdir():
                if p.suffix == ".tif" and not p.name.startswith(".partial"):
                    tifffile.imread(p)
        assert main(["batch", *map(str, movings), "--fixed", str(pairs / "fixed.tif"),
                     "--out", str(out), "-q"]) == 0
        assert all(_finished(out / f"m{k}") for k in range(4))


# ------------------------------------------------------------ process-pool faults
_JOBS = textwrap.dedent("""
    import os, signal, time

    def slow(k, folder):
        open(os.path.join(folder, f"pid-{os.getpid()}"), "w").close()
        time.sleep(2.0)
        open(os.path.join(folder, f"done-{k}"), "w").close()
        return k

    def dies_on_3(k):
        if k == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.1)
        return k * 10
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            state = [ln for ln in fh if ln.startswith("State:")][0]
        return "Z" not in state.split()[1]  # a zombie has stopped running
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_with_a_killed_parent(tmp_path):
    (tmp_path / "faultjobs.py").write_text(_JOBS)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{SRC!r}, {str(tmp_path)!r}]
        from napari_registration.core.stack import iter_tasks
        import faultjobs
        if __name__ == "__main__":
            for _ in iter_tasks(faultjobs.slow, ((k, (k, {str(marks)!r})) for k in range(8)),
                                workers=2):
                pass
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    _kill_when(proc, lambda: len(list(marks.glob("pid-*"))) >= 2, timeout=60)
    pids = [int(p.name[4:]) for p in marks.glob("pid-*")]
    deadline = time.monotonic() + 2.0
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, pids)), "pool workers outlived their killed parent"
    time.sleep(2.5)  # long enough for an orphan to finish its item and write
    assert not list(marks.glob("done-*")), "an orphaned worker went on writing"


def test_a_worker_killed_mid_run_fails_only_its_item(tmp_path, monkeypatch):
    """A worker SIGKILLed (as the OOM killer does): that item is reported failed with a
    clear message; items in flight with it are retried; the run goes on."""
    from napari_registration.core.stack import iter_tasks

    (tmp_path / "faultjobs2.py").write_text(_JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import faultjobs2

    results = {k: (out, err) for k, out, err in
               iter_tasks(faultjobs2.dies_on_3, ((k, (k,)) for k in range(8)), workers=2)}
    assert sorted(results) == list(range(8))
    assert "worker process died" in str(results[3][1])
    assert {k: out for k, (out, err) in results.items() if k != 3} == {k: k * 10 for k in range(8) if k != 3}


def test_workers_without_a_main_guard_fall_back_to_threads(tmp_path):
    """A script calling register_stack(workers=2) at top level (no __main__ guard) used
    to die with BrokenProcessPool; it now runs in threads and says how to use processes."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        import numpy as np
        from napari_registration import register_stack
        rng = np.random.default_rng(0)
        base = rng.random((80, 80)).astype(np.float32)
        frames = np.stack([np.roll(base, k, axis=1) for k in range(4)])
        r = register_stack(frames, workers=2)
        print("drift", [round(float(v), 2) for v in r.drift[:, 1]])
        print("scheduler", r.info["scheduler"])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "guard" in proc.stderr and "threads" in proc.stderr
    assert "scheduler threads (2; no __main__ guard)" in proc.stdout
    assert "drift [0.0, -1.0, -2.0, -3.0]" in proc.stdout or "drift [0.0, 1.0, 2.0, 3.0]" in proc.stdout


def test_stack_on_a_full_disk_leaves_no_truncated_stack_and_resumes(tmp_path, monkeypatch, capsys):
    frames = np.stack([_CAM[100 + k:228 + k, 150:278] for k in range(4)]).astype(np.float32)
    src = tmp_path / "series.tif"
    tifffile.imwrite(src, frames)
    out = tmp_path / "out"
    real = tifffile.imwrite

    def full(path, *a, **k):
        Path(path).write_bytes(b"II*\x00" + b"\x00" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full)
    assert main(["stack", str(src), "--out", str(out), "-q"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.jsonl"]
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert main(["stack", str(src), "--out", str(out)]) == 0
    assert "resuming, 3 frame(s)" in capsys.readouterr().err
    assert tifffile.imread(out / "aligned.tif").shape == frames.shape


def test_stack_with_bad_settings_touches_nothing(tmp_path, capsys):
    """Refused settings (a reference out of range) leave an earlier finished run as it
    was: its report.json is not removed, no checkpoint is written."""
    frames = np.stack([_CAM[100 + k:228 + k, 150:278] for k in range(3)]).astype(np.float32)
    src = tmp_path / "series.tif"
    tifffile.imwrite(src, frames)
    out = tmp_path / "out"
    assert main(["stack", str(src), "--out", str(out), "-q"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["stack", str(src), "--out", str(out), "-q", "--reference", "7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["stack", str(src), "--out", str(tmp_path / "new"), "-q", "--reference", "7"]) == 2
    assert not (tmp_path / "new").exists()
