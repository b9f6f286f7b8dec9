"""Deformable (B-spline) registration, before/after and peers, side by side in one run.

"after" is ``register(method="intensity", transform="bspline")`` with its defaults: in
2D, same-contrast pairs go to the spline Gauss-Newton engine (``core/deform.py``).
"before" is the same call with ``optimizer="lbfgsb"``: exactly the previous default
path (ITK's L-BFGS-B on an 8-cell mesh in 2D, 4 in 3D), which is still selectable.
Peers are the accuracy report's own (``report_methods``): SimpleITK notebook settings,
itk-elastix (affine then bspline default maps), ANTsPy SyN. Cases: the report's three
deformable ones (``report_cases``; brain_deformable_3d is MNI T1 3x2x2 mm under a smooth
random field, up to ~7 mm, where the 3D engine of ``core/deform.py`` runs since round 4).

Everything goes through ``report.run`` (same timing, peak memory, TRE and interleaving
as the report: repeat 1 runs every method on every case, then repeat 2, ...).

Run (peers live in a separate venv):
  PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_deformable.py --repeats 3 \
      --out benchmarks/results/deformable.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import report_cases  # noqa: E402
import report_methods  # noqa: E402


BUILDERS = {"camera_deformable": report_cases.camera_deformable,
            "stereo_motorcycle": report_cases.stereo_motorcycle,
            "brain_deformable_3d": report_cases.brain_deformable_3d}


def methods(which):
    out = [report_methods.Ours("intensity"),
           report_methods.Ours("intensity", optimizer="lbfgsb"),
           report_methods.SimpleITKDirect(), report_methods.Elastix(), report_methods.Ants()]
    if which:
        keys = [w.strip() for w in which.split(",") if w.strip()]
        out = [m for m in out if any(k in m.name for k in keys)]
    return out


def cpu_before_after(builders, repeats):
    """Ours (engine) and ours (optimizer="lbfgsb", the ITK path) interleaved in this
    process: median wall and CPU seconds (time.process_time, all threads) and TRE."""
    import numpy as np

    from napari_registration import register
    from napari_registration.data import grid_points, tre_against_truth

    for build in builders:
        case = build()
        if case is None:
            continue
        pts = case.points if case.points is not None else grid_points(case.shape, case.spacing)
        rows = {"engine": [], "lbfgsb": []}
        for _ in range(repeats):
            for name, kw in (("engine", {}), ("lbfgsb", {"optimizer": "lbfgsb"})):
                t0, c0 = time.perf_counter(), time.process_time()
                r = register(case.fixed, case.moving, method="intensity", transform="bspline",
                             fixed_spacing=case.spacing, moving_spacing=case.spacing, **kw)
                rows[name].append((time.perf_counter() - t0, time.process_time() - c0,
                                   tre_against_truth(r.transform, case.truth, pts)["mean"]))
        med = {k: np.median(np.array(v), axis=0) for k, v in rows.items()}
        for k, (w, c, t) in med.items():
            print(f"{case.name:22s} {k:7s} wall {w:6.2f} s  cpu {c:6.2f} s  TRE {t:.3f}")
        w, c, t = med["engine"] / med["lbfgsb"]
        print(f"{case.name:22s} engine / lbfgsb: wall x{w:.2f}  cpu x{c:.2f}  TRE x{t:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(BUILDERS))
    p.add_argument("--methods", default="", help="comma-separated substrings of method names")
    p.add_argument("--slow", type=float, default=10.0, help="pairs slower than this run once")
    p.add_argument("--out", default=str(HERE / "results" / "deformable.json"))
    p.add_argument("--cpu", action="store_true",
                   help="only ours vs ours (lbfgsb), interleaved, wall and CPU medians")
    args = p.parse_args(argv)
    builders = [BUILDERS[c.strip()] for c in args.cases.split(",") if c.strip()]
    if args.cpu:
        cpu_before_after(builders, args.repeats)
        return
    t0 = time.perf_counter()
    cases, avail, skipped, skipped_cases, runs, done = report.run(
        builders, methods(args.methods), args.repeats, 2.0, slow=args.slow)
    table = report.summarise(runs)
    print(report.markdown_table(table, cases, avail))
    ratios = []
    for case in cases:
        after = table.get((case.name, "ours: intensity"))
        for m in avail:
            if m.name == "ours: intensity":
                continue
            other = table.get((case.name, m.name))
            if after and other and after.get("seconds") and other.get("seconds"):
                ratios.append((case.name, m.name, after["tre_mean"] / other["tre_mean"]
                               if other.get("tre_mean") else None,
                               after["seconds"] / other["seconds"]))
    print("\nafter / other (TRE ratio, time ratio):")
    for c, m, tr, sr in ratios:
        print(f"  {c:22s} {m:36s} TRE x{tr:.2f}  time x{sr:.2f}" if tr else f"  {c} {m} time x{sr:.2f}")
    payload = {"command": " ".join(["benchmarks/bench_deformable.py"] + (argv or sys.argv[1:])),
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "seconds": time.perf_counter() - t0, "repeats": done,
               "python": platform.python_version(), "environment": report.environment(avail),
               "cases": [c.describe() for c in cases], "skipped": skipped + skipped_cases,
               "table": [{"case": k[0], "method": k[1], **v} for k, v in table.items()],
               "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
