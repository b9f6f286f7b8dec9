"""CPU time and page faults per stage of ``register(method="fourier")`` on report cases,
with glibc set up as ``benchmarks/report.py`` measures (fixed 128 KiB mmap threshold,
``malloc_trim`` and ``gc.collect`` before every call), so that the cost of fresh
memory the report's times include shows up.

Run (any venv with scikit-image; for a 'before', point PYTHONPATH at another ``src``):

    PYTHONPATH=src python benchmarks/profile_linear2d_stages.py coins_rigid,moon_similarity [label]

Prints ``label|case|stage|CPU ms per call|page faults per call``: the mean over 7 calls
after one warm-up of ``time.process_time`` and ``ru_minflt`` around the log-polar search,
each refinement pass (least squares, biweight) and the whole call.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = argv[0].split(",") if argv else ["coins_rigid", "moon_similarity"]
    label = argv[1] if len(argv) > 1 else "current"
    import report_cases as rc

    import napari_registration.backends.fourier as fourier
    import napari_registration.core.refine as refine
    from napari_registration import register

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, as report.py
    acc: dict = {}

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def wrap(mod, name, key):
        orig = getattr(mod, name)

        def timed(*a, **k):
            f0, t0 = faults(), time.process_time()
            try:
                return orig(*a, **k)
            finally:
                kk = key(a, k)
                old = acc.get(kk, (0.0, 0))
                acc[kk] = (old[0] + time.process_time() - t0, old[1] + faults() - f0)
        setattr(mod, name, timed)

    wrap(refine, "_refine_linear",
         lambda a, k: "refine: biweight pass" if k.get("robust") else "refine: least squares")
    wrap(fourier, "_estimate_similarity", lambda a, k: "log-polar search")
    reps = 7
    for name in names:
        case = rc.build([getattr(rc, name)])[0][0]
        register(case.fixed, case.moving, method="fourier", transform=case.model, score=False)
        acc.clear()
        total = [0.0, 0]
        for _ in range(reps):
            gc.collect()
            libc.malloc_trim(0)
            f0, t0 = faults(), time.process_time()
            register(case.fixed, case.moving, method="fourier", transform=case.model, score=False)
            total[0] += time.process_time() - t0
            total[1] += faults() - f0
        acc["register() total"] = tuple(total)
        for stage, (cpu, flt) in acc.items():
            print(f"{label}|{name}|{stage}|{cpu / reps * 1000:.0f}|{flt / reps / 1000:.1f}k")


if __name__ == "__main__":
    main()
