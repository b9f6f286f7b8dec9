"""Fourier translation vs scikit-image's phase_cross_correlation, 2048 x 2048, one run.

Run:  .venv/bin/python benchmarks/bench_fourier.py [--repeats 5]
Writes benchmarks/results/fourier.json and the table in docs/benchmarks.md (fourier section).

Timings are interleaved (ours, skimage, ours, ...) and the median is quoted, with the
ratio ours/skimage from the same run, because this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


def make_case(size=2048, shift=(17.3, -9.6)):
    from skimage import data, transform

    big = transform.resize(data.retina()[..., 1].astype(np.float32), (size + 80, size + 80),
                           order=3, anti_aliasing=False)
    moving = ndimage.shift(big, shift, order=3, mode="nearest")
    crop = (slice(40, 40 + size),) * 2
    return big[crop].astype(np.float32), moving[crop].astype(np.float32), np.array(shift)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)

    from skimage.registration import phase_cross_correlation

    from napari_registration import register
    from napari_registration.backends.fourier import estimate_translation

    fixed, moving, shift = make_case()
    f01 = (fixed - fixed.min()) / np.ptp(fixed)
    m01 = (moving - moving.min()) / np.ptp(moving)
    runs = {
        "skimage phase_cross_correlation (upsample 100)":
            lambda: phase_cross_correlation(fixed, moving, upsample_factor=100)[0],
        "ours: estimate_translation, 1 pass": lambda: estimate_translation(f01, m01, iterations=0)[0],
        "ours: estimate_translation, default (2 refinement passes)": lambda: estimate_translation(f01, m01)[0],
        "ours: register() incl. warp + before/after scores":
            lambda: register(fixed, moving, method="fourier").transform.matrix[:2, 2],
        "ours: register(score=False) incl. warp":
            lambda: register(fixed, moving, method="fourier", score=False).transform.matrix[:2, 2],
    }
    times = {k: [] for k in runs}
    errors = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            est = fn()
            times[name].append(time.perf_counter() - t0)
            errors[name] = float(np.abs(np.asarray(est) + shift).max())
    ref = "skimage phase_cross_correlation (upsample 100)"
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for name in runs:
        rows.append({"case": name, "median_s": med[name], "ratio_vs_skimage": med[name] / med[ref],
                     "max_abs_error_px": errors[name], "times_s": times[name]})
    result = {"image": "scikit-image retina (green), resized to 2048x2048, shifted (17.3, -9.6) px by cubic spline",
              "repeats": args.repeats, "machine": platform.platform(), "python": platform.python_version(),
              "rows": rows}
    out = ROOT / "benchmarks" / "results" / "fourier.json"
    out.write_text(json.dumps(result, indent=1))
    lines = [
        f"Command: `.venv/bin/python benchmarks/bench_fourier.py --repeats {args.repeats}` "
        f"(raw: `benchmarks/results/fourier.json`). Case: {result['image']}; median of "
        f"{args.repeats} interleaved runs.",
        "",
        "| what | median s | ratio vs skimage | max error px |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['median_s']:.3f} | {r['ratio_vs_skimage']:.2f}x | {r['max_abs_error_px']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_docs:
        write_section("fourier", table)


def write_section(name: str, body: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


if __name__ == "__main__":
    main()
