"""Peak memory of a 256^3 float32 registration, against a budget and against peers.

Run: .venv/bin/python benchmarks/bench_memory.py [--size 256] [--cases fourier,intensity,...]

Definition. Input bytes = fixed + moving (2 x 256^3 x 4 B = 128 MiB). Each case runs in
a fresh subprocess that imports everything, warms the code path up on a 32^3 pair
(so one-off import/initialisation memory is not counted), builds the inputs, and then
records the resident set size (RSS) as the baseline. A thread samples RSS every 2 ms
during the registration (and ru_maxrss is read at the end as a cross-check); the
figure is peak RSS - baseline. The budget is 4 x input bytes (512 MiB at 256^3).
``register`` includes its warp of the moving volume onto the fixed grid (the output,
64 MiB) and the before/after scores, so the peers are timed doing the same: estimate,
then warp.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHIFT = (3.3, -4.2, 2.5)
ANGLE_DEG = 4.0


def make_pair(n: int, rigid: bool):
    from scipy import ndimage

    from napari_registration.data import blobs_volume

    fixed = blobs_volume(shape=(n, n, n))
    if rigid:
        a = np.deg2rad(ANGLE_DEG)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        c = (np.array(fixed.shape) - 1) / 2
        moving = ndimage.affine_transform(fixed, rot, offset=c - rot @ c + np.array(SHIFT), order=1)
    else:
        moving = ndimage.shift(fixed, SHIFT, order=1)
    return fixed.astype(np.float32), moving.astype(np.float32)


def make_pair_2d(n: int):
    """A textured n x n photo-like image (the camera picture enlarged, with fine detail
    added so full resolution matters) and a copy rotated by 3 degrees and shifted:
    moving[q] = fixed[A q + b]."""
    from scipy import ndimage
    from skimage import data

    rng = np.random.default_rng(0)
    cam = data.camera().astype(np.float32) / 255.0
    fixed = ndimage.zoom(cam, n / cam.shape[0], order=1)
    fixed += 0.15 * ndimage.gaussian_filter(rng.standard_normal(fixed.shape).astype(np.float32), 2.0)
    a, rot, off = truth_2d(n)
    moving = ndimage.affine_transform(fixed, rot, offset=off, order=1).astype(np.float32)
    return fixed.astype(np.float32), moving


def truth_2d(n: int):
    a = np.deg2rad(3.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = (np.array([n, n]) - 1) / 2
    off = c - rot @ c + np.array([n * 0.01, -n * 0.007])
    return a, rot, off


def truth(n: int, rigid: bool) -> np.ndarray:
    """moving -> fixed (index = world) matrix of :func:`make_pair`."""
    m = np.eye(4)
    if rigid:
        a = np.deg2rad(ANGLE_DEG)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        c = (np.array([n, n, n]) - 1) / 2
        m[:3, :3] = rot
        m[:3, 3] = c - rot @ c + np.array(SHIFT)
        return m  # moving[q] = fixed[R q + o]: the point q of moving sits at R q + o in fixed
    m[:3, 3] = -np.array(SHIFT)
    return m


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    def __init__(self, interval=0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self.stop = interval, rss(), False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)


def run_case(case: str, n: int):
    from napari_registration import register

    def ours_fourier(f, m):
        return register(f, m, method="fourier", transform="translation").transform.matrix

    def ours_intensity(f, m):
        return register(f, m, method="intensity", transform="rigid", seed=0).transform.matrix

    def skimage_pcc(f, m):
        from scipy import ndimage
        from skimage.registration import phase_cross_correlation

        # normalization=None: its default (phase) locked onto an edge artefact here (TRE 5 px)
        shift, _, _ = phase_cross_correlation(f, m, upsample_factor=100, normalization=None)
        ndimage.shift(m, shift, order=1)  # the warp register() also does
        t = np.eye(4)
        t[:3, 3] = shift
        return t

    def sitk_rigid(f, m):
        import SimpleITK as sitk

        fi, mi = sitk.GetImageFromArray(f), sitk.GetImageFromArray(m)
        init = sitk.CenteredTransformInitializer(fi, mi, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
        R = sitk.ImageRegistrationMethod()
        R.SetMetricAsMattesMutualInformation(32)
        R.SetMetricSamplingStrategy(R.RANDOM)
        R.SetMetricSamplingPercentage(0.01, 0)
        R.SetInterpolator(sitk.sitkLinear)
        R.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 200)
        R.SetOptimizerScalesFromPhysicalShift()
        R.SetShrinkFactorsPerLevel([4, 2, 1])
        R.SetSmoothingSigmasPerLevel([2, 1, 0])
        R.SetInitialTransform(init, inPlace=False)
        tx = R.Execute(fi, mi)
        sitk.Resample(mi, fi, tx, sitk.sitkLinear, 0.0)  # the warp register() also does
        from napari_registration.core.itk import from_sitk_transform

        return from_sitk_transform(tx).matrix

    def ours_features(f, m):
        return register(f, m, method="features", transform="rigid").transform.matrix

    fn = {"fourier": ours_fourier, "intensity": ours_intensity, "skimage_pcc": skimage_pcc,
          "sitk_rigid": sitk_rigid, "features": ours_features}[case]
    rigid = case in ("intensity", "sitk_rigid")
    if case == "features":  # 2D: --size is the side of a square image
        fn(*make_pair_2d(512))
        fixed, moving = make_pair_2d(n)
    else:
        fn(*make_pair(32, rigid))  # warm-up: imports, FFT plans, ITK factories
        fixed, moving = make_pair(n, rigid)
    import gc

    gc.collect()
    base = rss()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    matrix = fn(fixed, moving)
    seconds = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    input_bytes = fixed.nbytes + moving.nbytes
    from napari_registration import Transform
    from napari_registration.data import grid_points, tre_against_truth

    if case == "features":
        _, rot, off = truth_2d(n)
        t = np.eye(3)
        t[:2, :2], t[:2, 2] = rot, off   # moving q sits at fixed A q + b
        true = Transform(t)
    else:
        true = Transform(truth(n, rigid))
    tre = tre_against_truth(Transform(np.asarray(matrix)), true, grid_points(fixed.shape))
    return {"case": case, "size": n, "input_bytes": input_bytes, "baseline_rss": base,
            "peak_rss": max(sampler.peak, 0), "peak_increase": sampler.peak - base,
            "ratio_to_input": (sampler.peak - base) / input_bytes,
            "ru_maxrss": maxrss, "seconds": seconds, "tre_mean_px": tre["mean"],
            "translation": [float(v) for v in np.asarray(matrix)[:-1, -1]]}


CASES = {"fourier": ("fourier translation", "skimage_pcc"),
         "intensity": ("intensity rigid (seed 0)", "sitk_rigid")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cases", default="fourier,skimage_pcc,intensity,sitk_rigid")
    p.add_argument("--child", default=None)
    p.add_argument("--src", action="append", default=[],
                   help="run the cases with this source tree on PYTHONPATH as well (repeatable), "
                        "e.g. an older checkout, to compare both codes in one run")
    p.add_argument("--out", default=str(HERE / "results" / "memory.json"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.size)))
        return
    rows = []
    runs = [(case, tree) for case in args.cases.split(",") for tree in [None] + args.src]
    for case, tree in runs:
        env = dict(os.environ)
        if tree:
            env["PYTHONPATH"] = str(Path(tree).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, __file__, "--child", case, "--size", str(args.size)],
                             capture_output=True, text=True, env=env)
        label = case if not tree else f"{case} [{tree}]"
        if out.returncode:
            print(f"{label}: failed\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["src"] = tree or "current"
        rows.append(row)
        mib = 2 ** 20
        print(f"{label:12s} peak +{row['peak_increase'] / mib:7.1f} MiB = {row['ratio_to_input']:.2f}x "
              f"input ({row['input_bytes'] / mib:.0f} MiB)  {row['seconds']:.2f} s  "
              f"TRE {row['tre_mean_px']:.3f} px", flush=True)
    rows_current = [r for r in rows if r["src"] == "current"]
    by = {r["case"]: r for r in rows_current}
    for ours, peer in (("fourier", "skimage_pcc"), ("intensity", "sitk_rigid")):
        if ours in by and peer in by:
            print(f"{ours} / {peer}: memory {by[ours]['peak_increase'] / by[peer]['peak_increase']:.2f}x, "
                  f"time {by[ours]['seconds'] / by[peer]['seconds']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
                                          "budget_ratio": 4.0, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
