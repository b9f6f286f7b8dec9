"""What decides ORB's 8-bit scale in `features`, per report case: FAST corners (ORB's
threshold, full resolution) and ORB keypoints on each image's own 8-bit scale and on the
core's percentile stretch, which scale the rule picks (NATIVE_MIN_CORNERS), and what the
decision costs: the one-pass OpenCV conversion against numpy's four passes, and the
corner count, timed interleaved (medians, wall and CPU).

    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_orb_scale.py --repeats 41
"""

from __future__ import annotations

import argparse
import statistics as st
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from interleave import time_interleaved  # noqa: E402 - benchmarks/ is on sys.path

CASES = ("moon_similarity", "retina_affine", "coins_rigid", "camera_translation",
         "astronaut_homography", "camera_rotation_150")


def numpy_native(image, gain):
    """The conversion written with numpy (four passes), for the timing comparison."""
    out = np.multiply(np.asarray(image, dtype=np.float32), np.float32(gain))
    np.rint(out, out=out)
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def main(argv=None):
    import cv2
    import report_cases

    from napari_registration.backends import features as F
    from napari_registration.core.preprocess import prepare_uint8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=41)
    a = ap.parse_args(argv)
    orb = F._make_detector("orb", 5000, None)
    print(f"rule: own scale when FAST finds >= {F.NATIVE_MIN_CORNERS} corners there")
    for name in a.cases.split(","):
        case = getattr(report_cases, name)()
        for side, img in (("fixed", case.fixed), ("moving", case.moving)):
            own = F.native_uint8(img, 255.0)   # the cases are float images in [0, 1]
            stretched = prepare_uint8(img)
            corners = F.count_corners(own)
            kp_own, kp_str = (len(orb.detect(u, None)) for u in (own, stretched))
            pick = "own" if corners >= F.NATIVE_MIN_CORNERS else "stretched"
            print(f"{name:22s} {side:6s} FAST corners on own scale {corners:5d} -> {pick:9s} "
                  f"ORB keypoints own {kp_own:5d}, stretched {kp_str:5d}")
    img = report_cases.retina_affine().fixed
    own = F.native_uint8(img, 255.0)
    assert np.array_equal(own, numpy_native(img, 255.0))
    calls = {"convert: OpenCV, one pass": lambda: F.native_uint8(img, 255.0),
             "convert: numpy, four passes": lambda: numpy_native(img, 255.0),
             "FAST corner count": lambda: F.count_corners(own),
             "ORB detect + describe": lambda: orb.detectAndCompute(own, None)}
    cv2.setNumThreads(1)
    wall, cpu = time_interleaved(calls, a.repeats)
    print(f"\ncosts on retina_affine's fixed image {img.shape}, one OpenCV thread, "
          f"{a.repeats} interleaved repeats (medians):")
    ref = st.median(wall["ORB detect + describe"])
    for k in calls:
        w, c = st.median(wall[k]), st.median(cpu[k])
        print(f"  {k:28s} wall {w * 1e3:6.2f} ms ({w / ref:.3f}x ORB)  CPU {c * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
