"""``napari-registration`` command line: register two image files, or run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .core.files import write_text_atomic


def _parse_options(items) -> dict:
    """``--option key=value`` pairs; values parsed as JSON when they can be."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--option needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _progress_printer(enabled: bool):
    if not enabled:
        return None
    last = [-1]

    def progress(fraction, message):
        pct = int(fraction * 100)
        if pct // 10 != last[0] // 10 or fraction >= 1:
            last[0] = pct
            print(f"  {pct:3d}%  {message}", file=sys.stderr, flush=True)

    return progress


def write_outputs(result, fixed, out: Path, *, fixed_spacing=None, fixed_origin=None,
                  suffix=".tif") -> dict:
    """Write warped image, transform.json (+ .tfm when linear), checkerboard.png, report.json."""
    from . import save_transform
    from .core.qc import checkerboard
    from .io import write_image

    out.mkdir(parents=True, exist_ok=True)
    # the old "done" marker goes first: if this run dies while overwriting, the folder
    # no longer claims to be finished (batch would otherwise skip it next time)
    (out / "report.json").unlink(missing_ok=True)
    paths = {}
    if result.warped is not None:
        paths["warped"] = str(write_image(out / f"warped{suffix}", result.warped, fixed_spacing, fixed_origin))
    paths["transform"] = str(save_transform(result.transform, out / "transform.json"))
    if (result.transform.is_linear and not result.transform.is_projective
            and result.transform.ndim in (2, 3)):
        paths["transform_itk"] = str(save_transform(result.transform, out / "transform.tfm"))
    if result.warped is not None:
        fixed_grey = np.asarray(fixed, np.float32)
        warped = np.asarray(result.warped, np.float32)
        if warped.ndim == fixed_grey.ndim + 1:  # rgb
            warped = warped[..., :3].mean(-1)
        if fixed_grey.ndim == warped.ndim + 1:
            fixed_grey = fixed_grey[..., :3].mean(-1)
        board = checkerboard(fixed_grey, warped, spacing=fixed_spacing)
        if board.ndim == 3:
            board = board[board.shape[0] // 2]
        paths["checkerboard"] = str(write_image(out / "checkerboard.png", (board * 255).astype(np.uint8)))
    report = result.to_dict()
    report["outputs"] = paths
    report["output_bytes"] = {k: Path(v).stat().st_size for k, v in paths.items()}
    # report.json marks a finished item (batch skips folders that have one): write it
    # last and atomically, so an interrupted run never leaves a half-written one
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    paths["report"] = str(out / "report.json")
    return paths


def _summary(result) -> str:
    b, a = result.metrics.get("before", {}), result.metrics.get("after", {})
    lines = [f"method={result.info['method']} transform={result.info['transform']} "
             f"in {result.info['seconds']:.2f} s"]
    for key in ("mse", "ncc", "mi"):
        if key in b:
            lines.append(f"  {key:4s} before {b[key]:8.4f}   after {a[key]:8.4f}")
    return "\n".join(lines)


def cmd_register(args) -> int:
    from . import register
    from .io import read_image
    from .io_big import is_big_path
    from .orientation import cli_register, needs_physical

    if args.format != "ome-zarr" and needs_physical(args.fixed, args.moving):
        return cli_register(args)  # rotated axes: register in physical space
    if (is_big_path(args.fixed) or is_big_path(args.moving) or args.pixel_budget is not None
            or args.format == "ome-zarr"):
        return cmd_register_big(args)
    fixed, f_sp, f_or = read_image(args.fixed)
    moving, m_sp, m_or = read_image(args.moving)
    for name, image in ((args.fixed, fixed), (args.moving, moving)):
        if image.ndim not in (2, 3):  # refused before anything is written
            raise ValueError(f"{name} is {image.ndim}D (shape {image.shape}); the register "
                             "command works on 2D or 3D images (2D RGB included): take a 2D/3D "
                             "part, or use the 'stack' command for a time series")
    options = _parse_options(args.option)
    if args.equalize:
        options["equalize"] = args.equalize
    result = register(
        fixed, moving, method=args.method, transform=args.transform,
        fixed_spacing=args.fixed_spacing or f_sp, moving_spacing=args.moving_spacing or m_sp,
        fixed_origin=f_or, moving_origin=m_or, progress=_progress_printer(not args.quiet),
        **options,
    )
    name = Path(args.moving).name.lower()
    suffix = ".nii.gz" if name.endswith((".nii", ".nii.gz")) else ".tif"
    paths = write_outputs(result, fixed, Path(args.out), fixed_spacing=args.fixed_spacing or f_sp,
                          fixed_origin=f_or, suffix=suffix)
    print(_summary(result))
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0


def cmd_demo(args) -> int:
    from . import register
    from .data import fluorescence_pair, grid_points, tre_against_truth

    print("demo: two channels of a scikit-image IHC slide, offset by a known shift and rotation")
    fixed, moving, truth = fluorescence_pair()
    t0 = time.perf_counter()
    result = register(fixed, moving, method=args.method, transform=args.transform,
                      progress=_progress_printer(not args.quiet))
    elapsed = time.perf_counter() - t0
    err = tre_against_truth(result.transform, truth, grid_points(fixed.shape))
    print(_summary(result))
    print(f"  TRE against the known transform: mean {err['mean']:.3f} px, max {err['max']:.3f} px"
          f" ({elapsed:.2f} s)")
    out = Path(args.out)
    paths = write_outputs(result, fixed, out)
    from .io import write_image

    write_image(out / "fixed.tif", fixed)
    write_image(out / "moving.tif", moving)
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0


def cmd_methods(args) -> int:
    from . import available_methods, method_info

    for name in available_methods():
        meta = method_info(name)
        print(f"{name}: {meta['description']}")
        print(f"  transforms: {', '.join(meta['transforms'])}")
        opts = ", ".join(f"{k}={v!r}" for k, v in meta["options"].items())
        print(f"  options: {opts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="napari-registration",
        description="Align images: the napari-registration engine without napari.",
    )
    parser.add_argument("--version", action="version", version=f"napari-registration {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("register", help="register MOVING onto FIXED and write the results")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("--method", default="fourier")
    p.add_argument("--transform", default="translation")
    p.add_argument("--out", default="registration-out", help="output folder")
    p.add_argument("--fixed-spacing", type=float, nargs="+", default=None,
                   help="override the fixed image's pixel size (napari axis order)")
    p.add_argument("--moving-spacing", type=float, nargs="+", default=None)
    p.add_argument("--equalize", choices=["hist", "clahe"], default=None)
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. -o upsample=50 (repeatable)")
    p.add_argument("--quiet", "-q", action="store_true")
    _add_big_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("demo", help="register bundled sample data and report the accuracy")
    p.add_argument("--out", default="registration-demo")
    p.add_argument("--method", default="fourier")
    p.add_argument("--transform", default="rigid")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list methods, their transforms and options")
    p.set_defaults(func=cmd_methods)
    _add_stack_parsers(sub)
    _add_view_parser(sub)
    return parser


# --------------------------------------------------------- big images (io_big, pyramid)
BIG_OUTPUT_PIXELS = 64 * 1024 * 1024  # warped outputs larger than this go to OME-Zarr


def _add_big_options(p) -> None:
    p.add_argument("--pixel-budget", type=int, default=None, metavar="N",
                   help="estimate on the pyramid level of about N x N pixels (default 2048 for "
                        "OME-Zarr/pyramidal TIFF/DICOM input), refine on tiles, warp lazily")
    p.add_argument("--format", choices=["auto", "ome-zarr", "tif"], default="auto",
                   help="warped output: ome-zarr (multiscale, block by block), tif, or auto "
                        f"(OME-Zarr above {BIG_OUTPUT_PIXELS // 2**20} M pixels)")
    p.add_argument("--channel", type=int, default=None,
                   help="the channel to register in a multi-channel OME-Zarr")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="write the warped OME-Zarr on a dask.distributed scheduler "
                        "(tcp://host:8786)")


def cmd_register_big(args) -> int:
    """OME-Zarr / pyramidal OME-TIFF / DICOM / any image: register coarse, refine on
    tiles, write the warp lazily (OME-Zarr, every level straight from the moving pyramid)."""
    from . import register, save_transform
    from .core.pyramid import choose_level, as_levels, level_warper
    from .core.qc import checkerboard
    from .io import write_image
    from .io_big import read_big, write_ome_zarr

    fixed = read_big(args.fixed, channel=args.channel)
    moving = read_big(args.moving, channel=args.channel)
    f_sp = tuple(args.fixed_spacing) if args.fixed_spacing else fixed.spacing
    m_sp = tuple(args.moving_spacing) if args.moving_spacing else moving.spacing
    options = _parse_options(args.option)
    if args.equalize:
        options["equalize"] = args.equalize
    options["warp"] = False  # the warp is written below, block by block
    result = register(fixed.data, moving.data, method=args.method, transform=args.transform,
                      fixed_spacing=f_sp, moving_spacing=m_sp, fixed_origin=fixed.origin,
                      moving_origin=moving.origin, progress=_progress_printer(not args.quiet),
                      pixel_budget=args.pixel_budget, **options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the old "done" marker goes first (batch skips folders that have one), and a warp
    # interrupted earlier is resumed only if it was started with this very transform
    (out / "report.json").unlink(missing_ok=True)
    _drop_stale_partial_warp(out, result.transform)
    paths = {"transform": str(save_transform(result.transform, out / "transform.json"))}
    linear = result.transform.is_linear and not result.transform.is_projective
    if linear:
        paths["transform_itk"] = str(save_transform(result.transform, out / "transform.tfm"))
    warp = level_warper(moving.data, result.transform, spacing=m_sp, origin=moving.origin,
                        rgb=moving.rgb, fast=bool(options.get("fast_warp")))
    shape0 = fixed.levels[0].shape[:len(f_sp)]
    big = float(np.prod(shape0)) > BIG_OUTPUT_PIXELS
    t0 = time.perf_counter()
    if args.format == "ome-zarr" or (args.format == "auto" and big):
        client = _scheduler(argparse.Namespace(scheduler=args.scheduler, workers=1))
        try:
            n_levels = len(fixed.levels) if len(fixed.levels) > 1 else None
            level0 = warp(shape0, np.asarray(f_sp), np.asarray(fixed.origin))
            paths["warped"] = str(write_ome_zarr(
                out / "warped.ome.zarr", level0, spacing=f_sp, origin=fixed.origin,
                rgb=moving.rgb, n_levels=n_levels, make_level=warp, client=client,
                chunks=level0.chunksize[:len(f_sp)]))
        finally:
            if client is not None:
                client.close()
    else:
        warped = np.asarray(warp(shape0, np.asarray(f_sp), np.asarray(fixed.origin)))
        name = Path(args.moving).name.lower()
        suffix = ".nii.gz" if name.endswith((".nii", ".nii.gz", ".dcm")) or Path(args.moving).is_dir() else ".tif"
        paths["warped"] = str(write_image(out / f"warped{suffix}", warped, f_sp, fixed.origin))
    write_seconds = time.perf_counter() - t0
    # a checkerboard at the fixed level that fits 2048 px a side
    levels = as_levels(fixed.data, spacing=f_sp, origin=fixed.origin, rgb=fixed.rgb,
                       budget=None if len(fixed.levels) > 1 else 2048)
    lev = levels[choose_level(levels, 2048)]
    grey_f = np.asarray(lev.data, np.float32)
    grey_w = np.asarray(warp(lev.shape, lev.spacing, lev.origin), np.float32)
    if fixed.rgb:
        grey_f = grey_f[..., :3].mean(-1)
    if moving.rgb:
        grey_w = grey_w[..., :3].mean(-1)
    board = checkerboard(grey_f, grey_w, spacing=lev.spacing)
    if board.ndim == 3:
        board = board[board.shape[0] // 2]
    paths["checkerboard"] = str(write_image(out / "checkerboard.png", (board * 255).astype(np.uint8)))
    report = result.to_dict()
    report["fixed"].update({"file": str(args.fixed), "geometry": fixed.geometry()})
    report["moving"].update({"file": str(args.moving), "geometry": moving.geometry()})
    report["write_seconds"] = write_seconds
    report["outputs"] = paths
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    paths["report"] = str(out / "report.json")
    if getattr(args, "_silent", False):  # a batch item: the batch reports
        return 0
    print(_summary(result))
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0


def _drop_stale_partial_warp(out: Path, transform) -> None:
    """``warped.ome.zarr.tmp`` is a write that was interrupted; its finished blocks are
    kept (write_ome_zarr resumes them) only when the transform.json written before it
    holds the same transform, otherwise they would show a different alignment."""
    import shutil

    from . import load_transform

    partial = out / "warped.ome.zarr.tmp"
    if not partial.exists():
        return
    try:
        old = load_transform(out / "transform.json")
        if old.matrix is not None and transform.matrix is not None:
            same = bool(np.allclose(old.matrix, transform.matrix, rtol=0, atol=1e-9))
        else:  # deformable: the saved file must describe the very same transform
            same = json.dumps(old.to_dict(), sort_keys=True, default=str) == json.dumps(
                transform.to_dict(), sort_keys=True, default=str)
    except (OSError, ValueError, TypeError, KeyError):
        same = False
    if not same:
        shutil.rmtree(partial)


# ------------------------------------------------------------------ stack and batch
def _scheduler(args):
    """A dask.distributed client for ``--scheduler ADDRESS`` (``local``: a LocalCluster
    of ``--workers`` processes), or None."""
    if not getattr(args, "scheduler", None):
        return None
    from distributed import Client

    if args.scheduler == "local":
        return Client(n_workers=max(1, args.workers), threads_per_worker=1,
                      dashboard_address=None)
    return Client(args.scheduler)


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(round(width * done / max(total, 1)))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done:>{len(str(total))}}/{total}"


def _open_stack(path):
    """``(array, axes or None, spacing of the last two/three axes or None)``. An
    uncompressed TIFF is memory-mapped and returned as a dask array (one frame per
    chunk along its first axis) so it is never loaded whole."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".tif", ".tiff")):
        import tifffile

        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            tif = tifffile.TiffFile(path)
        except (OSError, ValueError, IndexError, KeyError) as err:
            first = str(err).strip().splitlines()
            raise ValueError(f"cannot read image {path}: "
                             f"{first[-1] if first else type(err).__name__}") from None
        with tif:
            if not tif.series:
                raise ValueError(f"cannot read image {path}: the TIFF holds no image series")
            series = tif.series[0]
            axes = series.axes
            ij = tif.imagej_metadata or {}
            spacing = None
            page = tif.pages[0]
            xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
            if ij and xres is not None and yres is not None:
                spacing = (yres.value[1] / yres.value[0], xres.value[1] / xres.value[0])
                if "Z" in axes and "spacing" in ij:
                    spacing = (float(ij["spacing"]),) + spacing
        try:
            array = tifffile.memmap(path, mode="r")
        except (ValueError, OSError):
            array = tifffile.imread(path)
        if isinstance(array, np.memmap):
            import dask.array as da

            array = da.from_array(array, chunks=(1,) + array.shape[1:])
        return array, axes, spacing
    from .io import read_image

    array, spacing, _ = read_image(path)
    return array, None, spacing


def cmd_stack(args) -> int:
    from .core.stack import write_tiff_stack

    frames, axes, file_spacing = _open_stack(args.input)
    axes = axes or ""
    axis = args.axis if args.axis is not None else (axes.index("T") if "T" in axes else 0)
    channel_axis = args.channel_axis
    if channel_axis is None and "C" in axes:
        channel_axis = axes.index("C")
    reference = args.reference
    if reference.lstrip("-").isdigit():
        reference = int(reference)
    options = _parse_options(args.option)
    ndim_frame = frames.ndim - 1 - (channel_axis is not None)
    spacing = args.spacing
    if spacing is None and file_spacing is not None and len(file_spacing) in (ndim_frame, 2):
        spacing = file_spacing if len(file_spacing) == ndim_frame else (1.0,) * (ndim_frame - 2) + tuple(file_spacing)
    from .core.stack import iter_register_stack
    from .io import write_atomic

    out = Path(args.out)
    # frames finished by an interrupted run with the same settings are read back from
    # the checkpoint and not registered again; the old "done" marker is removed when
    # the run starts (the first event: bad settings are refused before it, untouched)
    run_key = _stack_run_key(args, frames, axis, reference, spacing, channel_axis, options)
    checkpoint = out / "checkpoint.jsonl"
    known = {} if args.force else _read_checkpoint(checkpoint, run_key, int(frames.shape[axis]))
    if known and not args.quiet:
        print(f"stack: resuming, {len(known)} frame(s) already registered by an interrupted "
              "run (--force to start over)", file=sys.stderr)
    client = _scheduler(args)
    progress = _progress_printer(not args.quiet)
    try:
        with _Checkpoint(checkpoint, run_key, known) as log:
            gen = iter_register_stack(
                frames, axis=axis, reference=reference, method=args.method,
                transform=args.transform, spacing=spacing, channel_axis=channel_axis,
                driver_channel=args.driver_channel, downsample=args.downsample, client=client,
                workers=args.workers, on_error=args.on_error, known=known, **options)
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                log.start()
                if event["phase"] == "register" and "transform" in event:
                    log.add(event["frame"], event["transform"], event.get("info"))
                if progress is not None:
                    progress(float(event["fraction"]), str(event["message"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").unlink(missing_ok=True)  # (a run without events)
        aligned = out / "aligned.tif"
        write_atomic(aligned, lambda tmp: write_tiff_stack(
            tmp, result.warped, frames_per_batch=max(2, 2 * args.workers)))
    finally:
        if client is not None:
            client.close()
    drift = result.drift
    names = ["plane", "row", "col"][-drift.shape[1]:]
    lines = ["frame," + ",".join(f"drift_{n}" for n in names) + ",ncc_before,ncc_after,error"]
    for i, (d, fi) in enumerate(zip(drift, result.info["frames"])):
        b, a = (f"{fi[k]:.4f}" if fi.get(k) is not None else "" for k in ("ncc_before", "ncc_after"))
        lines.append(f"{i}," + ",".join(f"{v:.4f}" for v in d) + f",{b},{a},{fi.get('error', '')}")
    write_text_atomic(out / "drift.csv", "\n".join(lines) + "\n")
    report = result.to_dict()
    report["outputs"] = {"aligned": str(aligned), "drift": str(out / "drift.csv"),
                         "report": str(out / "report.json")}
    report["output_bytes"] = {k: Path(v).stat().st_size for k, v in report["outputs"].items()
                              if k != "report"}
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))  # the marker, last
    checkpoint.unlink(missing_ok=True)
    span = np.ptp(drift, axis=0) if len(drift) else np.zeros(0)
    print(f"stack: {len(result.transforms)} frames, reference={result.info['reference']}, "
          f"method={args.method} {args.transform}, {result.info['seconds']:.2f} s "
          f"({result.info['scheduler']})")
    print("  drift range (world units, " + ", ".join(names) + "): "
          + ", ".join(f"{v:.2f}" for v in span))
    if result.info["failed"]:
        print(f"  {result.info['failed']} frame(s) could not be registered and were kept in place")
    for key, path in report["outputs"].items():
        print(f"  {key}: {path}")
    return 0


def _stack_run_key(args, frames, axis, reference, spacing, channel_axis, options) -> str:
    """What must match for a checkpoint to be reused: the input file (size, mtime) and
    every setting that changes a frame's transform."""
    import hashlib

    st = Path(args.input).stat()
    key = {"input": str(Path(args.input).resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
           "shape": list(map(int, frames.shape)), "axis": axis, "reference": reference,
           "method": args.method, "transform": args.transform,
           "spacing": None if spacing is None else list(map(float, spacing)),
           "channel_axis": channel_axis, "driver_channel": args.driver_channel,
           "downsample": args.downsample, "on_error": args.on_error, "options": options}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _read_checkpoint(path: Path, run_key: str, nframes: int) -> dict:
    """``{frame: (step, info)}`` from a checkpoint of the same run; anything unreadable
    (a line cut short by a kill, another run's file, a bad transform) is ignored."""
    from . import Transform

    known = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    if not lines:
        return {}
    try:
        if json.loads(lines[0]).get("run") != run_key:
            return {}
    except (ValueError, AttributeError):
        return {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            frame = rec["frame"]
            if isinstance(frame, int) and 0 <= frame < nframes:
                known[frame] = (Transform.from_dict(rec["transform"]), rec.get("info") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return known


class _Checkpoint:
    """Appends one JSON line per registered frame (flushed and fsynced), so a killed
    ``stack`` run can resume from its last finished frames."""

    def __init__(self, path: Path, run_key: str, known: dict):
        self.path, self.run_key, self.known = path, run_key, known
        self.fh = None

    def __enter__(self):
        return self

    def start(self) -> None:
        """On the run's first event: create the folder, remove the old report.json
        (the "done" marker), rewrite the checkpoint with the frames kept."""
        if self.fh is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "report.json").unlink(missing_ok=True)
        keep = [json.dumps({"frame": i, "transform": t.to_dict(), "info": info}, default=str)
                for i, (t, info) in sorted(self.known.items())]
        write_text_atomic(self.path, "\n".join([json.dumps({"run": self.run_key}), *keep]) + "\n")
        self.fh = self.path.open("a", encoding="utf-8")

    def add(self, frame, step, info) -> None:
        if frame in self.known:
            return
        self.start()
        self.fh.write(json.dumps({"frame": int(frame), "transform": step.to_dict(),
                                  "info": info}, default=str) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()
        return False


def _batch_item(fixed_path, moving_path, out, settings) -> dict:
    """One pair of the batch (runs in a worker): read, register, write the outputs."""
    from . import register
    from .io import read_image
    from .io_big import is_big_path
    from .orientation import needs_physical, register_files_physical

    t0 = time.perf_counter()
    big = settings.get("big", {})
    # the same order of paths as the register command (cmd_register)
    if big.get("format") != "ome-zarr" and needs_physical(fixed_path, moving_path):
        options = dict(settings["options"])  # rotated axes: registered in physical space
        if big.get("pixel_budget") is not None:
            options["pixel_budget"] = big["pixel_budget"]
        done = register_files_physical(fixed_path, moving_path, Path(out),
                                       method=settings["method"],
                                       transform=settings["transform"], **options)
        return {**_item_summary(t0, done["result"].metrics), "physical": True}
    if (is_big_path(fixed_path) or is_big_path(moving_path)
            or big.get("pixel_budget") is not None or big.get("format") == "ome-zarr"):
        return _batch_item_big(fixed_path, moving_path, out, settings, t0)
    fixed, f_sp, f_or = read_image(fixed_path)
    moving, m_sp, m_or = read_image(moving_path)
    result = register(fixed, moving, method=settings["method"], transform=settings["transform"],
                      fixed_spacing=f_sp, moving_spacing=m_sp, fixed_origin=f_or,
                      moving_origin=m_or, **settings["options"])
    name = Path(moving_path).name.lower()
    suffix = ".nii.gz" if name.endswith((".nii", ".nii.gz")) else ".tif"
    write_outputs(result, fixed, Path(out), fixed_spacing=f_sp, fixed_origin=f_or, suffix=suffix)
    return _item_summary(t0, result.metrics)


def _item_summary(t0, metrics) -> dict:
    """What batch.json records of a finished pair: seconds and NCC before/after."""
    return {"seconds": time.perf_counter() - t0,
            "ncc_before": metrics.get("before", {}).get("ncc"),
            "ncc_after": metrics.get("after", {}).get("ncc")}


def _batch_item_big(fixed_path, moving_path, out, settings, t0) -> dict:
    """A pair of slides / volumes (OME-Zarr, pyramidal OME-TIFF, DICOM, or any image
    with a pixel budget): exactly what ``register`` does with them (estimate on a
    level, refine on tiles, write the warp block by block). The blocks run on this
    process's threads: on a cluster each pair is one task, and handing its blocks back
    to the cluster fails (graphs over tifffile/zarr readers do not serialise) or waits
    on workers busy with other pairs. A killed write is resumed from its finished
    blocks when the item is run again."""
    big = settings.get("big", {})
    ns = argparse.Namespace(
        fixed=fixed_path, moving=moving_path, out=str(out), method=settings["method"],
        transform=settings["transform"], fixed_spacing=None, moving_spacing=None,
        equalize=None, option=[f"{k}={json.dumps(v)}" for k, v in settings["options"].items()],
        quiet=True, pixel_budget=big.get("pixel_budget"), format=big.get("format") or "auto",
        channel=big.get("channel"), scheduler=None, _silent=True)
    with _local_threads():
        cmd_register_big(ns)
    report = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
    return _item_summary(t0, report.get("metrics", {}))


import threading as _threading  # noqa: E402 - only for the lock below

_LOCAL = {"lock": _threading.Lock(), "users": 0, "config": None}


class _local_threads:
    """dask's threaded scheduler for the pairs running in this process. dask's config is
    one dict per process, so with several pairs in the threads of one worker the first
    to start sets it and the last to finish puts back what was there (a plain
    ``dask.config.set`` per pair would restore the distributed scheduler under a pair
    that is still writing)."""

    def __enter__(self):
        import dask

        with _LOCAL["lock"]:
            if _LOCAL["users"] == 0:
                _LOCAL["config"] = dask.config.set(scheduler="threads")
            _LOCAL["users"] += 1

    def __exit__(self, *exc):
        with _LOCAL["lock"]:
            _LOCAL["users"] -= 1
            if _LOCAL["users"] == 0:
                _LOCAL["config"].__exit__(None, None, None)
                _LOCAL["config"] = None
        return False


def _batch_items(args) -> list[tuple[str, str, Path]]:
    import glob

    out_root = Path(args.out)
    items = []
    if len(args.pairs) == 1 and args.pairs[0].lower().endswith(".csv"):
        table = Path(args.pairs[0])
        if not table.exists():
            raise FileNotFoundError(f"pairs file not found: {table}")
        base = table.parent
        for line, fixed, moving, out in _read_pairs_csv(table):
            items.append((str(base / fixed), str(base / moving),
                          _safe_destination(out_root, out, f"{table} line {line}") if out else None))
    else:
        if not args.fixed:
            raise ValueError("a list or glob of moving images needs --fixed FIXED (or give a "
                             "CSV with fixed,moving[,out] columns)")
        movings = []
        for pattern in args.pairs:
            found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            movings += found
        if not movings:
            raise ValueError(f"no moving images match {args.pairs}")
        items = [(args.fixed, m, None) for m in movings]
    named = [str(Path(os.path.normcase(os.path.abspath(o)))) for _, _, o in items if o is not None]
    dupes = sorted({o for o in named if named.count(o) > 1})
    if dupes:
        raise ValueError(f"two or more rows write to the same folder ({', '.join(dupes[:3])}); "
                         "give each row its own 'out'")
    used: set = set(named)
    resolved = []
    for fixed, moving, out in items:
        if out is None:
            stem = Path(moving).name
            for ext in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".nii.gz", ".tiff", ".tif",
                        ".png", ".jpg", ".jpeg", ".nii", ".mha", ".nrrd"):
                if stem.lower().endswith(ext):
                    stem = stem[: -len(ext)]
                    break
            out, k = out_root / stem, 2
            while out in used:
                out, k = out_root / f"{stem}_{k}", k + 1
            out = _safe_destination(out_root, out.name, f"output for {moving}")
        used.add(out)
        resolved.append((fixed, moving, out))
    return resolved


def _finished(out: Path) -> bool:
    """An item is done when its report.json (written last) parses and every output it
    lists is there with the size it recorded; anything else is redone."""
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        outputs = report["outputs"]
        sizes = report.get("output_bytes", {})
        for key, path in outputs.items():
            if key == "report":
                continue
            if Path(path).is_dir() and key == "warped":
                continue  # an OME-Zarr store: renamed into place only when complete
            if not Path(path).is_file():
                return False
            if key in sizes and Path(path).stat().st_size != sizes[key]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _read_pairs_csv(table: Path):
    """Rows ``(line, fixed, moving, out or '')`` of a pairs CSV, checked: a header with
    fixed,moving[,out]; a byte-order mark (spreadsheets write one) and blank lines are
    fine; short or long rows and empty names are refused with the line number."""
    import csv

    try:
        with table.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise ValueError(f"{table} is not a UTF-8 text file; save the pairs as CSV "
                         "(UTF-8) with the columns fixed,moving[,out]") from None
    except csv.Error as err:
        raise ValueError(f"{table} is not a readable CSV file: {err}") from None
    numbered = [(k + 1, [c.strip() for c in row]) for k, row in enumerate(rows)]
    numbered = [(n, row) for n, row in numbered if any(row)]  # blank lines
    header = [c.lower() for c in numbered[0][1]] if numbered else []
    if not {"fixed", "moving"} <= set(header) or not set(header) <= {"fixed", "moving", "out"}:
        raise ValueError(f"{table} needs a header row with the columns fixed,moving[,out]; got "
                         f"{','.join(header)[:80] or 'an empty file'}")
    for n, row in numbered[1:]:
        if len(row) != len(header):
            raise ValueError(f"{table} line {n} has {len(row)} columns; the header has "
                             f"{len(header)} ({','.join(header)})")
        cells = dict(zip(header, row))
        for key in ("fixed", "moving"):
            if not cells[key]:
                raise ValueError(f"{table} line {n}: the '{key}' column is empty")
        yield n, cells["fixed"], cells["moving"], cells.get("out", "")


def _safe_destination(root: Path, name: str, where: str) -> Path:
    """``root / name`` for a CSV's ``out`` cell, refused unless it stays inside ``root``
    (no absolute paths, no '..', no symlink that leads out)."""
    rel = Path(name)
    if rel.is_absolute() or rel.drive or name.startswith(("/", "\\")):
        raise ValueError(f"{where}: 'out' is the absolute path {name!r}; give a folder name "
                         "relative to --out (the batch writes only under --out)")
    if ".." in rel.parts or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{where}: 'out' ({name!r}) contains '..'; give a folder name inside "
                         "--out (the batch writes only under --out)")
    dest = root / rel
    real_root = os.path.realpath(root)
    real = os.path.realpath(dest)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ValueError(f"{where}: 'out' ({name!r}) leads outside --out {str(root)!r} (through "
                         "a symbolic link) or is --out itself; give a folder inside --out")
    return dest


def cmd_batch(args) -> int:
    from .core.stack import iter_tasks

    items = _batch_items(args)
    settings = {"method": args.method, "transform": args.transform,
                "options": _parse_options(args.option),
                "big": {"pixel_budget": args.pixel_budget, "format": args.format,
                        "channel": args.channel}}
    total = len(items)
    todo, skipped = [], []
    for k, (fixed, moving, out) in enumerate(items):
        if not args.force and _finished(Path(out)):
            skipped.append(k)
        else:
            todo.append(k)
    log = sys.stderr
    if skipped:
        print(f"batch: {len(skipped)} of {total} already done (report.json present; --force "
              "to redo)", file=log)
    done, failed, status = len(skipped), [], {}
    client = _scheduler(args)
    t0 = time.perf_counter()
    try:
        tasks = ((k, (items[k][0], items[k][1], str(items[k][2]), settings)) for k in todo)
        for k, out, err in iter_tasks(_batch_item, tasks, client=client, workers=args.workers):
            done += 1
            name = Path(items[k][1]).name
            if err is not None:
                message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                failed.append((items[k][1], f"{type(err).__name__}: {message}"))
                status[k] = {"status": "failed", "error": failed[-1][1]}
                line = f"FAIL {name}: {message}"
            else:
                status[k] = {"status": "ok", **out}
                ncc = (f"ncc {out['ncc_before']:.3f} -> {out['ncc_after']:.3f}  "
                       if out.get("ncc_after") is not None else "")
                line = f"ok   {name}  {ncc}{out['seconds']:.2f} s"
            if not args.quiet or err is not None:
                print(f"{_bar(done, total)}  {line}", file=log, flush=True)
    finally:
        if client is not None:
            client.close()
    for k in skipped:
        status[k] = {"status": "skipped"}
    summary = {"total": total, "ok": len(todo) - len(failed), "skipped": len(skipped),
               "failed": len(failed), "seconds": time.perf_counter() - t0,
               "items": [{"fixed": str(f), "moving": str(m), "out": str(o), **status.get(k, {})}
                         for k, (f, m, o) in enumerate(items)]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out) / "batch.json", json.dumps(summary, indent=1))
    print(f"batch: {summary['ok']} registered, {summary['skipped']} skipped, "
          f"{summary['failed']} failed of {total} in {summary['seconds']:.1f} s")
    for moving, message in failed:
        print(f"  failed: {moving}: {message}")
    return 1 if failed else 0


def _add_stack_parsers(sub) -> None:
    def scale_out(p):
        p.add_argument("--workers", type=int, default=1,
                       help="local worker processes (default 1: in this process)")
        p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="dask.distributed scheduler address (tcp://host:8786), or "
                            "'local' for a LocalCluster of --workers processes")

    p = sub.add_parser("stack", help="align the frames of a stack (time series or z-stack)")
    p.add_argument("input", help="a TIFF (uncompressed TIFFs are memory-mapped) or other image")
    p.add_argument("--out", default="stack-out", help="output folder")
    p.add_argument("--axis", type=int, default=None,
                   help="frame axis (default: the TIFF's T axis, else 0)")
    p.add_argument("--reference", default="first",
                   help="first | previous | mean | a frame index (default first)")
    p.add_argument("--method", default="fourier")
    p.add_argument("--transform", default="translation")
    p.add_argument("--channel-axis", type=int, default=None,
                   help="channel axis (default: the TIFF's C axis, else none)")
    p.add_argument("--driver-channel", type=int, default=0,
                   help="the channel that is registered; the others follow")
    p.add_argument("--downsample", type=int, default=1,
                   help="register on a copy reduced by this factor, warp at full resolution")
    p.add_argument("--spacing", type=float, nargs="+", default=None,
                   help="pixel size of one frame (napari axis order)")
    p.add_argument("--on-error", choices=["raise", "identity"], default="raise",
                   help="a frame that cannot be registered stops the run, or stays in place")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--force", action="store_true",
                   help="start over instead of resuming an interrupted run's finished frames")
    scale_out(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("batch", help="register many pairs: a CSV (fixed,moving[,out]) or "
                                     "moving files/globs against one --fixed")
    p.add_argument("pairs", nargs="+", help="PAIRS.csv, or moving images / glob patterns")
    p.add_argument("--fixed", default=None, help="the fixed image for a list/glob of movings")
    p.add_argument("--out", default="batch-out",
                   help="output folder (one subfolder per moving image, unless the CSV names one)")
    p.add_argument("--method", default="fourier")
    p.add_argument("--transform", default="translation")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="redo items whose report.json exists")
    p.add_argument("--quiet", "-q", action="store_true", help="report failures only")
    # slides and volumes (OME-Zarr, pyramidal OME-TIFF, DICOM folders go this way anyway)
    p.add_argument("--pixel-budget", type=int, default=None, metavar="N",
                   help="as for register: estimate on the level of about N x N pixels")
    p.add_argument("--format", choices=["auto", "ome-zarr", "tif"], default="auto",
                   help="warped output of big items, as for register")
    p.add_argument("--channel", type=int, default=None,
                   help="the channel to register in multi-channel OME-Zarr inputs")
    scale_out(p)
    p.set_defaults(func=cmd_batch)


def main(argv=None) -> int:
    from . import RegistrationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RegistrationError) as err:
        # OSError: unreadable/unwritable paths (missing, a file where a folder goes,
        # permissions, disk full) are the user's to fix, reported like bad input
        print(f"napari-registration: error: {err}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------- napari
#: sample -> (napari sample key, preset of the Register dock, transform)
VIEW_SAMPLES = {
    "fluorescence": ("fluorescence_pair", "two channels / same sample", None),
    "photo": ("photo_pair", "slides and photos", "homography"),
    "volume": ("volume_pair", "CT/MR volumes (same modality)", None),
}


def _add_view_parser(sub) -> None:
    p = sub.add_parser("view", help="open napari with a sample pair and the Register dock")
    p.add_argument("--sample", choices=list(VIEW_SAMPLES), default="fluorescence")
    p.set_defaults(func=cmd_view)


def build_view(sample: str = "fluorescence", viewer=None):
    """A napari viewer (a new one unless given) with a sample pair and the *Register
    images* dock set up for it, as the Plugins menu opens it; returns (viewer, dock).
    ``napari-registration view`` then runs napari's event loop."""
    if sample not in VIEW_SAMPLES:
        raise ValueError(f"unknown sample {sample!r}; choose one of {list(VIEW_SAMPLES)}")
    try:
        import napari
    except ImportError:
        raise ValueError("napari is not installed: pip install 'napari[pyqt6]' (or run "
                         "bash tools/setup.sh)") from None
    key, preset, transform = VIEW_SAMPLES[sample]
    if viewer is None:
        viewer = napari.Viewer(title=f"napari-registration: {sample} sample")
    viewer.open_sample("napari-registration", key)
    _, dock = viewer.window.add_plugin_dock_widget("napari-registration", "Register images")
    dock.preset.value = preset
    if transform is not None and transform in dock.transform.choices:
        dock.transform.value = transform
    return viewer, dock


def cmd_view(args) -> int:
    import napari

    build_view(args.sample)
    print("napari is open: press Register in the dock (right); close the window to quit")
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
