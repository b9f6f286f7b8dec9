"""2D linear registration against pystackreg, side by side in one run, optionally with a
second copy of napari-registration's source (e.g. the code before a change) so that
"before" and "after" are measured under the same load.

Run (bench venv: pystackreg is installed there only):

    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_linear2d.py \\
        [--repeats 5] [--cases coins_rigid,...] [--methods fourier,intensity,auto] \\
        [--before /path/to/old/src] [--out results.json] [--malloc report|default]

Each version of our code runs in its own worker process (its ``src`` first on
``PYTHONPATH``), imported once; pystackreg runs in this process. Every (case, method)
runs ``repeats`` times, interleaved over methods and versions (repeat 1 of everything,
then repeat 2, ...), after one untimed warm-up; the table quotes the median wall time
and the TRE of the last run (the methods are deterministic). Ours is called as
``register(fixed, moving, method=m, transform=<case model>, score=False)`` (the warped
image included, scores not), pystackreg as ``StackReg(kind).register`` then
``.transform``: the same calls as ``benchmarks/report.py``. TRE as in the report: mean
distance, over a 7x7 grid of fixed points, of each method's fixed -> moving mapping from
the truth's, in pixels. CPU seconds (``time.process_time`` of the process that ran the
call, all its threads) are quoted beside wall time: on a shared, loaded machine they
move far less than wall time. ``--malloc report`` (the default) sets glibc up as
``report.py`` does (fixed 128 KiB mmap threshold, ``malloc_trim`` and ``gc.collect``
before every timed call, in every process): without it, our numpy-heavy code ran about
2x faster than under the report, pystackreg (C, few large temporaries) hardly changed.

"Before" for a change: ``git archive <commit> src | tar -x -C /tmp/before`` and
``--before /tmp/before/src``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = ("camera_translation", "coins_rigid", "moon_similarity", "retina_affine",
         "chelsea_similarity", "astronaut_rigid", "camera_rotation_150", "ihc_multimodal")

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import report_cases as rc
from napari_registration import register
from bench_linear2d import malloc_like_report, before_run
malloc_like_report(sys.argv[2] == "report")
cache = {}
for line in sys.stdin:
    job = json.loads(line)
    name = job["case"]
    if name not in cache:
        cache[name] = rc.build([getattr(rc, name)])[0][0]
    case = cache[name]
    try:
        before_run()
        t0, c0 = time.perf_counter(), time.process_time()
        r = register(case.fixed, case.moving, method=job["method"], transform=case.model,
                     score=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        est = r.transform.apply_inverse(case.points)
        err = np.linalg.norm(est - case.truth.apply_inverse(case.points), axis=1)
        chosen = r.info.get("chosen") or {}
        out = {"seconds": dt, "cpu": cpu, "tre": float(err.mean()), "tre_max": float(err.max()),
               "kept": f"{chosen.get('method')} {chosen.get('model')}" if chosen else None}
    except Exception as exc:  # reported, not fatal
        out = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    print(json.dumps(out), flush=True)
"""


_LIBC = None


def malloc_like_report(on: bool = True):
    """Allocate as ``benchmarks/report.py`` measures: glibc's mmap threshold fixed at
    128 KiB (so every array above it is fresh, page-faulted memory) and ``malloc_trim``
    plus ``gc.collect`` before each run. Under it, code that makes many large
    temporaries pays for every page of them (moon_similarity: 2x the wall time of a
    default process), which is what the report's times include."""
    global _LIBC
    if not on:
        return
    import ctypes

    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        _LIBC = None


def before_run():
    import gc

    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class Ours:
    def __init__(self, label, src, method, malloc="report"):
        self.label, self.src, self.method, self.malloc = label, src, method, malloc
        self.name = f"ours ({label}): {method}"

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(self.src))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(HERE), self.malloc], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, case):
        self.proc.stdin.write(json.dumps({"case": case.name, "method": self.method}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class PyStackReg:
    name = "pystackreg"

    def start(self):
        import pystackreg  # noqa: F401

    def run(self, case):
        from pystackreg import StackReg

        kind = {"translation": StackReg.TRANSLATION, "rigid": StackReg.RIGID_BODY,
                "similarity": StackReg.SCALED_ROTATION, "affine": StackReg.AFFINE}[case.model]
        try:
            before_run()
            t0, c0 = time.perf_counter(), time.process_time()
            sr = StackReg(kind)
            tmat = sr.register(case.fixed, case.moving)
            sr.transform(case.moving, tmat)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"[:200]}
        p = case.points
        xy1 = np.c_[p[:, 1], p[:, 0], np.ones(len(p))] @ np.asarray(tmat).T
        est = (xy1[:, :2] / xy1[:, 2:])[:, ::-1]
        err = np.linalg.norm(est - case.truth.apply_inverse(p), axis=1)
        return {"seconds": dt, "cpu": cpu, "tre": float(err.mean()), "tre_max": float(err.max())}

    def stop(self):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--methods", default="fourier,intensity,auto")
    parser.add_argument("--src", default=str(HERE.parent / "src"), help="our source (after)")
    parser.add_argument("--before", default="", help="another copy of our src (before)")
    parser.add_argument("--out", default="")
    parser.add_argument("--malloc", choices=("report", "default"), default="report",
                        help="report: glibc set up as benchmarks/report.py does (default)")
    args = parser.parse_args(argv)
    malloc_like_report(args.malloc == "report")

    import report_cases as rc

    cases = rc.build([getattr(rc, n) for n in args.cases.split(",") if n])[0]
    versions = [("after", args.src)] + ([("before", args.before)] if args.before else [])
    runners = [Ours(label, src, m, args.malloc) for m in args.methods.split(",") if m
               for label, src in versions]
    runners.append(PyStackReg())
    applies = {  # fourier: translation/rigid/similarity only
        "fourier": ("translation", "rigid", "similarity")}
    for r in runners:
        r.start()
    results: dict = {}
    try:
        for rep in range(args.repeats + 1):  # repeat 0: warm-up, not timed
            for case in cases:
                for r in runners:
                    if isinstance(r, Ours) and case.model not in applies.get(r.method, (case.model,)):
                        continue
                    out = r.run(case)
                    if rep:
                        results.setdefault(case.name, {}).setdefault(r.name, []).append(out)
                    print(f"[{rep}] {case.name:<20} {r.name:<28} "
                          + (out.get("error") or f"TRE {out['tre']:.2e}  {out['seconds']:.3f} s"),
                          file=sys.stderr, flush=True)
    finally:
        for r in runners:
            r.stop()

    rows = []
    print(f"\n{args.repeats} interleaved repeats, median wall time, malloc {args.malloc}; "
          f"{platform.node()} "
          f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| case | method | TRE mean px | s (median) | time / pystackreg | CPU s (median) | CPU / pystackreg |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in cases:
        peer = results.get(case.name, {}).get("pystackreg", [])
        peer_s = statistics.median(o["seconds"] for o in peer if "seconds" in o) if peer else None
        peer_c = statistics.median(o["cpu"] for o in peer if "cpu" in o) if peer else None
        for name, outs in results.get(case.name, {}).items():
            ok = [o for o in outs if "seconds" in o]
            if not ok:
                print(f"| {case.name} | {name} | {outs[-1].get('error')} | | | | |")
                continue
            s = statistics.median(o["seconds"] for o in ok)
            c = statistics.median(o["cpu"] for o in ok)
            ratio = f"{s / peer_s:.2f}x" if peer_s else ""
            c_ratio = f"{c / peer_c:.2f}x" if peer_c else ""
            kept = f" (kept {ok[-1]['kept']})" if ok[-1].get("kept") else ""
            print(f"| {case.name} | {name}{kept} | {ok[-1]['tre']:.1e} | {s:.3f} | {ratio} "
                  f"| {c:.3f} | {c_ratio} |")
            rows.append({"case": case.name, "method": name, "seconds": s, "cpu": c,
                         "tre": ok[-1]["tre"],
                         "ratio_to_pystackreg": s / peer_s if peer_s else None,
                         "kept": ok[-1].get("kept")})
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": " ".join(sys.argv), "repeats": args.repeats,
                                   "rows": rows}, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
