"""auto against the method it keeps, CPU and wall time, two source trees side by side.

    PYTHONPATH=$PWD/src /work/venv-bench/bin/python benchmarks/bench_auto_cpu.py \
        --case camera_rotation_150 --methods fourier,auto --before /tmp/before/src

One report case (``benchmarks/report_cases.py``), each source tree in its own worker
process (``--rounds`` workers per tree, taking turns: before, now, before, now), each
worker running the methods in turn ``--repeats`` times after one warm-up round, with
the report's allocator settings (``report._libc``: fixed mmap threshold, ``malloc_trim``
before each run) and ``register(..., score=False)`` as the report calls it. Prints the
medians of wall (``perf_counter``) and CPU (``process_time``) seconds, the mean TRE,
and auto's ratio to each other method of the same tree. CPU time is the figure to trust
on a shared machine (wall time includes waiting for the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(case_name: str, methods: list[str], repeats: int) -> dict:
    import gc

    sys.path.insert(0, str(HERE))
    import report
    import report_cases
    from napari_registration import register

    case = report_cases.build([getattr(report_cases, case_name)])[0][0]
    out = {m: [] for m in methods}
    for rep in range(repeats + 1):
        for m in methods:
            gc.collect()
            libc = report._libc()
            if libc:
                libc.malloc_trim(0)
            p0, t0 = time.process_time(), time.perf_counter()
            r = register(case.fixed, case.moving, method=m, transform=case.model,
                         fixed_spacing=case.spacing, moving_spacing=case.spacing, score=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - p0
            if rep:  # the first round is a warm-up
                out[m].append((wall, cpu, report.tre_of(case, r.transform.apply_inverse)["mean"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True)
    ap.add_argument("--methods", default="fourier,auto")
    ap.add_argument("--before", help="src directory of the other tree (e.g. main's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    methods = args.methods.split(",")
    if args.worker:
        print(json.dumps(worker(args.case, methods, args.repeats)))
        return
    trees = ([("before", args.before)] if args.before else []) + [("now", os.environ.get(
        "PYTHONPATH", str(HERE.parent / "src")).split(os.pathsep)[0])]
    runs = {tag: {m: [] for m in methods} for tag, _ in trees}
    for _ in range(args.rounds):
        for tag, src in trees:
            env = dict(os.environ, PYTHONPATH=src)
            proc = subprocess.run([sys.executable, __file__, "--worker", "--case", args.case,
                                   "--methods", args.methods, "--repeats", str(args.repeats)],
                                  env=env, capture_output=True, text=True, check=True)
            for m, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                runs[tag][m].extend(v)
    med = statistics.median
    for tag, _ in trees:
        wall = {m: med(x[0] for x in v) for m, v in runs[tag].items()}
        cpu = {m: med(x[1] for x in v) for m, v in runs[tag].items()}
        for m, v in runs[tag].items():
            print(f"{args.case} {tag:6s} {m:10s} wall {wall[m]:.3f} s  cpu {cpu[m]:.3f} s  "
                  f"TRE {med(x[2] for x in v):.3g}  (n={len(v)})")
        if "auto" in wall:
            for m in methods:
                if m != "auto":
                    print(f"  {tag}: auto / {m}: wall {wall['auto'] / wall[m]:.2f}x, "
                          f"cpu {cpu['auto'] / cpu[m]:.2f}x")


if __name__ == "__main__":
    main()
