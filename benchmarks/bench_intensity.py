"""Intensity backend vs itk-elastix on a real brain MR volume, side by side in one run.

Data: the MNI152 T1 template and its grey-matter map (1 mm, shipped inside nilearn's
wheel), resampled to anisotropic ~2 mm grids (fixed and moving with different
spacings) with known rigid and affine transforms. Each tool registers the same pair:

* ours: ``register(..., method="intensity", transform=..., score=False)`` (default
  options; the warped image is produced, as elastix produces its result image);
* elastix: ``itk.elastix_registration_method`` with its default "rigid" / "affine"
  parameter map (the multi-modal case uses the same maps: their metric is Mattes MI).

TRE is the mean distance (mm) between where the truth and the estimate send a 7x7x7
grid of fixed points. Times are wall seconds; each tool runs ``--repeats`` times per
case, interleaved, and the median is kept (the machine is shared and noisy).
Our unseeded runs use a fresh sampling seed each time, so repeats also measure the
success rate over seeds.

Run:  .venv/bin/python benchmarks/bench_intensity.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _mni(name):
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        sys.exit("needs nilearn (pip install nilearn): its wheel ships the MNI152 template")
    path = (Path(spec.origin).parent / "datasets" / "data" /
            f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    return a / a.max()


def _affine3d(angles_deg, shift, centre, scale=(1, 1, 1), shear=0.0):
    from scipy.spatial.transform import Rotation

    from napari_registration import Transform

    lin = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ np.diag(scale)
    lin = lin @ np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    return Transform.from_linear(lin, centre, shift)


def _pair(src, truth, f_sp, m_sp, moving_src=None):
    from scipy import ndimage

    from napari_registration import Transform
    from napari_registration.core.resample import resample

    ext = np.array(src.shape, float)
    f_shape = tuple(int(e // s) for e, s in zip(ext, f_sp))
    m_shape = tuple(int(e // s) for e, s in zip(ext, m_sp))
    fixed = resample(ndimage.gaussian_filter(src, [0.5 * s for s in f_sp]), Transform.identity(3),
                     f_shape, output_spacing=f_sp)
    msrc = src if moving_src is None else moving_src
    moving = resample(ndimage.gaussian_filter(msrc, [0.5 * s for s in m_sp]), truth.inverse(),
                      m_shape, output_spacing=m_sp)
    return fixed.astype(np.float32), moving.astype(np.float32)


def run_ours(fixed, moving, kind, f_sp, m_sp):
    from napari_registration import register

    t = time.perf_counter()
    r = register(fixed, moving, method="intensity", transform=kind, fixed_spacing=f_sp,
                 moving_spacing=m_sp, score=False)
    return r.transform, time.perf_counter() - t


def run_elastix(fixed, moving, kind, f_sp, m_sp):
    import itk

    from napari_registration import Transform
    from napari_registration.core.transform import FieldStep

    def img(a, sp):
        im = itk.image_view_from_array(np.ascontiguousarray(a, np.float32))
        im.SetSpacing([float(s) for s in sp[::-1]])
        return im

    f, m = img(fixed, f_sp), img(moving, m_sp)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap(kind))
    t = time.perf_counter()
    _, tp = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    seconds = time.perf_counter() - t
    # elastix maps fixed -> moving points; its displacement field on the fixed grid is
    # a backward field step in our model (transformix writes a file into the working
    # directory, so run it in a temporary one)
    import os
    import tempfile

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            field = np.asarray(itk.transformix_deformation_field(m, tp))[..., ::-1].astype(np.float32)
        finally:
            os.chdir(here)
    return Transform(steps=[FieldStep(field, f_sp, None, "backward")]), seconds


def robustness_2d(repeats, quick=False):
    """Success rate on camera (256 x 256) over rotations up to 30 degrees, shifts of a
    tenth of the field of view, same and inverted contrast, with our default options
    (fresh sampling seeds each run) and elastix's default rigid map."""
    from skimage import data, transform as skt

    from napari_registration import Transform, register
    from napari_registration.data import _warp_by_truth, grid_points, tre_against_truth

    img = skt.downscale_local_mean(data.camera().astype(np.float32) / 255, 2).astype(np.float32)
    n = img.shape[0]
    centre = (np.array(img.shape) - 1) / 2
    pts = grid_points(img.shape)
    cases = [(30, (0.1, -0.07)), (-30, (-0.1, 0.05)), (20, (0.06, 0.1)), (-12, (-0.08, -0.08))]
    if quick:
        cases = cases[:2]
    runs = []
    for angle, shift in cases:
        truth = Transform.from_rotation(angle, center=centre, shift=(shift[0] * n, shift[1] * n))
        base = _warp_by_truth(img, truth).astype(np.float32)
        for contrast in ("same", "inverted"):
            moving = base if contrast == "same" else ((1 - base) ** 2).astype(np.float32)
            for _ in range(repeats):
                t = time.perf_counter()
                r = register(img, moving, method="intensity", transform="rigid", score=False)
                ours = (tre_against_truth(r.transform, truth, pts)["mean"], time.perf_counter() - t)
                est, sec = run_elastix(img, moving, "rigid", (1.0, 1.0), (1.0, 1.0))
                theirs = (tre_against_truth(est, truth, pts)["mean"], sec)
                runs.append({"angle_deg": angle, "shift_fov": list(shift), "contrast": contrast,
                             "ours_tre_px": ours[0], "ours_seconds": ours[1],
                             "elastix_tre_px": theirs[0], "elastix_seconds": theirs[1]})
                print(f"2D {angle:+4d} deg {contrast:8s} ours TRE {ours[0]:.3f} px {ours[1]:.2f}s | "
                      f"elastix TRE {theirs[0]:.3f} px {theirs[1]:.2f}s", flush=True)
    summary = {tool: {"success": float(np.mean([r[f"{tool}_tre_px"] < 0.5 for r in runs])),
                      "median_tre_px": float(np.median([r[f"{tool}_tre_px"] for r in runs])),
                      "median_seconds": float(np.median([r[f"{tool}_seconds"] for r in runs]))}
               for tool in ("ours", "elastix")}
    return {"image": "camera 256x256", "success": "TRE < 0.5 px", "runs": runs, "summary": summary}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one rigid and one affine case")
    ap.add_argument("--out", default=str(HERE / "results" / "intensity.json"))
    args = ap.parse_args(argv)

    import SimpleITK as sitk
    import itk

    from napari_registration.data import grid_points, tre_against_truth

    t1, gm = _mni("t1"), _mni("gm")
    centre = np.array(t1.shape) / 2
    f_sp, m_sp = (2.0, 2.4, 2.0), (2.4, 2.0, 2.2)
    cases = [
        ("rigid A", "rigid", _affine3d([8, -12, 15], [6, -9, 5], centre), None),
        ("rigid B", "rigid", _affine3d([-20, 5, 10], [-12, 8, 10], centre), None),
        ("rigid C (T1 vs grey-matter map)", "rigid", _affine3d([-15, 5, -10], [-8, 4, 10], centre), gm),
        ("affine A", "affine", _affine3d([-10, 6, 8], [-5, 7, 4], centre, (1.06, 0.95, 1.03), 0.05), None),
        ("affine B (T1 vs grey-matter map)", "affine", _affine3d([12, -4, 6], [4, -6, 8], centre, (0.94, 1.05, 1.0), -0.04), gm),
    ]
    if args.quick:
        cases = [cases[0], cases[3]]
    rows = []
    for name, kind, truth, msrc in cases:
        fixed, moving = _pair(t1, truth, f_sp, m_sp, msrc)
        pts = grid_points(fixed.shape, f_sp)
        per = {"ours": [], "elastix": []}
        for _ in range(args.repeats):
            for tool, fn in (("ours", run_ours), ("elastix", run_elastix)):
                est, seconds = fn(fixed, moving, kind, f_sp, m_sp)
                per[tool].append({"seconds": seconds,
                                  "tre_mm": tre_against_truth(est, truth, pts)["mean"]})
        row = {"case": name, "transform": kind, "fixed_shape": list(fixed.shape),
               "fixed_spacing": list(f_sp), "moving_shape": list(moving.shape),
               "moving_spacing": list(m_sp), "runs": per}
        for tool in per:
            row[f"{tool}_seconds"] = float(np.median([r["seconds"] for r in per[tool]]))
            row[f"{tool}_tre_mm"] = float(np.median([r["tre_mm"] for r in per[tool]]))
            row[f"{tool}_tre_max_mm"] = float(np.max([r["tre_mm"] for r in per[tool]]))
            row[f"{tool}_success"] = float(np.mean([r["tre_mm"] < 0.5 * min(f_sp) for r in per[tool]]))
        row["time_ratio"] = row["ours_seconds"] / row["elastix_seconds"]
        rows.append(row)
        print(f"{name:36s} ours {row['ours_seconds']:.2f}s TRE {row['ours_tre_mm']:.3f} mm "
              f"(max {row['ours_tre_max_mm']:.3f}) | elastix {row['elastix_seconds']:.2f}s "
              f"TRE {row['elastix_tre_mm']:.3f} mm (max {row['elastix_tre_max_mm']:.3f}) | "
              f"time ratio {row['time_ratio']:.2f}", flush=True)
    robust = robustness_2d(2 if args.quick else args.repeats, args.quick)
    try:
        load = list(__import__("os").getloadavg())
    except OSError:  # pragma: no cover
        load = None
    out = {
        "benchmark": "intensity (SimpleITK) vs itk-elastix default rigid/affine maps, 3D brain MR",
        "command": "python benchmarks/bench_intensity.py" + (" --quick" if args.quick else "")
                   + f" --repeats {args.repeats}",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "load_average_after": load},
        "versions": {"SimpleITK": sitk.Version_VersionString(),
                     "itk-elastix": getattr(itk, "__version__", "?")},
        "tre": "mean over a 7x7x7 grid of fixed points, mm; success = TRE < half the smallest voxel side",
        "cases": rows,
        "robustness_2d": robust,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    print(markdown(out))


def markdown(out):
    lines = ["| case | ours s | elastix s | time ratio | ours TRE mm (max) | elastix TRE mm (max) | ours / elastix success |",
             "|---|---|---|---|---|---|---|"]
    for r in out["cases"]:
        lines.append(
            f"| {r['case']} | {r['ours_seconds']:.2f} | {r['elastix_seconds']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['ours_tre_mm']:.3f} ({r['ours_tre_max_mm']:.3f}) | "
            f"{r['elastix_tre_mm']:.3f} ({r['elastix_tre_max_mm']:.3f}) | "
            f"{r['ours_success']:.0%} / {r['elastix_success']:.0%} |")
    rb = out.get("robustness_2d")
    if rb:
        sm = rb["summary"]
        lines += ["", f"2D robustness ({rb['image']}, {len(rb['runs'])} runs per tool: rotations "
                      "up to 30 deg, shifts up to 0.1 FOV, same and inverted contrast):", "",
                  "| tool | success (TRE < 0.5 px) | median TRE px | median s |", "|---|---|---|---|"]
        for tool in ("ours", "elastix"):
            lines.append(f"| {tool} | {sm[tool]['success']:.0%} | {sm[tool]['median_tre_px']:.3f} | "
                         f"{sm[tool]['median_seconds']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
