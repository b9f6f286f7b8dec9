"""register_stack against pystackreg, per frame, side by side in one run.

    PYTHONPATH=src python benchmarks/bench_stack_pystackreg.py [--frames 100] [--size 320] [--repeats 3]

(pystackreg comes with the ``bench`` extra.) Series with known transforms, each
registered to its first frame and the aligned stack computed, by

* ``register_stack(frames)``: the defaults (fourier translation; the spline engine of
  ``core/stack_refine.py`` since it exists),
* ``register_stack(frames, polish="none")``: one ``register()`` per frame, the code
  before the spline engine (the "before" of the same run),
* pystackreg's ``register_stack`` + ``transform_stack`` (TRANSLATION, or RIGID_BODY on
  the rotating series),

interleaved, ``--repeats`` times each; the median seconds per frame, the ratio to
pystackreg and each tool's mean TRE against the known transforms (7 x 7 grid over the
frame) are printed. Series:

* ``hubble``: ``--frames`` crops of ``--size``^2 of scikit-image's Hubble deep field after
  known sub-pixel drifts (cubic-spline shifts; bench_stack.py's series);
* ``hubble_fourier``: the same drifts as exact Fourier shifts of the blurred image
  (band-limited, a different interpolation model from every tool's cubic splines);
* ``moon_stack``: the report's case (benchmarks/report_cases.py): 12 frames of 256^2,
  random walk + noise;
* ``rotating`` (``--rigid``): 30 crops of the camera photo turned by up to +-3 degrees
  and shifted by up to ~6 px: ours with ``transform="rigid"`` (fourier log-polar per frame)
  against pystackreg RIGID_BODY.

* ``volumes_3d`` (``--only-3d`` runs just this, keeping the rest of the JSON): 10 frames
  of 64 x 128 x 128 (blurred fine binary blobs after cubic-spline sub-voxel shifts),
  ours after and before only (pystackreg is 2D), process CPU time.

Writes benchmarks/results/stack_pystackreg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_stack import drifting_series  # noqa: E402


def _tre(transforms, truths, shape) -> float:
    from napari_registration.data import grid_points, tre_against_truth

    pts = grid_points(shape)
    return float(np.mean([tre_against_truth(t, truth, pts)["mean"]
                          for t, truth in zip(transforms, truths)]))


def _translations(drifts):
    from napari_registration import Transform

    return [Transform.from_translation(d) for d in drifts]


def hubble_fourier(n, size, seed=0):
    """bench_stack's drifts (same formula and seed) applied as exact Fourier shifts to
    the blurred image."""
    from scipy import ndimage
    from skimage import color, data

    image = ndimage.gaussian_filter(color.rgb2gray(data.hubble_deep_field()).astype(np.float64), 1.0)
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    drifts = np.hstack([6 * np.sin(t / 17.0), 5 * np.cos(t / 23.0) - 5]) + rng.uniform(-0.5, 0.5, (n, 2))
    drifts -= drifts[0]
    margin = 32
    corner = (np.array(image.shape) - size) // 2
    lo = corner - margin
    region = image[lo[0]:lo[0] + size + 2 * margin, lo[1]:lo[1] + size + 2 * margin]
    spectrum = np.fft.fftn(region)
    frames = np.stack([np.fft.ifftn(ndimage.fourier_shift(spectrum, -d)).real[
        margin:margin + size, margin:margin + size] for d in drifts]).astype(np.float32)
    return frames, drifts


def rotating(n=30, size=320, seed=5):
    """Crops of camera turned about the crop centre by a random walk of angles and
    shifted; returns frames and the truths (frame k world -> frame 0 world)."""
    from skimage import data

    from napari_registration.data import rigid_drift_stack

    base = data.camera().astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    angles = np.clip(np.cumsum(rng.normal(0, 0.6, n)), -3, 3)
    shifts = np.cumsum(rng.normal(0, 1.0, (n, 2)), axis=0)
    angles[0], shifts[0] = 0.0, 0.0
    return rigid_drift_stack(base, angles, shifts, (np.array(base.shape) - size) / 2, size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rigid", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only-3d", action="store_true")
    parser.add_argument("--polish-frames", type=int, default=0,
                        help="also time core.refine.refine_linear as a translation polish "
                             "(what the previous version of this script measured)")
    args = parser.parse_args(argv)

    path = HERE / "results" / "stack_pystackreg.json"
    if args.only_3d:
        out = json.loads(path.read_text()) if path.exists() else {"series": {}}
        out["series"]["volumes_3d"] = bench_3d(args.repeats)
        _write(path, out)
        return

    from pystackreg import StackReg

    from napari_registration import Transform, register_stack
    from report_cases import moon_stack

    series = {}
    frames, drifts = drifting_series(args.frames, args.size)
    series["hubble"] = (frames, _translations(drifts), "translation")
    frames, drifts = hubble_fourier(args.frames, args.size)
    series["hubble_fourier"] = (frames, _translations(drifts), "translation")
    case = moon_stack()
    series["moon_stack"] = (np.asarray(case.frames, np.float32), list(case.truths), "translation")
    if args.rigid:
        frames, truths = rotating()
        series["rotating"] = (frames, truths, "rigid")

    def ours(frames, model, **kw):
        return register_stack(frames, transform=model, **kw).transforms

    def peer(frames, model):
        sr = StackReg(StackReg.TRANSLATION if model == "translation" else StackReg.RIGID_BODY)
        tmats = sr.register_stack(frames, reference="first")
        sr.transform_stack(frames)
        # pystackreg maps reference (x, y) -> frame (x, y): frame -> reference, in rows
        return [Transform(_rows(np.linalg.inv(t))) for t in tmats]

    out = {"frames": args.frames, "size": args.size, "repeats": args.repeats,
           "loadavg_start": os.getloadavg(), "series": {}}
    for sname, (frames, truths, model) in series.items():
        runs = {"register_stack (defaults)": lambda f=frames, m=model: ours(f, m),
                "register_stack(polish='none') (before)": lambda f=frames, m=model: ours(f, m, polish="none"),
                f"pystackreg {'TRANSLATION' if model == 'translation' else 'RIGID_BODY'}":
                    lambda f=frames, m=model: peer(f, m)}
        for f in runs.values():  # warm up imports and caches
            f()
        seconds = {name: [] for name in runs}
        tre = {}
        for _ in range(args.repeats):
            for name, f in runs.items():
                t0 = time.perf_counter()
                transforms = f()
                seconds[name].append(time.perf_counter() - t0)
                tre[name] = _tre(transforms, truths, frames.shape[1:])
        peer_name = [n for n in runs if n.startswith("pystackreg")][0]
        base = np.median(seconds[peer_name])
        n = len(frames)
        rows = {}
        print(f"{sname}: {n} frames of {frames.shape[1]} x {frames.shape[2]}, {model}")
        for name in runs:
            med = float(np.median(seconds[name]))
            rows[name] = {"median_s": med, "ms_per_frame": 1000 * med / n,
                          "ratio_vs_pystackreg": med / base, "mean_tre_px": tre[name],
                          "all_s": seconds[name]}
            print(f"  {name:42s} {1000 * med / n:7.2f} ms/frame  {med / base:5.2f}x  "
                  f"TRE {tre[name]:.5f} px", flush=True)
        out["series"][sname] = {"frames": n, "shape": list(frames.shape[1:]), "model": model,
                                "results": rows}
    if args.polish_frames:
        frames, drifts = drifting_series(args.frames, args.size)
        out["translation_polish"] = polish = _polish(frames, drifts, args.polish_frames)
        print(f"translation polish on {polish['frames']} frames: {polish['ms_per_frame']:.1f} "
              f"ms/frame, max-axis error {polish['error_before_px']:.4f} -> "
              f"{polish['error_after_px']:.4f} px")
    out["series"]["volumes_3d"] = bench_3d(args.repeats)
    out["loadavg_end"] = os.getloadavg()
    print("load average", out["loadavg_start"], "->", out["loadavg_end"])
    _write(path, out)


def _write(path, out):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


def bench_3d(repeats):
    """3D+t translation: the spline engine against one register() per frame (process
    CPU time, less sensitive than wall time to other processes on a shared machine)."""
    from scipy import ndimage
    from skimage.data import binary_blobs

    from napari_registration import register_stack

    vol = ndimage.gaussian_filter(binary_blobs(length=160, n_dim=3, blob_size_fraction=0.04,
                                               volume_fraction=0.3, rng=4).astype(np.float32), 1.0)
    rng = np.random.default_rng(0)
    drifts = np.vstack([[0, 0, 0], rng.uniform(-4, 4, (9, 3))])
    frames = np.stack([ndimage.shift(vol, -d, order=3, mode="nearest")[8:72, 16:144, 16:144]
                       for d in drifts])
    pts_err = {}
    cpu = {"after": [], "before": []}
    load = os.getloadavg()
    for _ in range(repeats):
        for name, polish in (("after", "auto"), ("before", "none")):
            t0 = time.process_time()
            result = register_stack(frames, polish=polish)
            cpu[name].append(time.process_time() - t0)
            pts_err[name] = float(np.mean([np.abs(t.matrix[:3, 3] - d).max()
                                           for t, d in zip(result.transforms[1:], drifts[1:])]))
    row = {"frames": len(frames), "shape": list(frames.shape[1:]), "loadavg": load}
    print(f"volumes_3d: {len(frames)} frames of {frames.shape[1:]}, translation (CPU time)")
    for name in cpu:
        med = float(np.median(cpu[name]))
        row[name] = {"cpu_ms_per_frame": 1000 * med / len(frames),
                     "mean_max_axis_error_px": pts_err[name], "all_cpu_s": cpu[name]}
        print(f"  {name:8s} {1000 * med / len(frames):7.1f} ms CPU/frame  "
              f"error {pts_err[name]:.5f} px")
    return row


def _polish(frames, drifts, n):
    """Mean per-axis error of fourier translation against the drift, before and after a
    Gauss-Newton translation polish, and the polish's median time per frame."""
    from napari_registration import register
    from napari_registration.core.refine import refine_linear

    before, after, seconds = [], [], []
    for k in range(1, min(n, len(frames))):
        start = register(frames[0], frames[k], method="fourier", transform="translation",
                         score=False, warp=False).transform
        t0 = time.perf_counter()
        polished, _ = refine_linear(frames[0], frames[k], start, model="translation",
                                    start_error_px=0.05)
        seconds.append(time.perf_counter() - t0)
        before.append(np.abs(start.matrix[:2, 2] - drifts[k]).max())
        after.append(np.abs(polished.matrix[:2, 2] - drifts[k]).max())
    return {"frames": len(seconds), "ms_per_frame": 1000 * float(np.median(seconds)),
            "error_before_px": float(np.mean(before)), "error_after_px": float(np.mean(after))}


def _rows(m):
    """A homogeneous (x, y) matrix as napari (row, col)."""
    p = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)
    return p @ m @ p


if __name__ == "__main__":
    main()
