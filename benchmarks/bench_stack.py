"""Stacks: serial vs dask workers, peers, and memory of a larger-than-budget stack.

    .venv/bin/python benchmarks/bench_stack.py [--frames 200] [--size 512] [--quick]

1. Speed: a drifting series (``--frames`` frames of ``--size``^2, crops of scikit-image's
   Hubble deep field after known sub-pixel shifts) registered with fourier translation to
   the first frame and warped: in-process (serial), on a dask.distributed LocalCluster of
   2 worker processes (1 thread each), and in a local process pool of 2; side by side
   with scikit-image's phase_cross_correlation + ndimage.shift loop and pystackreg
   (TRANSLATION) when installed. Accuracy: mean TRE against the known drift.
2. Memory: in a fresh subprocess, a lazily generated dask stack of ~1 GB (256 frames
   of 1024^2 float32) is registered on a 4x downsampled copy and written to TIFF frame
   by frame; peak RSS (getrusage) and the tracemalloc peak are recorded against a
   200 MB budget.

Writes benchmarks/results/stack.json. The machine is shared: the load average is
recorded with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def drifting_series(n, size, seed=0):
    from scipy import ndimage
    from skimage import color, data

    image = color.rgb2gray(data.hubble_deep_field()).astype(np.float32)
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    drifts = np.hstack([6 * np.sin(t / 17.0), 5 * np.cos(t / 23.0) - 5]) + rng.uniform(-0.5, 0.5, (n, 2))
    drifts -= drifts[0]
    margin = 16
    corner = ((np.array(image.shape) - size) // 2)
    lo = corner - margin
    region = image[lo[0]:lo[0] + size + 2 * margin, lo[1]:lo[1] + size + 2 * margin]
    frames = np.stack([ndimage.shift(region, -d, order=3, mode="nearest")[margin:margin + size,
                                                                          margin:margin + size]
                       for d in drifts])
    return frames, drifts


def mean_tre(transforms, drifts, shape):
    from napari_registration import Transform
    from napari_registration.data import grid_points, tre_against_truth

    pts = grid_points(shape)
    return float(np.mean([tre_against_truth(t, Transform.from_translation(d), pts)["mean"]
                          for t, d in zip(transforms, drifts)]))


def load():
    return list(os.getloadavg())


def bench_speed(frames, drifts):
    from napari_registration import register_stack

    rows = {}

    def record(name, seconds, tre, **extra):
        rows[name] = {"seconds": seconds, "frames_per_second": len(frames) / seconds,
                      "mean_tre_px": tre, "load_before": extra.pop("load"), **extra}
        print(f"  {name:34s} {seconds:7.2f} s  {len(frames) / seconds:6.1f} frames/s  "
              f"TRE {tre:.3f} px  (load {rows[name]['load_before'][0]:.1f})", flush=True)

    la = load()
    t0 = time.perf_counter()
    serial = register_stack(frames)
    record("napari-registration serial", time.perf_counter() - t0,
           mean_tre(serial.transforms, drifts, frames.shape[1:]), load=la)

    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    client.run(lambda: __import__("napari_registration.backends.fourier"))  # warm imports
    startup = time.perf_counter() - t0
    try:
        la = load()
        t0 = time.perf_counter()
        dist = register_stack(frames, client=client)
        record("napari-registration dask 2 workers", time.perf_counter() - t0,
               mean_tre(dist.transforms, drifts, frames.shape[1:]), load=la,
               cluster_startup_seconds=startup)
        assert np.allclose(dist.warped, serial.warped, atol=1e-4)
    finally:
        client.close()
        cluster.close()

    la = load()
    t0 = time.perf_counter()
    pool = register_stack(frames, workers=2)
    record("napari-registration process pool 2", time.perf_counter() - t0,
           mean_tre(pool.transforms, drifts, frames.shape[1:]), load=la,
           note="includes starting 2 spawned processes")

    # peers, in-process
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation

    from napari_registration import Transform

    la = load()
    t0 = time.perf_counter()
    out, shifts = np.empty_like(frames), []
    for i, frame in enumerate(frames):
        shift = phase_cross_correlation(frames[0], frame, upsample_factor=100)[0]
        out[i] = ndimage.shift(frame, shift, order=1)
        shifts.append(shift)
    record("skimage phase_cross_correlation loop", time.perf_counter() - t0,
           mean_tre([Transform.from_translation(s) for s in shifts], drifts, frames.shape[1:]),
           load=la)
    try:
        from pystackreg import StackReg
    except ImportError:
        print("  pystackreg not installed: skipped (pip install pystackreg)")
    else:
        la = load()
        t0 = time.perf_counter()
        sr = StackReg(StackReg.TRANSLATION)
        mats = sr.register_stack(frames, reference="first")
        sr.transform_stack(frames)
        # pystackreg matrices map reference (x, y) -> frame (x, y): invert and swap to rows
        ts = []
        for m in mats:
            inv = np.linalg.inv(m)
            ts.append(Transform.from_translation([inv[1, 2], inv[0, 2]]))
        record("pystackreg TRANSLATION", time.perf_counter() - t0,
               mean_tre(ts, drifts, frames.shape[1:]), load=la)
    base = rows["napari-registration serial"]["seconds"]
    for row in rows.values():
        row["speedup_vs_serial"] = base / row["seconds"]
    return rows


MEMORY_CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
import dask
import dask.array as da
from scipy import ndimage
from napari_registration import register_stack
from napari_registration.core.stack import write_tiff_stack

n, size, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def status_mb(key):
    # VmHWM/VmRSS of this process image (getrusage's ru_maxrss survives fork+exec on
    # Linux and would report the parent's peak)
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


base_rss = status_mb("VmRSS")
rng = np.random.default_rng(0)
texture = ndimage.gaussian_filter(rng.random((size + 64, size + 64)).astype(np.float32), 2.0)
drifts = np.cumsum(rng.uniform(-0.6, 0.6, (n, 2)), axis=0)
drifts -= drifts[0]

def make(block_info=None):
    i = block_info[None]["chunk-location"][0]
    d = drifts[i]
    region = ndimage.shift(texture, -d, order=1, mode="nearest")
    return region[32:32 + size, 32:32 + size][None].astype(np.float32)

stack = da.map_blocks(make, dtype=np.float32, chunks=((1,) * n, (size,), (size,)))
dask.config.set(scheduler="threads", num_workers=2)
tracemalloc.start()
t0 = time.perf_counter()
result = register_stack(stack, downsample=4, score=False)
t_reg = time.perf_counter() - t0
write_tiff_stack(path, result.warped, frames_per_batch=2)
seconds = time.perf_counter() - t0
_, traced_peak = tracemalloc.get_traced_memory()
shifts = np.array([t.matrix[:2, 2] for t in result.transforms])
print(json.dumps({
    "frames": n, "frame_shape": [size, size], "dtype": "float32",
    "stack_mb": n * size * size * 4 / 2**20,
    "downsample": 4,
    "peak_rss_mb": status_mb("VmHWM"),
    "rss_after_imports_mb": base_rss,
    "tracemalloc_peak_mb": traced_peak / 2**20,
    "register_seconds": t_reg, "total_seconds": seconds,
    "max_drift_error_px": float(np.abs(shifts - drifts).max()),
}))
"""


def bench_memory(frames=256, size=1024, budget_mb=200.0):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "aligned.tif")
        la = load()
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(frames), str(size), path],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["tiff_mb"] = os.path.getsize(path) / 2**20
    out["budget_mb"] = budget_mb
    out["within_budget"] = out["peak_rss_mb"] <= budget_mb
    out["load_before"] = la
    print(f"  {out['stack_mb']:.0f} MB stack -> TIFF ({out['tiff_mb']:.0f} MB): peak RSS "
          f"{out['peak_rss_mb']:.0f} MB (after imports {out['rss_after_imports_mb']:.0f} MB), "
          f"tracemalloc peak {out['tracemalloc_peak_mb']:.0f} MB, {out['total_seconds']:.1f} s, "
          f"max drift error {out['max_drift_error_px']:.3f} px", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true",
                        help="rerun the memory part and update results/stack.json")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.size = 24, 256
    print(f"load average {load()} on {os.cpu_count()} cores", flush=True)
    if args.only_memory:
        out = HERE / "results" / "stack.json"
        results = json.loads(out.read_text())
        results["memory"] = bench_memory(64, 512) if args.quick else bench_memory()
        results["memory"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if not args.quick:
            out.write_text(json.dumps(results, indent=1))
        return results
    frames, drifts = drifting_series(args.frames, args.size)
    print(f"speed: {args.frames} frames of {args.size}x{args.size}, fourier translation, "
          "reference=first, warped", flush=True)
    speed = bench_speed(frames, drifts)
    memory = None
    if not args.skip_memory:
        print("memory: lazy dask stack -> TIFF", flush=True)
        memory = bench_memory(64, 512) if args.quick else bench_memory()
    import dask
    import distributed

    import napari_registration

    results = {
        "command": "python benchmarks/bench_stack.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "load_average_end": load(),
        "versions": {"napari-registration": napari_registration.__version__,
                     "dask": dask.__version__, "distributed": distributed.__version__,
                     "numpy": np.__version__},
        "speed": {"frames": args.frames, "size": args.size, "rows": speed},
        "memory": memory,
    }
    if not args.quick:
        out = HERE / "results" / "stack.json"
        out.parent.mkdir(exist_ok=True)
        if memory is None and out.exists():  # --skip-memory keeps the last memory run
            results["memory"] = json.loads(out.read_text()).get("memory")
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
