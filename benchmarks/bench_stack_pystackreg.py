"""register_stack against pystackreg, per frame, side by side in one run.

    .venv/bin/python benchmarks/bench_stack_pystackreg.py [--frames 100] [--size 320] [--repeats 3]

(pystackreg comes with the ``bench`` extra.) The drifting series of bench_stack.py
(crops of scikit-image's Hubble deep field after known sub-pixel drifts), registered
to the first frame with a translation and the aligned stack computed, by
``register_stack(frames)`` (serial, defaults) and by pystackreg's ``register_stack`` +
``transform_stack`` (TRANSLATION), interleaved, ``--repeats`` times each. Prints the
median seconds per frame, the ratio, and each tool's mean TRE against the known drift.
Also (``--polish-frames``, default 20): what a Gauss-Newton translation polish after the
phase correlation (``core.refine.refine_linear(model="translation")``) would cost per
frame and gain in accuracy, on the first frames of the same series.
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
from bench_stack import drifting_series, mean_tre  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--polish-frames", type=int, default=20)
    args = parser.parse_args(argv)

    from pystackreg import StackReg

    from napari_registration import Transform, register_stack

    frames, drifts = drifting_series(args.frames, args.size)

    def ours():
        return register_stack(frames).transforms

    def peer():
        sr = StackReg(StackReg.TRANSLATION)
        tmats = sr.register_stack(frames, reference="first")
        sr.transform_stack(frames)
        # pystackreg maps reference (x, y) -> frame (x, y): frame -> reference, in rows
        return [Transform(_rows(np.linalg.inv(t))) for t in tmats]

    runs = {"napari-registration register_stack": ours, "pystackreg TRANSLATION": peer}
    for f in runs.values():  # warm up imports and caches
        f()
    seconds = {name: [] for name in runs}
    tre = {}
    for _ in range(args.repeats):
        for name, f in runs.items():
            t0 = time.perf_counter()
            transforms = f()
            seconds[name].append(time.perf_counter() - t0)
            tre[name] = mean_tre(transforms, drifts, frames.shape[1:])
    base = np.median(seconds["pystackreg TRANSLATION"])
    out = {"frames": args.frames, "size": args.size, "repeats": args.repeats,
           "loadavg": os.getloadavg(), "results": {}}
    for name in runs:
        med = float(np.median(seconds[name]))
        out["results"][name] = {"median_s": med, "ms_per_frame": 1000 * med / args.frames,
                                "ratio_vs_pystackreg": med / base, "mean_tre_px": tre[name],
                                "all_s": seconds[name]}
        print(f"{name:40s} {1000 * med / args.frames:6.2f} ms/frame  {med / base:5.2f}x  "
              f"TRE {tre[name]:.4f} px")
    out["translation_polish"] = polish = _polish(frames, drifts, args.polish_frames)
    print(f"translation polish on {polish['frames']} frames: {polish['ms_per_frame']:.1f} ms/frame, "
          f"max-axis error {polish['error_before_px']:.4f} -> {polish['error_after_px']:.4f} px")
    print("load average", out["loadavg"])
    path = HERE / "results" / "stack_pystackreg.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


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
