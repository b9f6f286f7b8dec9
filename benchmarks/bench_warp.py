"""The exact linear warp: ITK's resampler (the default for affine order-1 warps of 2D/3D
float images) against scipy.ndimage's (the previous default) and OpenCV's 1/32-pixel
warp (``fast=True``, 2D only), side by side in one run.

    PYTHONPATH=src python benchmarks/bench_warp.py --repeats 9

Each variant runs interleaved (the order rotates every repeat), after a warm-up; the
figures are medians of wall and CPU time, with the ratio to scipy in the same run, and
the largest difference from scipy's values inside the image (float32 images in [0, 1]).
Then ``overlap_mask`` (solved row by row) against what it was before: a nearest-neighbour
warp of an image of ones, the same mask.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from interleave import time_interleaved  # noqa: E402 - benchmarks/ is on sys.path

SHAPES = [(512, 512), (704, 704), (91, 109, 91), (160, 192, 160)]


def _transform(ndim, rng):
    from napari_registration.core.transform import Transform

    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += rng.uniform(-0.08, 0.08, (ndim, ndim))
    m[:ndim, ndim] = rng.uniform(-6, 6, ndim)
    return Transform(m)


def main(argv=None):
    from scipy import ndimage

    from napari_registration.core import resample as rs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        image = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32)
        image = (image - image.min()) / np.ptp(image)
        t = _transform(len(shape), rng)
        for threads in args.threads:
            def itk():
                return rs.resample(image, t, shape, threads=threads)

            def scipy_():
                limit = rs.ITK_MAX_VOXELS
                rs.ITK_MAX_VOXELS = 0
                try:
                    return rs.resample(image, t, shape, threads=threads)
                finally:
                    rs.ITK_MAX_VOXELS = limit

            variants = {"scipy": scipy_, "itk": itk}
            if len(shape) == 2:
                variants["opencv (fast)"] = lambda: rs.resample(image, t, shape, fast=True,
                                                                threads=threads)
            outs = {k: f() for k, f in variants.items()}  # warm-up
            names = list(variants)
            wall, cpu = time_interleaved(variants, args.repeats)
            inside = outs["scipy"] != 0
            for k in names:
                row = dict(shape="x".join(map(str, shape)), threads=threads, variant=k,
                           wall_ms=1e3 * float(np.median(wall[k])), cpu_ms=1e3 * float(np.median(cpu[k])),
                           max_diff=float(np.abs(outs[k] - outs["scipy"])[inside].max()))
                rows.append(row)
            base = next(r for r in rows if r["shape"] == rows[-1]["shape"]
                        and r["threads"] == threads and r["variant"] == "scipy")
            for row in rows[-len(names):]:
                print(f"{row['shape']:>12} threads={threads} {row['variant']:>14}: wall "
                      f"{row['wall_ms']:7.1f} ms ({row['wall_ms'] / base['wall_ms']:.2f}x)  cpu "
                      f"{row['cpu_ms']:7.1f} ms ({row['cpu_ms'] / base['cpu_ms']:.2f}x)  "
                      f"max |diff| vs scipy {row['max_diff']:.1e}")
    masks = []
    for shape in SHAPES:
        t = _transform(len(shape), rng)
        variants = {
            "rows": lambda: rs.overlap_mask(shape, t, shape),
            "warp of ones": lambda: rs.resample(np.ones(shape, np.uint8), t, shape,
                                                labels=True).astype(bool),
        }
        outs = {k: f() for k, f in variants.items()}
        assert np.array_equal(outs["rows"], outs["warp of ones"])
        wall = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.repeats):
            for k in names[r % 2:] + names[:r % 2]:
                w = time.perf_counter()
                variants[k]()
                wall[k].append(time.perf_counter() - w)
        row = {k: 1e3 * float(np.median(v)) for k, v in wall.items()}
        masks.append(dict(shape="x".join(map(str, shape)), **row))
        print(f"{masks[-1]['shape']:>12} overlap_mask: rows {row['rows']:6.2f} ms, warp of ones "
              f"{row['warp of ones']:6.2f} ms ({row['rows'] / row['warp of ones']:.3f}x)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"warps": rows, "overlap_mask": masks}, fh, indent=1)


if __name__ == "__main__":
    main()
