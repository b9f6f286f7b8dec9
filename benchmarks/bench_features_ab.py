"""`features` (ORB) against raw OpenCV ORB and another version, each call timed by the
report's own ``measure()``, variants interleaved in rotating order, medians of wall and
CPU time (``time.process_time`` inside the call, all threads), as ratios to raw ORB.

    git worktree add --detach /tmp/before main
    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_features_ab.py \\
        --before /tmp/before/src --cases moon_similarity --repeats 41 --warp 0 \\
        --variants "noshare:_share_cores=lambda n: contextlib.nullcontext()"

``--variants "label:ATTR=expr&ATTR=expr;label2:..."``: this version with module
attributes of ``backends.features`` (or ``reg.X`` for ``core.register``) replaced for the
call, e.g. ``nostretch:UINT8_STRETCH=False``. ``--warp 0`` leaves our warp out (raw ORB
keeps its warpAffine). The other processes' CPU during the run (from /proc/stat, in cores)
is printed: on the shared 2-core machine wall times only mean something when it is ~0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics as st
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from interleave import time_interleaved  # noqa: E402 - benchmarks/ is on sys.path


def _cpu_snapshot():
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    t = os.times()
    return sum(v[:8]), v[3] + v[4], (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def others_cores(a, b) -> float:
    """Cores the other processes used between two snapshots."""
    tot, idle, mine = (y - x for x, y in zip(a, b))
    return (os.cpu_count() or 1) * (tot - idle - mine) / max(tot, 1)


def main(argv=None):
    import report_cases
    from bench_features import load_before
    from report import measure, tre_of
    from report_methods import OpenCVOrb

    import napari_registration as now
    import napari_registration.backends.features as feats
    import napari_registration.core.register as reg
    from napari_registration.data import grid_points

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="moon_similarity")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--warp", type=int, default=0)
    ap.add_argument("--detector", default="orb")
    ap.add_argument("--before", default="", help="another version's src/ to run beside this one")
    ap.add_argument("--variants", default="")
    a = ap.parse_args(argv)
    before = load_before(a.before) if a.before else None
    mods = {"feats": feats, "reg": reg}

    @contextlib.contextmanager
    def patched(stmts):
        saved = {}
        for s in filter(None, stmts.split("&")):
            key, value = s.split("=", 1)
            mname, attr = key.split(".") if "." in key else ("feats", key)
            mod = mods[mname]
            saved[(mod, attr)] = getattr(mod, attr)
            setattr(mod, attr, eval(value, {"contextlib": contextlib}))
        try:
            yield
        finally:
            for (mod, attr), value in saved.items():
                setattr(mod, attr, value)

    for name in a.cases.split(","):
        case = getattr(report_cases, name)()
        if case.points is None:
            case.points = grid_points(case.shape, case.spacing)
        peer = OpenCVOrb()

        def ours(pkg, stmts=""):
            with patched(stmts):
                return pkg.register(case.fixed, case.moving, method="features",
                                    transform=case.model, detector=a.detector, score=False,
                                    warp=bool(a.warp))

        variants = {"raw ORB": (lambda: peer.run(case), lambda r: peer.mapper(case, r))}
        if before is not None:
            variants["before"] = (lambda: ours(before), lambda r: r.transform.apply_inverse)
        variants["now"] = (lambda: ours(now), lambda r: r.transform.apply_inverse)
        for spec in filter(None, a.variants.split(";")):
            label, stmts = spec.split(":", 1)
            variants[label] = (lambda stmts=stmts: ours(now, stmts),
                               lambda r: r.transform.apply_inverse)
        tre = {}
        for k, (run, mapper) in variants.items():  # warm up + accuracy
            tre[k] = tre_of(case, mapper(run()))["mean"]
        names = list(variants)
        snap = _cpu_snapshot()
        wall, cpu = time_interleaved({k: v[0] for k, v in variants.items()}, a.repeats,
                                     measure=measure)
        busy = others_cores(snap, _cpu_snapshot())
        rw, rc = st.median(wall["raw ORB"]), st.median(cpu["raw ORB"])
        print(f"== {name} (warp={bool(a.warp)}, {a.repeats} repeats, other processes "
              f"{busy:.2f} cores): raw ORB wall {rw * 1e3:.1f} ms, CPU {rc * 1e3:.1f} ms")
        for k in names:
            w, c = st.median(wall[k]), st.median(cpu[k])
            print(f"  {k:12s} wall {w * 1e3:6.1f} ms ({w / rw:.2f}x)  CPU {c * 1e3:6.1f} ms "
                  f"({c / rc:.2f}x)  TRE {tre[k]:.4f}")


if __name__ == "__main__":
    main()
