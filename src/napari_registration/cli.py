"""``napari-registration`` command line: register two image files, or run the demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


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
    paths = {}
    if result.warped is not None:
        paths["warped"] = str(write_image(out / f"warped{suffix}", result.warped, fixed_spacing, fixed_origin))
    paths["transform"] = str(save_transform(result.transform, out / "transform.json"))
    if result.transform.is_linear and not result.transform.is_projective:
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
    (out / "report.json").write_text(json.dumps(report, indent=1))
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

    fixed, f_sp, f_or = read_image(args.fixed)
    moving, m_sp, m_or = read_image(args.moving)
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
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("demo", help="register bundled sample data and report the accuracy")
    p.add_argument("--out", default="registration-demo")
    p.add_argument("--method", default="fourier")
    p.add_argument("--transform", default="rigid")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list methods, their transforms and options")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv=None) -> int:
    from . import RegistrationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RegistrationError) as err:
        print(f"napari-registration: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
