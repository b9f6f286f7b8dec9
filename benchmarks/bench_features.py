"""Feature registration: ``register(method="features")`` vs the same OpenCV pipeline
called directly (uint8 conversion, SIFT detectAndCompute, brute-force kNN + ratio test,
findHomography RANSAC, warpPerspective), on a ~1 MP photograph warped by a known
homography. Interleaved repeats, medians, one run.

    .venv/bin/python benchmarks/bench_features.py [--repeats 7] [--size 1024]

Writes benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from interleave import time_interleaved  # noqa: E402 - benchmarks/ is on sys.path

HERE = Path(__file__).resolve().parent


def make_pair(size: int, image: str = "retina"):
    from skimage import color
    from skimage import data as skdata
    from skimage.transform import resize

    from napari_registration import Transform
    from napari_registration.core.resample import resample

    if image == "retina":
        grey = skdata.retina()[..., 1].astype(np.float32) / 255.0  # green channel
    else:
        grey = color.rgb2gray(skdata.astronaut()).astype(np.float32)
    fixed = resize(grey, (size, size), order=1, anti_aliasing=True).astype(np.float32)
    # stretch to [0, 1] as the core's normalisation would, so that both pipelines see
    # the same uint8 images and detect the same keypoints (a fair timing comparison)
    lo, hi = np.percentile(fixed, (0.5, 99.5))
    fixed = np.clip((fixed - lo) / (hi - lo), 0, 1).astype(np.float32)
    c = (size - 1) / 2
    centre = np.array([[1, 0, c], [0, 1, c], [0, 0, 1.0]])
    a = np.deg2rad(8.0)
    lin = np.array([[1.04 * np.cos(a), -np.sin(a), 14.0], [np.sin(a), 0.98 * np.cos(a), -21.0],
                    [6e-5, -4e-5, 1.0]])
    truth = Transform(centre @ lin @ np.linalg.inv(centre))
    moving = resample(fixed, truth.inverse(), fixed.shape, order=3).astype(np.float32)
    return fixed, moving, truth


def raw_opencv(fixed, moving, n_features, ratio=0.75, threshold=3.0):
    """The pipeline written directly against OpenCV, as a user would (x, y order)."""
    import cv2

    f8 = np.clip(fixed * 255 + 0.5, 0, 255).astype(np.uint8)
    m8 = np.clip(moving * 255 + 0.5, 0, 255).astype(np.uint8)
    sift = cv2.SIFT_create(nfeatures=n_features, enable_precise_upscale=True)
    kf, df = sift.detectAndCompute(f8, None)
    km, dm = sift.detectAndCompute(m8, None)
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dm, df, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    src = np.float32([km[g.queryIdx].pt for g in good])
    dst = np.float32([kf[g.trainIdx].pt for g in good])
    h_xy, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=5000,
                                    confidence=0.999)
    warped = cv2.warpPerspective(moving, h_xy, fixed.shape[::-1], flags=cv2.INTER_LINEAR)
    return h_xy, warped, int(mask.sum()), (len(kf), len(km))


def xy_matrix_to_rowcol(h_xy):
    p = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    return p @ h_xy @ p


def cv2_resample(image, transform, output_shape, *, output_spacing=(1.0, 1.0),
                 output_origin=(0.0, 0.0), input_spacing=(1.0, 1.0), input_origin=(0.0, 0.0)):
    """What core.resample could do for 2D linear transforms (a proposal, measured here):
    the fixed-index -> moving-index matrix in (row, col), swapped to (x, y), handed to
    cv2.warpPerspective with WARP_INVERSE_MAP (a pull-back, like scipy)."""
    import cv2

    from napari_registration.core.resample import index_to_world, world_to_index

    m = (world_to_index(input_spacing, input_origin) @ np.linalg.inv(transform.matrix)
         @ index_to_world(output_spacing, output_origin))
    m_xy = xy_matrix_to_rowcol(m)  # the swap is its own inverse
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    size = (int(output_shape[1]), int(output_shape[0]))
    if transform.is_projective:
        return cv2.warpPerspective(image, m_xy, size, flags=flags, borderValue=0)
    return cv2.warpAffine(image, m_xy[:2], size, flags=flags, borderValue=0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--n-features", type=int, default=5000)
    ap.add_argument("--image", choices=["retina", "astronaut", "both"], default="both")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--round3", action="store_true",
                    help="report cases: raw OpenCV ORB/SIFT vs `features` before and now")
    ap.add_argument("--before", default=None,
                    help="(--round3) a src/ folder of the code to compare against, e.g. "
                         "`git archive e3bfb8e src | tar -x -C /tmp/before` -> /tmp/before/src")
    ap.add_argument("--cases", default=",".join(ROUND3_CASES))
    ap.add_argument("--stages", default="moon_similarity,astronaut_homography",
                    help="(--round3) cases for the one-thread stage table")
    ap.add_argument("--out", default=None,
                    help="where the JSON goes (default results/features.json, with --round3 "
                         "results/features_round3.json)")
    ap.add_argument("--detectors", default="orb,sift",
                    help="(--round3) which keypoint detectors to compare")
    ap.add_argument("--fast-warp", action="store_true",
                    help="(--round3) also time before/now with fast_warp=True (OpenCV's warp)")
    args = ap.parse_args(argv)
    if args.round3:
        args.out = args.out or str(HERE / "results" / "features_round3.json")
        return round3(args)
    images = ["retina", "astronaut"] if args.image == "both" else [args.image]
    results = {"cases": [run_case(args, image) for image in images]}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy_table()
    out = Path(args.out) if args.out else HERE / "results" / "features.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def accuracy_table():
    """TRE (px, mean over a 7x7 grid) of every detector on scikit-image photos warped by
    random transforms of each kind (fixed seeds), as in tests/test_features.py."""
    from skimage import color
    from skimage import data as skdata

    from napari_registration import Transform, data, register
    from napari_registration.core.resample import resample

    def photo(name):
        img = getattr(skdata, name)()
        img = (color.rgb2gray(img) if img.ndim == 3 else img).astype(np.float32)
        return (img - img.min()) / np.ptp(img)

    def truth_of(kind, shape, seed):
        rng = np.random.default_rng(seed)
        centre = (np.array(shape, float) - 1) / 2
        angle = rng.uniform(-15, 15) if kind != "translation" else 0.0
        scale = rng.uniform(0.9, 1.1) if kind in ("similarity", "affine", "homography") else 1.0
        m = Transform.from_rotation(angle, center=centre, scale=scale,
                                    shift=rng.uniform(-12, 12, 2)).matrix
        c = np.eye(3)
        c[:2, 2] = centre
        if kind in ("affine", "homography"):
            lin = np.eye(3)
            lin[:2, :2] += rng.uniform(-0.06, 0.06, (2, 2))
            m = m @ c @ lin @ np.linalg.inv(c)
        if kind == "homography":
            p = np.eye(3)
            p[2, :2] = rng.uniform(-1.5e-4, 1.5e-4, 2)
            m = c @ p @ np.linalg.inv(c) @ m
        return Transform(m)

    rows = []
    cases = [("astronaut", "homography", 1), ("camera", "affine", 2), ("coins", "similarity", 3),
             ("camera", "rigid", 7), ("camera", "translation", 7)]
    for name, kind, seed in cases:
        fixed = photo(name)
        truth = truth_of(kind, fixed.shape, seed)
        moving = resample(fixed, truth.inverse(), fixed.shape, order=3).astype(np.float32)
        pts = data.grid_points(fixed.shape)
        for detector in ("sift", "orb", "akaze", "brisk"):
            t = time.perf_counter()
            r = register(fixed, moving, method="features", transform=kind, detector=detector,
                         score=False, warp=False)
            rows.append({"image": name, "shape": list(fixed.shape), "transform": kind,
                         "detector": detector, "seconds": time.perf_counter() - t,
                         "tre_px": data.tre_against_truth(r.transform, truth, pts)["mean"],
                         "matches": r.info["matches"], "inliers": r.info["inliers"],
                         "rms_px": r.info["rms_px"]})
    print(f"{'image':10s} {'transform':12s} {'detector':8s} {'TRE px':>7s} {'inliers':>8s} {'s':>6s}")
    for r in rows:
        print(f"{r['image']:10s} {r['transform']:12s} {r['detector']:8s} {r['tre_px']:7.3f} "
              f"{r['inliers']:8d} {r['seconds']:6.2f}")
    return rows


def run_case(args, image):
    import cv2

    from napari_registration import Transform, data, register
    from napari_registration.core.metrics import compare
    from napari_registration.core.resample import overlap_mask, resample

    fixed, moving, truth = make_pair(args.size, image)
    pts = data.grid_points(fixed.shape)
    kw = dict(method="features", transform="homography", detector="sift",
              n_features=args.n_features, matcher="bf")

    variants = {
        "raw_opencv": lambda: raw_opencv(fixed, moving, args.n_features),
        "register": lambda: register(fixed, moving, **kw),
        "register_score_false": lambda: register(fixed, moving, score=False, **kw),
        "register_fast_warp": lambda: register(fixed, moving, score=False, fast_warp=True, **kw),
        "register_no_warp_no_score": lambda: register(fixed, moving, score=False, warp=False, **kw),
    }
    for fn in variants.values():  # warm up: imports, OpenCV's first-call costs
        fn()
    outputs = {}
    names = list(variants)
    # CPU seconds of all threads: less hurt by a busy machine
    times, cpu = time_interleaved(variants, args.repeats, outputs=outputs)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}

    # accuracy of each
    h_raw, _, raw_inliers, raw_kp = outputs["raw_opencv"]
    tre_raw = data.tre_against_truth(Transform(xy_matrix_to_rowcol(h_raw)), truth, pts)["mean"]
    res = outputs["register"]
    tre_ours = data.tre_against_truth(res.transform, truth, pts)["mean"]

    # where the time of register() goes: backend stages vs core warp and scoring
    stages = {k: [] for k in ("detect", "match", "fit", "backend", "core_warp_scipy",
                              "cv2_warp_proposal", "score_4_resamples", "score_2_compare")}
    for _ in range(max(3, args.repeats // 2)):
        r = register(fixed, moving, score=False, warp=False, **kw)
        for k in ("detect", "match", "fit"):
            stages[k].append(r.info["timings"][k])
        stages["backend"].append(r.info["backend_seconds"])
        t = time.perf_counter()
        resample(moving, res.transform, fixed.shape, order=1)
        stages["core_warp_scipy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cv2_resample(moving, res.transform, fixed.shape)
        stages["cv2_warp_proposal"].append(time.perf_counter() - t)
        # what score=True adds in core.register: four resamples (before/after image and
        # overlap mask) and two compare() calls (MSE, NCC, MI, SSIM)
        ident = Transform.identity(2)
        t = time.perf_counter()
        b_img = resample(moving, ident, fixed.shape)
        b_mask = overlap_mask(moving.shape, ident, fixed.shape)
        a_img = resample(moving, res.transform, fixed.shape)
        a_mask = overlap_mask(moving.shape, res.transform, fixed.shape)
        stages["score_4_resamples"].append(time.perf_counter() - t)
        t = time.perf_counter()
        compare(fixed, b_img, b_mask)
        compare(fixed, a_img, a_mask)
        stages["score_2_compare"].append(time.perf_counter() - t)
    stage_med = {k: statistics.median(v) for k, v in stages.items()}
    # the proposal gives the same image as core.resample (up to OpenCV's 1/32 px
    # fixed-point interpolation weights)
    core_w = resample(moving, res.transform, fixed.shape, order=1)
    cv_w = cv2_resample(moving, res.transform, fixed.shape)
    inside = np.zeros(fixed.shape, bool)
    inside[2:-2, 2:-2] = True
    inside &= (core_w > 0) & (cv_w > 0)
    warp_diff = float(np.abs(core_w - cv_w)[inside].max())

    base = med["raw_opencv"]
    out = {
        "image": f"skimage {image} {'green channel' if image == 'retina' else 'grey'} "
                 f"resized to {fixed.shape} (float32)",
        "transform": "homography (8 deg, scale 1.04/0.98, perspective 6e-5/-4e-5)",
        "options": {k: v for k, v in kw.items()},
        "repeats": args.repeats,
        "median_seconds": med,
        "ratio_to_raw": {k: v / base for k, v in med.items()},
        "min_seconds": best,
        "median_cpu_seconds": cpu_med,
        "ratio_to_raw_cpu": {k: v / cpu_med["raw_opencv"] for k, v in cpu_med.items()},
        "all_cpu_seconds": cpu,
        "ratio_to_raw_of_min": {k: v / best["raw_opencv"] for k, v in best.items()},
        "all_seconds": times,
        "stages_median_seconds": stage_med,
        "cv2_warp_proposal_max_abs_diff_vs_core": warp_diff,
        "tre_px": {"raw_opencv": tre_raw, "register": tre_ours},
        "inliers": {"raw_opencv": raw_inliers, "register": res.info["inliers"]},
        "keypoints": {"raw_opencv": list(raw_kp),
                      "register": [res.info["keypoints_fixed"], res.info["keypoints_moving"]]},
        "machine": {"python": platform.python_version(), "opencv": cv2.__version__,
                    "cv2_threads": cv2.getNumThreads(), "cpus": os.cpu_count(),
                    "load_average_after": os.getloadavg()},
    }
    print(f"{out['image']}; {args.repeats} interleaved repeats, medians")
    print(f"{'variant':28s} {'median s':>8s} {'x raw':>7s} {'min s':>8s} {'x raw':>7s} "
          f"{'cpu s':>8s} {'x raw':>7s}")
    for k in names:
        print(f"{k:28s} {med[k]:8.3f} {med[k] / base:7.2f} {best[k]:8.3f} "
              f"{best[k] / best['raw_opencv']:7.2f} {cpu_med[k]:8.3f} "
              f"{cpu_med[k] / cpu_med['raw_opencv']:7.2f}")
    print(f"TRE px: raw {tre_raw:.3f}, register {tre_ours:.3f}; inliers raw {raw_inliers}, "
          f"register {res.info['inliers']}; keypoints raw {raw_kp}, register "
          f"{out['keypoints']['register']}")
    print("stages (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in stage_med.items()))
    print(f"cv2 warp proposal vs core.resample: max |diff| {warp_diff:.2g} (image in [0, 1])")
    return out


# ------------------------------------------------------------------------- round 3
# report cases tuned on (issue #15's held-out cases are left out: pass --cases to add them)
ROUND3_CASES = ("moon_similarity", "coins_rigid", "camera_translation", "astronaut_homography",
                "retina_affine", "camera_rotation_150")


def load_before(src: str, name: str = "napari_registration_before"):
    """Import another version of the package (a copy of its ``src/``) under ``name``, beside
    the current one, so that both run interleaved in one process. Its absolute
    self-references (backend registry, lazy imports) are renamed in a temporary copy."""
    import importlib
    import re
    import shutil
    import sys
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="nr_before_"))
    shutil.copytree(Path(src) / "napari_registration", tmp / name)
    for f in (tmp / name).rglob("*.py"):
        text = f.read_text()
        f.write_text(re.sub(r"\bnapari_registration(?=[. ])", name, text))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def stage_table(case, detector, before, repeats):
    """Where the time goes, one thread (``threads=1``; the warp too), CPU medians in ms
    (``time.process_time``, also inside the backend's own stage timer):
    the backend's own timings (detect, match, fit) and the core's normalisation and warp,
    measured by calling them directly; before and now, and the raw OpenCV pipeline's
    detect / match / fit / warp."""
    import cv2

    import napari_registration as now

    import types

    rows = {}
    for label, pkg in ([("before", before)] if before is not None else []) + [("now", now)]:
        kw = dict(method="features", transform=case.model, score=False, detector=detector,
                  threads=1)
        # the backend times its stages with time.perf_counter: make that CPU time here
        pkg.backends.features.time = types.SimpleNamespace(perf_counter=time.process_time)
        res = pkg.register(case.fixed, case.moving, **kw)
        t_ = pkg.Transform(res.transform.matrix)
        norm = getattr(pkg.core.preprocess, "normalize")
        warp = pkg.core.resample.resample
        wkw = {"threads": 1} if "threads" in warp.__code__.co_varnames else {}
        acc = {k: [] for k in ("register", "detect", "match", "fit", "normalize x2", "warp")}
        for _ in range(repeats):
            c = time.process_time()
            r = pkg.register(case.fixed, case.moving, **kw)
            acc["register"].append(time.process_time() - c)
            for k in ("detect", "match", "fit"):
                acc[k].append(r.info["timings"][k])
            c = time.process_time()
            norm(case.fixed)
            norm(case.moving)
            acc["normalize x2"].append(time.process_time() - c)
            c = time.process_time()
            warp(case.moving, t_, case.fixed.shape, **wkw)
            acc["warp"].append(time.process_time() - c)
        rows[label] = {k: 1e3 * statistics.median(v) for k, v in acc.items()}
        pkg.backends.features.time = time
    f8 = np.clip(case.fixed * 255, 0, 255).astype(np.uint8)
    m8 = np.clip(case.moving * 255, 0, 255).astype(np.uint8)
    det = cv2.ORB_create(nfeatures=5000) if detector == "orb" else cv2.SIFT_create()
    norm_type = cv2.NORM_HAMMING if detector == "orb" else cv2.NORM_L2
    acc = {k: [] for k in ("detect", "match", "fit", "warp")}
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for _ in range(repeats):
            c = time.process_time()
            kf, df = det.detectAndCompute(f8, None)
            km, dm = det.detectAndCompute(m8, None)
            acc["detect"].append(time.process_time() - c)
            c = time.process_time()
            pairs = cv2.BFMatcher(norm_type).knnMatch(dm, df, k=2)
            good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
            acc["match"].append(time.process_time() - c)
            c = time.process_time()
            src = np.float32([km[g.queryIdx].pt for g in good])
            dst = np.float32([kf[g.trainIdx].pt for g in good])
            if case.model == "homography":
                h, _ = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
            else:
                a, _ = (cv2.estimateAffine2D if case.model == "affine"
                        else cv2.estimateAffinePartial2D)(src, dst)
                h = np.vstack([a, [0, 0, 1]])
            acc["fit"].append(time.process_time() - c)
            c = time.process_time()
            cv2.warpPerspective(case.moving, h, case.fixed.shape[::-1])
            acc["warp"].append(time.process_time() - c)
    finally:
        cv2.setNumThreads(threads)
    rows["raw OpenCV"] = {k: 1e3 * statistics.median(v) for k, v in acc.items()}
    rows["raw OpenCV"]["register"] = sum(rows["raw OpenCV"].values())
    print(f"stages, {case.name}, {detector}, one thread, CPU ms:")
    for label, r in rows.items():
        print(f"  {label:12s} " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    return {"case": case.name, "detector": detector, "ms": rows}


def round3(args):
    """`features` (ORB, SIFT) against the raw OpenCV pipelines of the report (the report's
    own peer code), before and after this round, interleaved in one process: wall and
    CPU seconds (medians), ratios to the raw pipeline, TRE as the report computes it."""
    import sys

    import cv2

    sys.path.insert(0, str(HERE))
    import report_cases
    from report import tre_of
    from report_methods import OpenCVOrb, OpenCVSift

    import napari_registration as now
    from napari_registration.data import grid_points

    before = load_before(args.before) if args.before else None
    rows = []
    for name in args.cases.split(","):
        case = getattr(report_cases, name)()
        if case.points is None:
            case.points = grid_points(case.shape, case.spacing)
        variants = {}
        dets = args.detectors.split(",")
        for det, peer in [(d, p) for d, p in (("orb", OpenCVOrb()), ("sift", OpenCVSift()))
                          if d in dets]:
            kw = {"detector": det}
            variants[f"raw OpenCV {det.upper()}"] = (
                lambda peer=peer: peer.run(case), lambda raw, peer=peer: peer.mapper(case, raw))
            versions = ([("before", before)] if before is not None else []) + [("now", now)]
            for label, pkg in versions:
                variants[f"ours {det} {label}"] = (
                    lambda pkg=pkg, kw=kw: pkg.register(
                        case.fixed, case.moving, method="features", transform=case.model,
                        score=False, **kw),
                    lambda raw: raw.transform.apply_inverse)
            if args.fast_warp:
                for label, pkg in versions:
                    variants[f"ours {det} {label}, fast_warp"] = (
                        lambda pkg=pkg, kw=kw: pkg.register(
                            case.fixed, case.moving, method="features", transform=case.model,
                            score=False, fast_warp=True, **kw),
                        lambda raw: raw.transform.apply_inverse)
            variants[f"ours {det} now, threads=1"] = (
                lambda kw=kw: now.register(case.fixed, case.moving, method="features",
                                           transform=case.model, score=False, threads=1, **kw),
                lambda raw: raw.transform.apply_inverse)
        names = list(variants)
        tre, info = {}, {}
        for k, (run, mapper) in variants.items():  # warm up + accuracy
            raw = run()
            tre[k] = tre_of(case, mapper(raw))["mean"]
            info[k] = {key: raw.info.get(key) for key in ("keypoints_fixed", "matches", "inliers",
                                                           "matcher")} if hasattr(raw, "info") else {}
        wall, cpu = time_interleaved({k: v[0] for k, v in variants.items()}, args.repeats)
        for det in args.detectors.split(","):
            base = f"raw OpenCV {det.upper()}"
            for k in [n for n in names if det in n.lower()]:
                rows.append({"case": name, "variant": k,
                             "wall_s": statistics.median(wall[k]),
                             "wall_x_raw": statistics.median(wall[k]) / statistics.median(wall[base]),
                             "cpu_s": statistics.median(cpu[k]),
                             "cpu_x_raw": statistics.median(cpu[k]) / statistics.median(cpu[base]),
                             "tre": tre[k], **info[k]})
                print(f"{name:22s} {k:28s} wall {rows[-1]['wall_s'] * 1e3:7.1f} ms "
                      f"({rows[-1]['wall_x_raw']:.2f}x)  cpu {rows[-1]['cpu_s'] * 1e3:7.1f} ms "
                      f"({rows[-1]['cpu_x_raw']:.2f}x)  TRE {tre[k]:.4f}  {info[k]}", flush=True)
    stages = [stage_table(getattr(report_cases, c)(), det, before, args.repeats)
              for c in args.stages.split(",") if c for det in args.detectors.split(",")]
    out = {"stages": stages, "command": "bench_features.py --round3 " + " ".join(
               f"--{k} {v}" for k, v in (("repeats", args.repeats), ("before", args.before),
                                          ("cases", args.cases))),
           "rows": rows, "opencv": cv2.__version__, "cpus": os.cpu_count(),
           "load_average_after": os.getloadavg(), "python": platform.python_version()}
    Path(args.out).parent.mkdir(exist_ok=True, parents=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
