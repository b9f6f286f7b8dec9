"""Paired, interleaved timing of 3D registrations (issue #15 round 4, "auto and 3D
intensity"): this checkout against another copy of the package and the peers, in ONE
run. One long-lived worker process per source tree (imports and first calls excluded by
a warm-up run of every job) takes the calls in turns, repeat by repeat, so machine load
hits all alike; each call is timed in wall and CPU seconds (``process_time``: every
thread of the worker) with glibc's mmap threshold fixed as in ``report.py``.

    git worktree add --detach /tmp/before <commit>
    PYTHONPATH=src python benchmarks/bench_3d_pairs.py --cases brain_rigid_3d,brain_affine_3d \\
        --jobs "now:intensity,now:auto,before:intensity,before:auto,peer:itk-elastix (default maps)" \\
        --before /tmp/before/src --repeats 3 [--out runs.json]

Jobs are ``source:method``: ``now`` (this checkout), ``before`` (``--before``), ``peer``
(a peer of ``report_methods``, run in the ``now`` worker). Cases are ``report_cases``
builders or the tuning variants below (other motions of the report's 3D brain, and T1
vs white-matter map: the held-out multi-modal case uses grey matter). Prints medians
and, per case, paired ratios against the first job (median over repeats of run / run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------- tuning variants
def _variant(kind, k):
    import report_cases as rc

    fixed, spacing = rc._brain_anisotropic()
    rng = np.random.default_rng(7 if kind == "affine" else 11)
    for _ in range(k + 1):
        lin = rc._rot3(tuple(rng.uniform(-8, 8, 3)))
        if kind == "affine":
            lin = lin @ (np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3)))
        shift = tuple(rng.uniform(-6, 6, 3))
    truth = rc._affine_about(lin, rc._centre(fixed.shape, spacing), shift)
    return rc.Case(f"{kind}_var{k}", f"MNI T1 3x2x2 mm, random {kind} motion {k}", "", kind,
                   fixed=fixed, moving=rc._moving_from(fixed, truth, spacing), truth=truth,
                   spacing=spacing)


def _t1_vs_wm(angles, shift, name):
    import report_cases as rc

    t1, wm = rc.mni_template("t1"), rc.mni_template("wm")
    fixed, white = rc._downscale(t1, (3, 2, 2)), rc._downscale(wm, (3, 2, 2))
    spacing = (3.0, 2.0, 2.0)
    truth = rc._affine_about(rc._rot3(angles), rc._centre(fixed.shape, spacing), shift)
    return rc.Case(name, "MNI T1 vs white-matter map, 3x2x2 mm, rigid", "", "rigid", "multi",
                   fixed=fixed, moving=rc._moving_from(white, truth, spacing), truth=truth,
                   spacing=spacing)


VARIANTS = {
    **{f"rigid_var{k}": (lambda k=k: _variant("rigid", k)) for k in range(3)},
    **{f"affine_var{k}": (lambda k=k: _variant("affine", k)) for k in range(3)},
    "t1_vs_wm_3d": lambda: _t1_vs_wm((-5.0, 3.0, 6.0), (-4.0, 3.0, -2.5), "t1_vs_wm_3d"),
    "t1_vs_wm_3d_b": lambda: _t1_vs_wm((7.0, -4.0, 2.0), (5.0, -3.0, 4.0), "t1_vs_wm_3d_b"),
}


# ------------------------------------------------------------------------ worker
def worker():
    import ctypes
    import gc

    sys.path.insert(0, str(HERE))
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, as report.py
    import report_cases
    import report_methods
    from napari_registration.core.metrics import tre
    from napari_registration.data import grid_points

    methods = {m.name: m for m in report_methods.all_methods()}
    cache = {}
    for line in sys.stdin:
        name, method = line.rstrip("\n").split(" ", 1)
        if name not in cache:
            build = getattr(report_cases, name, None) or VARIANTS[name]
            case = build()
            if case.points is None:
                case.points = grid_points(case.shape, case.spacing)
            cache[name] = case
        case = cache[name]
        m = methods.get(method) or methods["ours: " + method]
        m.setup()
        gc.collect()
        libc.malloc_trim(0)
        t, c = time.perf_counter(), time.process_time()
        raw = m.run(case)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        err = tre(m.mapper(case, raw)(case.points), case.truth.apply_inverse(case.points))["mean"]
        out = {"wall": wall, "cpu": cpu, "tre": err}
        info = getattr(raw, "info", None)
        if isinstance(info, dict) and "stages" in info:
            out["kept"] = info["stages"][info["chosen"]["stage"]]["method"]
            out["stages_run"] = len(info["stages"])
        print(json.dumps(out), flush=True)


def main(argv):
    opts = dict(zip(argv[::2], argv[1::2]))
    cases = opts["--cases"].split(",")
    jobs = [j.split(":", 1) for j in opts["--jobs"].split(",")]
    repeats = int(opts.get("--repeats", 3))
    srcs = {"now": str(ROOT / "src"), "before": opts.get("--before")}
    workers = {}
    for src, _ in jobs:
        key = "now" if src == "peer" else src
        if key not in workers:
            if not srcs.get(key):
                raise SystemExit(f"job source {src!r} needs --before <path to src>")
            env = dict(os.environ, PYTHONPATH=srcs[key])
            workers[key] = subprocess.Popen([sys.executable, __file__, "--worker"], env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(src, case, method):
        w = workers["now" if src == "peer" else src]
        w.stdin.write(f"{case} {method}\n")
        w.stdin.flush()
        return json.loads(w.stdout.readline())

    for case in cases:  # warm-up
        for src, method in jobs:
            ask(src, case, method)
    runs = {}
    for _ in range(repeats):
        for case in cases:
            for src, method in jobs:
                runs.setdefault((case, src, method), []).append(ask(src, case, method))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    for case in cases:
        print(f"== {case}")
        for src, method in jobs:
            rs = runs[(case, src, method)]
            print(f"  {src:7s} {method:30s} wall {np.median([r['wall'] for r in rs]):.3f} "
                  f"cpu {np.median([r['cpu'] for r in rs]):.3f} "
                  f"TRE {np.median([r['tre'] for r in rs]):.2e}"
                  + (f"  kept {rs[0]['kept']}, {rs[0]['stages_run']} stages" if "kept" in rs[0] else ""))
        first = runs[(case, *jobs[0])]
        for src, method in jobs[1:]:
            rs = runs[(case, src, method)]
            ratio = {k: np.median([a[k] / b[k] for a, b in zip(rs, first)]) for k in ("wall", "cpu")}
            print(f"    {src}:{method} / {':'.join(jobs[0])}: wall {ratio['wall']:.2f}x, "
                  f"cpu {ratio['cpu']:.2f}x")
    if "--out" in opts:
        Path(opts["--out"]).write_text(json.dumps(
            {f"{c}|{s}|{m}": v for (c, s, m), v in runs.items()}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker()
    else:
        main(sys.argv[1:])
