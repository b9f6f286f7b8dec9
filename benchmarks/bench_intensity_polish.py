"""The intensity backend's final polish, old against new, side by side in ONE process.

The cases are the report's 3D brain cases (``report_cases``); the variants:

* ``new``: this checkout's ``register(method="intensity", score=False)``, defaults;
* ``old`` (with ``--old-src``): the same call with ``backends.intensity._polish`` taken
  from another checkout's ``intensity.py`` (e.g. the commit before issue #15's 3D work:
  ``git archive 884bab3 src | tar -x -C /tmp/old`` then ``--old-src /tmp/old/src``);
  everything else (ITK stage, core, warping) is this checkout's, so only the polish differs;
* ``no polish``: ``polish=False`` (ITK's result as it is);
* elastix (default maps) and ANTsPy when installed, as in ``benchmarks/report.py``.

Runs are interleaved (repeat 1 runs every variant on every case, then repeat 2 ...), so
machine noise hits all alike; medians are quoted, with time ratios to elastix of the same
run. TRE and timing exactly as in the report (``report.tre_of``, wall time of the call
that registers and warps).

Run: PYTHONPATH=src .venv/bin/python benchmarks/bench_intensity_polish.py --repeats 3 \
         [--old-src /tmp/old/src] [--cases brain_affine_3d,brain_t1_vs_gm_3d]
Writes benchmarks/results/intensity_polish.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import report_cases  # noqa: E402
import report_methods  # noqa: E402

CASES = ("brain_affine_3d", "brain_t1_vs_gm_3d", "brain_rigid_3d", "brain_rigid_2mm")


def _old_polish(src: str):
    path = Path(src) / "napari_registration" / "backends" / "intensity.py"
    # loaded inside this checkout's package so that its relative imports resolve here
    spec = importlib.util.spec_from_file_location("napari_registration.backends._intensity_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._polish


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--old-src", default="")
    parser.add_argument("--out", default=str(HERE / "results" / "intensity_polish.json"))
    args = parser.parse_args(argv)

    from napari_registration import register
    from napari_registration.backends import intensity

    new_polish = intensity._polish
    old_polish = _old_polish(args.old_src) if args.old_src else None
    cases, skipped = report_cases.build([getattr(report_cases, n) for n in args.cases.split(",")])
    if skipped:
        print("skipped (data package missing):", skipped)

    def ours(polish_fn, polish=True):
        def run(case):
            intensity._polish = polish_fn
            try:
                return register(case.fixed, case.moving, method="intensity", transform=case.model,
                                fixed_spacing=case.spacing, moving_spacing=case.spacing,
                                score=False, polish=polish)
            finally:
                intensity._polish = new_polish
        return run

    variants = [("new", ours(new_polish), lambda case, r: r.transform.apply_inverse)]
    if old_polish is not None:
        variants.append(("old", ours(old_polish), lambda case, r: r.transform.apply_inverse))
    variants.append(("no polish", ours(new_polish, polish=False),
                     lambda case, r: r.transform.apply_inverse))
    for cls in (report_methods.Elastix, report_methods.Ants):
        peer = cls()
        if peer.available():
            peer.setup()
            variants.append((peer.name, peer.run, peer.mapper))

    runs = []
    for case in cases:  # warm-up: imports and first-call costs out of the timings
        for name, run, mapper in variants:
            run(case)
    for rep in range(args.repeats):
        for case in cases:
            for name, run, mapper in variants:
                t0 = time.perf_counter()
                raw = run(case)
                seconds = time.perf_counter() - t0
                tre = report.tre_of(case, mapper(case, raw))
                runs.append({"case": case.name, "variant": name, "repeat": rep,
                             "seconds": seconds, "tre_mean": tre["mean"], "tre_max": tre["max"]})
                print(f"[{rep + 1}/{args.repeats}] {case.name:20s} {name:28s} TRE {tre['mean']:.4f}"
                      f"  {seconds:.2f} s", flush=True)

    print("\n| case | variant | TRE mean (median) | s (median) | time / elastix |")
    print("|---|---|---:|---:|---:|")
    table = []
    for case in cases:
        el = [r["seconds"] for r in runs if r["case"] == case.name and r["variant"].startswith("itk-elastix")]
        el_s = statistics.median(el) if el else None
        for name, _, _ in variants:
            sel = [r for r in runs if r["case"] == case.name and r["variant"] == name]
            tre = statistics.median(r["tre_mean"] for r in sel)
            s = statistics.median(r["seconds"] for r in sel)
            ratio = s / el_s if el_s else None
            table.append({"case": case.name, "variant": name, "tre_mean": tre, "seconds": s,
                          "ratio_to_elastix": ratio})
            print(f"| {case.name} | {name} | {tre:.4f} | {s:.2f} | "
                  f"{'' if ratio is None else f'{ratio:.2f}'} |")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"command": " ".join(sys.argv), "repeats": args.repeats,
                               "old_src": args.old_src or None, "table": table, "runs": runs},
                              indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
