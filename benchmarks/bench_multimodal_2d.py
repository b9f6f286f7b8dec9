"""Multi-modal 2D intensity registration (issue #15, round 4): run-to-run determinism,
accuracy over sampling seeds, and speed against itk-elastix and another source tree.

Modes (run with the bench venv, ``PYTHONPATH=src``):

``--seeds 0,1,2,3``   TRE of ``register(method="intensity")`` per seed ("none" = the
                      default) on report cases and on extra multi-modal pairs built here
                      (never report cases, never held out).
``--interleave``      persistent worker processes for this tree ("after"), ``--before SRC``
                      and itk-elastix, fed one case at a time in rotating order: every
                      tool sees the same machine load; wall and CPU seconds per call.

Examples::

    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_multimodal_2d.py \\
        --seeds none,none,0,1,2,3 --cases ihc_multimodal,x_ihc_b,x_moon_folded
    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_multimodal_2d.py \\
        --interleave --before /tmp/before/src --cases ihc_multimodal,brain_multimodal_2d --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


# ----------------------------------------------------------- extra multi-modal pairs
def _extra():
    import report_cases as rc
    from report_cases import Case, _centre, _grey, _moving_from, _unit
    from skimage import color, data

    from napari_registration import Transform

    def folded(name, loader, angle, shift, noise, seed):
        """|I - 0.5| (many-to-one) plus noise: |NCC| far below the polish's 0.9."""
        def build():
            fixed = _unit(loader())
            truth = Transform.from_rotation(angle, center=_centre(fixed.shape), shift=shift)
            m = _moving_from(fixed, truth)
            m = np.abs(m - 0.5) * 2 + np.random.default_rng(seed).normal(0, noise, m.shape)
            return Case(name, name, "skimage.data", "rigid", "multi", fixed=fixed,
                        moving=_unit(m), truth=truth)
        return build

    def ihc_b():
        rgb = data.immunohistochemistry()
        fixed = _unit(color.rgb2hed(rgb)[..., 0])
        truth = Transform.from_rotation(-11.0, center=_centre(fixed.shape), shift=(-8.2, 3.7))
        return Case("x_ihc_b", "hematoxylin vs luminance, another motion", "skimage.data",
                    "rigid", "multi", fixed=fixed, moving=_moving_from(_grey(rgb), truth),
                    truth=truth)

    extra = {"x_ihc_b": ihc_b,
             "x_moon_folded": folded("x_moon_folded", data.moon, 7.0, (-2.4, 5.1), 0.05, 3),
             "x_moon_folded2": folded("x_moon_folded2", data.moon, 12.0, (6.1, 1.3), 0.1, 13),
             "x_camera_folded": folded("x_camera_folded", data.camera, 4.0, (3.1, -5.2), 0.05, 11),
             "x_coins_folded": folded("x_coins_folded", data.coins, -8.0, (-2.2, 4.4), 0.05, 12)}
    for k, v in extra.items():
        setattr(rc, k, v)
    return rc


def _cases(names):
    rc = _extra()
    return rc.build([getattr(rc, n) for n in names])[0]


def seeds_mode(args):
    from report import tre_of

    from napari_registration import register

    for c in _cases(args.cases.split(",")):
        rows = []
        for s in args.seeds.split(","):
            opts = {} if s == "none" else {"seed": int(s)}
            c0 = time.process_time()
            r = register(c.fixed, c.moving, method="intensity", transform=c.model,
                         fixed_spacing=c.spacing, moving_spacing=c.spacing, score=False, **opts)
            rows.append((s, tre_of(c, r.transform.apply_inverse)["mean"], time.process_time() - c0))
        tres = [t for _, t, _ in rows]
        print(json.dumps({"case": c.name, "tre_median": statistics.median(tres),
                          "tre": {s: round(t, 5) for s, t, _ in rows},
                          "cpu_median": statistics.median(x for _, _, x in rows)}), flush=True)


def worker(label):
    """Reads case names on stdin; prints one JSON line per call."""
    import report_methods as rm
    from report import tre_of

    m = ([x for x in rm.all_methods() if "elastix" in x.name][0] if label == "elastix"
         else rm.Ours("intensity"))
    m.setup()
    cache = {}
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        if name not in cache:
            cache[name] = _cases([name])[0]
            m.run(cache[name])  # warm-up
        c = cache[name]
        t0, c0 = time.perf_counter(), time.process_time()
        raw = m.run(c)
        w, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"case": name, "method": label, "wall": w, "cpu": cpu,
                          "tre": tre_of(c, m.mapper(c, raw))["mean"]}), flush=True)


def interleave_mode(args):
    here_src = os.path.join(os.path.dirname(HERE), "src")
    tools = [("after", here_src), ("elastix", here_src)]
    if args.before:
        tools.insert(0, ("before", args.before))
    procs = []
    for label, src in tools:
        env = dict(os.environ, PYTHONPATH=src)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", label],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, env=env))
    rows = []
    for r in range(args.repeats):
        for name in args.cases.split(","):
            for p in (procs if r % 2 == 0 else procs[::-1]):
                p.stdin.write(name + "\n")
                p.stdin.flush()
                rows.append(json.loads(p.stdout.readline()))
    for p in procs:
        p.stdin.close()
        p.wait()
    for name in args.cases.split(","):
        el = [x for x in rows if x["case"] == name and x["method"] == "elastix"]
        for label, _ in tools:
            rs = [x for x in rows if x["case"] == name and x["method"] == label]
            w, cpu = statistics.median(x["wall"] for x in rs), statistics.median(x["cpu"] for x in rs)
            print(f"{name:22s} {label:8s} TRE {statistics.median(x['tre'] for x in rs):.4f} "
                  f"[{min(x['tre'] for x in rs):.4f}-{max(x['tre'] for x in rs):.4f}] wall {w:.3f} "
                  f"cpu {cpu:.3f} / elastix: wall {w / statistics.median(x['wall'] for x in el):.2f} "
                  f"cpu {cpu / statistics.median(x['cpu'] for x in el):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="ihc_multimodal,brain_multimodal_2d")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds ('none' = default)")
    ap.add_argument("--interleave", action="store_true")
    ap.add_argument("--before", default=None, help="src folder of the other tree")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
    elif args.interleave:
        interleave_mode(args)
    else:
        args.seeds = args.seeds or "none,0,1,2,3"
        seeds_mode(args)


if __name__ == "__main__":
    main()
