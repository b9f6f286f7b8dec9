"""`features` (ORB, SIFT) against the report's raw OpenCV pipelines, each call timed by the
report's own ``measure()`` (gc.collect + malloc_trim first, so temporaries are fresh pages,
as in the report), all variants interleaved in one process (rotating order), medians.

    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_features_measure.py \
        --cases moon_similarity,retina_affine --det orb,sift --repeats 9 --before /tmp/before/src

``--before``: another version's ``src/`` (e.g. ``git worktree add --detach /tmp/before main``),
imported beside this one. ``nowseq``: this version with SIFT detecting one image after the
other (``CONCURRENT_SIFT_PIXELS = 0``). Prints wall and CPU medians (CPU includes
``measure``'s gc.collect, the same for every variant) as ratios to raw, TRE as the report
computes it, keypoints and inliers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from interleave import time_interleaved  # noqa: E402 - benchmarks/ is on sys.path


def main(argv=None):
    import report_cases
    from bench_features import load_before
    from report import measure, tre_of
    from report_methods import OpenCVOrb, OpenCVSift

    import napari_registration as now
    import napari_registration.backends.features as feats
    from napari_registration.data import grid_points

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="moon_similarity,retina_affine")
    ap.add_argument("--det", default="orb,sift")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--before", default="", help="another version's src/ to run beside this one")
    a = ap.parse_args(argv)
    before = load_before(a.before) if a.before else None

    def ours(pkg, case, det):
        return pkg.register(case.fixed, case.moving, method="features", transform=case.model,
                            score=False, detector=det)

    def sequential(case, det):
        old = feats.CONCURRENT_SIFT_PIXELS
        feats.CONCURRENT_SIFT_PIXELS = 0
        try:
            return ours(now, case, det)
        finally:
            feats.CONCURRENT_SIFT_PIXELS = old

    for name in a.cases.split(","):
        case = getattr(report_cases, name)()
        if case.points is None:
            case.points = grid_points(case.shape, case.spacing)
        variants = {}
        for det in a.det.split(","):
            peer = OpenCVOrb() if det == "orb" else OpenCVSift()
            variants[f"raw {det}"] = (lambda peer=peer: peer.run(case),
                                      lambda r, peer=peer: peer.mapper(case, r))
            for label, pkg in ([("before", before)] if before else []) + [("now", now)]:
                variants[f"{label} {det}"] = (lambda pkg=pkg, det=det: ours(pkg, case, det),
                                              lambda r: r.transform.apply_inverse)
            if det == "sift":
                variants[f"nowseq {det}"] = (lambda det=det: sequential(case, det),
                                             lambda r: r.transform.apply_inverse)
        names = list(variants)
        tre, counts = {}, {}
        for k, (run, mapper) in variants.items():  # warm up + accuracy
            r = run()
            tre[k] = tre_of(case, mapper(r))["mean"]
            info = getattr(r, "info", {})
            counts[k] = (info.get("keypoints_fixed"), info.get("inliers"))
        wall, cpu = time_interleaved({k: v[0] for k, v in variants.items()}, a.repeats,
                                     measure=measure)
        for det in a.det.split(","):
            w0, c0 = statistics.median(wall[f"raw {det}"]), statistics.median(cpu[f"raw {det}"])
            for k in [n for n in names if n.endswith(det)]:
                w, c = statistics.median(wall[k]), statistics.median(cpu[k])
                print(f"{name:22s} {k:12s} wall {w * 1e3:7.1f} ms ({w / w0:.2f}x) cpu {c * 1e3:7.1f} "
                      f"({c / c0:.2f}x) TRE {tre[k]:.4f} keypoints/inliers {counts[k]}", flush=True)


if __name__ == "__main__":
    main()
