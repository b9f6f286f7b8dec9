"""Speed of ``method="intensity"`` (linear) against its peers, before/after in ONE run.

What it compares, side by side and interleaved (repeat 1 of everything, then repeat 2 ...,
after one untimed warm-up), on the report's cases (``report_cases``):

* ``ours (after)``: ``register(fixed, moving, method="intensity", transform=<case model>,
  score=False)`` from ``--src`` (default: this checkout's ``src``);
* ``ours (before)`` with ``--before``: the same call from another copy of the source, e.g.
  the commit before a change (``git archive <commit> src | tar -x -C /tmp/before`` then
  ``--before /tmp/before/src``);
* the peers of ``benchmarks/report.py`` that apply (``--peers``, default itk-elastix's
  default maps and pystackreg), called exactly as the report calls them.

Each version of our code runs in its own worker process (its ``src`` first on
``PYTHONPATH``); the peers run in this process. Times include producing the warped image,
as in the report. CPU seconds (``time.process_time`` of the process that ran the call, all
its threads) are quoted beside wall time: on a shared, loaded machine they move far less.
TRE as in the report (``report.tre_of``): mean distance over the case's grid of fixed
points of each method's fixed -> moving mapping from the truth's, in world units.

For ours, a second table splits the time into the stages ``result.info`` records: the
coarse rotation search, the ITK linear stage (seconds per level; "deferred" when its
finest level was left to the polish), the Gauss-Newton polish, and the rest (conversion
to ITK images, the output warp, bookkeeping).

Run (bench venv: elastix and pystackreg are installed there only):

    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_intensity_speed.py \\
        [--repeats 3] [--cases camera_noise_gamma,brain_rigid_3d] [--before /tmp/before/src] \\
        [--before LABEL=/another/src ...] \\
        [--peers elastix,pystackreg] [--no-pause] [--out /tmp/intensity_speed.json]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = ("camera_noise_gamma", "ihc_multimodal", "brain_t1_vs_gm_2d", "brain_rigid_3d",
         "brain_affine_3d", "retina_affine")
# report case name -> builder name in report_cases (where they differ)
BUILDERS = {"brain_t1_vs_gm_2d": "brain_multimodal_2d"}

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import report, report_cases as rc
from napari_registration import register
builders = json.loads(sys.argv[2])
if sys.argv[3] == "nopause":
    # this checkout's code with the ITK stage never paused for the polish: the old
    # pipeline, with its seconds per ITK level recorded
    from napari_registration.backends import intensity
    intensity._defer_mode = lambda ndim, transform: None
cache = {}
for line in sys.stdin:
    job = json.loads(line)
    name = job["case"]
    if name not in cache:
        cache[name] = rc.build([getattr(rc, builders.get(name, name))])[0][0]
    case = cache[name]
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        r = register(case.fixed, case.moving, method="intensity", transform=case.model,
                     fixed_spacing=case.spacing, moving_spacing=case.spacing, score=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        t = report.tre_of(case, r.transform.apply_inverse)
        info = r.info
        stage = info.get("stage", {})
        polish = info.get("polish", {})
        stages = {"search": stage.get("search", {}).get("seconds", 0.0),
                  "itk_levels": stage.get("level_seconds"),
                  "itk": stage.get("seconds", 0.0),
                  "polish": polish.get("seconds", 0.0)}
        stages["rest"] = dt - stages["search"] - stages["itk"] - stages["polish"]
        out = {"seconds": dt, "cpu": cpu, "tre": t["mean"], "tre_max": t["max"],
               "stages": stages, "finest_level": stage.get("finest_level", "run"),
               "shrink_factors": stage.get("shrink_factors"),
               "polish": f"{polish.get('accepted')} ({polish.get('reason')})"}
    except Exception as exc:  # reported, not fatal
        out = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    print(json.dumps(out), flush=True)
"""


class Ours:
    def __init__(self, label, src, nopause=False):
        self.label, self.src, self.nopause = label, src, nopause
        self.name = f"ours ({label}): intensity"

    def applies(self, case):
        return case.model in ("translation", "rigid", "similarity", "affine")

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(self.src))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(HERE), json.dumps(BUILDERS),
                                      "nopause" if self.nopause else "-"],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, case):
        self.proc.stdin.write(json.dumps({"case": case.name}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Peer:
    """A report method (``report_methods``) run in this process, timed like ours."""

    def __init__(self, method):
        self.method = method
        self.name = method.name

    def applies(self, case):
        return self.method.applies(case)

    def start(self):
        self.method.setup()

    def run(self, case):
        import report

        try:
            t0, c0 = time.perf_counter(), time.process_time()
            raw = self.method.run(case)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            t = report.tre_of(case, self.method.mapper(case, raw))
        except Exception as exc:  # reported, not fatal
            return {"error": f"{type(exc).__name__}: {exc}"[:200]}
        return {"seconds": dt, "cpu": cpu, "tre": t["mean"], "tre_max": t["max"]}

    def stop(self):
        pass


def _peers(names):
    import report_methods as rm

    out = []
    for m in rm.all_methods():
        if isinstance(m, rm.Ours):
            continue
        if any(n and n.lower() in m.name.lower() for n in names) and m.available():
            out.append(Peer(m))
    return out


def _median(outs, key):
    vals = [o[key] for o in outs if key in o]
    return statistics.median(vals) if vals else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--src", default=str(HERE.parent / "src"), help="our source (after)")
    parser.add_argument("--before", action="append", default=[],
                        help="another copy of our src: PATH (labelled 'before') or LABEL=PATH; "
                             "may be given several times")
    parser.add_argument("--peers", default="elastix,pystackreg",
                        help="report methods to run beside ours (substrings of their names)")
    parser.add_argument("--no-pause", action="store_true",
                        help="also run this checkout with the ITK stage never paused for the "
                             "polish (the old pipeline, timed per ITK level)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    import report_cases as rc

    names = [n for n in args.cases.split(",") if n]
    cases = rc.build([getattr(rc, BUILDERS.get(n, n)) for n in names])[0]
    versions = [("after", args.src)]
    for b in args.before:
        label, _, path = b.rpartition("=")
        versions.append((label or "before", path))
    runners = [Ours(label, src) for label, src in versions]
    if args.no_pause:
        versions.append(("no pause", args.src))
        runners.append(Ours("no pause", args.src, nopause=True))
    runners += _peers(args.peers.split(","))
    for r in runners:
        r.start()
    results: dict = {}
    t_start = time.perf_counter()
    try:
        for rep in range(args.repeats + 1):  # repeat 0: warm-up, not timed
            for case in cases:
                for r in runners:
                    if not r.applies(case):
                        continue
                    out = r.run(case)
                    if rep:
                        results.setdefault(case.name, {}).setdefault(r.name, []).append(out)
                    print(f"[{rep}] {case.name:<20} {r.name:<30} "
                          + (out.get("error") or f"TRE {out['tre']:.2e}  {out['seconds']:.3f} s "
                                                  f"(CPU {out['cpu']:.3f})"),
                          file=sys.stderr, flush=True)
    finally:
        for r in runners:
            r.stop()

    rows = []
    print(f"\n{args.repeats} interleaved repeats, medians; {platform.node()} {os.cpu_count()} "
          f"cores, {time.perf_counter() - t_start:.0f} s, load average at the end "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| case | method | TRE mean | TRE max | s | CPU s | s / elastix | s / pystackreg "
          "| CPU / elastix | CPU / pystackreg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        per = results.get(case.name, {})

        def ref(name, key):
            for k, outs in per.items():
                if name in k.lower():
                    return _median(outs, key)
            return None

        el_s, el_c = ref("elastix", "seconds"), ref("elastix", "cpu")
        ps_s, ps_c = ref("pystackreg", "seconds"), ref("pystackreg", "cpu")
        for name, outs in per.items():
            ok = [o for o in outs if "seconds" in o]
            if not ok:
                print(f"| {case.name} | {name} | {outs[-1].get('error')} | | | | | | | |")
                continue
            s, c = _median(ok, "seconds"), _median(ok, "cpu")
            tre, tre_max = _median(ok, "tre"), max(o["tre_max"] for o in ok)

            def ratio(a, b):
                return f"{a / b:.2f}x" if (a is not None and b) else ""

            print(f"| {case.name} | {name} | {tre:.2e} | {tre_max:.2e} | {s:.3f} | {c:.3f} "
                  f"| {ratio(s, el_s)} | {ratio(s, ps_s)} | {ratio(c, el_c)} | {ratio(c, ps_c)} |")
            rows.append({"case": case.name, "method": name, "tre": tre, "tre_max": tre_max,
                         "seconds": s, "cpu": c, "runs": outs,
                         "seconds_over_elastix": s / el_s if el_s else None,
                         "seconds_over_pystackreg": s / ps_s if ps_s else None,
                         "cpu_over_elastix": c / el_c if el_c else None,
                         "cpu_over_pystackreg": c / ps_c if ps_c else None})

    print("\nOurs, per stage (median wall seconds over the repeats):\n")
    print("| case | version | search | ITK levels | ITK | polish | rest (warp, setup) | total "
          "| ITK finest level | polish kept |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|---|")
    for case in cases:
        for label, _ in versions:
            outs = [o for o in results.get(case.name, {}).get(f"ours ({label}): intensity", [])
                    if "stages" in o]
            if not outs:
                continue
            st = [o["stages"] for o in outs]
            med = {k: statistics.median(x[k] for x in st) for k in ("search", "itk", "polish", "rest")}
            lv = [x["itk_levels"] for x in st if x["itk_levels"]]
            levels = ("/".join(f"{statistics.median(v):.3f}" for v in zip(*lv))
                      if lv and len({len(v) for v in lv}) == 1 else "")
            print(f"| {case.name} | {label} | {med['search']:.3f} | {levels} "
                  f"(x{outs[-1]['shrink_factors']}) | {med['itk']:.3f} | {med['polish']:.3f} "
                  f"| {med['rest']:.3f} | {_median(outs, 'seconds'):.3f} | "
                  f"{outs[-1]['finest_level']} | {outs[-1]['polish']} |")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"command": " ".join(sys.argv), "repeats": args.repeats,
                                   "versions": dict(versions), "rows": rows}, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
