"""Whole slides and big volumes: register coarse, apply fine, write OME-Zarr.

Every case runs in a fresh subprocess so its peak memory (VmHWM) is its own:

* ``slide SIZE``: a SIZE x SIZE uint8 RGB slide pair built lazily from scikit-image's
  immunohistochemistry image (detail from its camera photo) with a known rigid motion,
  given as pyramids (what a scanner's OME-TIFF/OME-Zarr holds). We time the transform
  (``register`` on the level within the pixel budget + tile refinement), measure the
  TRE at full resolution over a grid of points, and write the full-resolution warp as a
  multiscale OME-Zarr (every level warped straight from the moving pyramid).
* ``throughput SIZE``: the same lazy warp against ``dask_image.ndinterp.affine_transform``
  on one in-memory SIZE^2 RGB image (same chunks, same matrix, order 1), MB/s of output.
* ``bent SIZE``: the slide pair bent by a smooth random deformation (largest displacement
  SIZE/800 px), registered rigidly (coarse + tiles) and then with
  ``pyramid_deformable=True`` (B-spline on the level within 512 px): TRE at full resolution
  of both, time of both, and the time to warp a 2048^2 region of level 0 through each.
* ``volume D``: a D x 2D x 2D uint16 volume from the MNI152 T1 template shipped by
  nilearn, a rigid motion, ``register(..., method="intensity", transform="rigid")`` on
  the budget level + tile refinement, and the warp written as chunked OME-Zarr. Peak
  memory is compared with one input's size.

    python benchmarks/bench_bigimage.py --slides 5000 10000 20000 40000 --volumes 128 256 512

Results go to ``benchmarks/results/bigimage.json`` and are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tre(transform, truth, shape, n=11) -> dict:
    axes = [np.linspace(0, s - 1, n) for s in shape]
    pts = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    err = np.linalg.norm(transform.apply(pts) - truth.apply(pts), axis=1)
    return {"tre_max_px": float(err.max()), "tre_mean_px": float(err.mean())}


def case_slide(size: int, workdir: Path) -> dict:
    from napari_registration import register
    from napari_registration.bigdata import slide_pair
    from napari_registration.core.pyramid import level_warper
    from napari_registration.io_big import write_ome_zarr

    levels = max(1, int(np.floor(np.log2(size / 512))) + 1)
    fixed, moving, truth = slide_pair(size, angle=2.0, shift=(123.4, -56.7), levels=levels,
                                      chunks=1024)
    t0 = time.perf_counter()
    result = register(fixed, moving, method="fourier", transform="rigid", warp=False)
    t_transform = time.perf_counter() - t0
    out = {"size": size, "levels": levels, "transform_seconds": t_transform, "fast_warp": FAST,
           "pyramid": {k: result.info["pyramid"][k] for k in ("fixed_level", "estimation_spacing")},
           "refinements": result.info["pyramid"]["refinements"],
           **_tre(result.transform, truth, (size, size))}
    coarse = result.info["pyramid"]["coarse_transform"]
    from napari_registration import Transform

    out["coarse_tre_max_px"] = _tre(Transform.from_dict(coarse), truth, (size, size))["tre_max_px"]
    out["rss_after_transform_mb"] = _vmhwm_mb()
    out["tile_chunk_reads"] = sum(r.get("chunk_reads", 0) for r in out["refinements"])
    if TRANSFORM_ONLY:
        out["peak_rss_mb"] = _vmhwm_mb()
        return out
    warp = level_warper(moving, result.transform, rgb=True, chunks=1024, fast=FAST)
    t0 = time.perf_counter()
    level0 = warp((size, size), np.ones(2), np.zeros(2))
    out["graph_seconds"] = time.perf_counter() - t0
    target = workdir / f"slide{size}.ome.zarr"
    t0 = time.perf_counter()
    write_ome_zarr(target, level0, rgb=True, n_levels=levels, make_level=warp, chunks=1024)
    out["write_seconds"] = time.perf_counter() - t0
    total = sum(int(np.prod(a.shape)) for a in fixed)  # bytes (uint8) written, all levels
    out["written_mb"] = total / 1e6
    out["write_mb_per_s"] = total / 1e6 / out["write_seconds"]
    out["disk_mb"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 1e6
    out["peak_rss_mb"] = _vmhwm_mb()
    shutil.rmtree(target, ignore_errors=True)
    return out


def case_throughput(size: int, workdir: Path) -> dict:
    import dask
    import dask.array as da
    from dask_image.ndinterp import affine_transform

    from napari_registration import Transform, apply_transform
    from napari_registration.bigdata import slide_pair

    _, moving, _ = slide_pair(size, levels=1, chunks=1024)
    image = np.asarray(moving[0])  # in memory: both warps read the same array
    src = da.from_array(image, chunks=(1024, 1024, 3))
    c = (size - 1) / 2
    t = Transform.from_rotation(3.0, center=(c, c)).then(Transform.from_translation((20.5, -7.25)))
    mb = image.nbytes / 1e6
    out = {"size": size, "mb": mb}
    with dask.config.set(scheduler="threads", num_workers=2):
        ours = apply_transform(src, t, output_shape=(size, size), rgb=True, chunks=1024)
        t0 = time.perf_counter()
        a = ours.compute()
        out["ours_seconds"] = time.perf_counter() - t0
        fast = apply_transform(src, t, output_shape=(size, size), rgb=True, chunks=1024, fast=True)
        t0 = time.perf_counter()
        a_fast = fast.compute()
        out["ours_fast_seconds"] = time.perf_counter() - t0
        out["fast_max_abs_difference"] = float(np.abs(a_fast.astype(float) - a).max())
        # dask-image: pull-back matrix (output index -> input index), channel axis kept
        inv = np.linalg.inv(t.matrix)
        m = np.eye(4)
        m[:2, :2] = inv[:2, :2]
        m[:2, 3] = inv[:2, 2]
        theirs = affine_transform(src.astype(np.float32), m, output_shape=image.shape,
                                  order=1, output_chunks=(1024, 1024, 3))
        t0 = time.perf_counter()
        b = theirs.compute()
        out["dask_image_seconds"] = time.perf_counter() - t0
    out["ours_mb_per_s"] = mb / out["ours_seconds"]
    out["ours_fast_mb_per_s"] = mb / out["ours_fast_seconds"]
    out["fast_speedup"] = out["dask_image_seconds"] / out["ours_fast_seconds"]
    out["dask_image_mb_per_s"] = mb / out["dask_image_seconds"]
    out["speedup"] = out["dask_image_seconds"] / out["ours_seconds"]
    inner = (slice(64, -64), slice(64, -64))
    out["max_abs_difference"] = float(np.abs(a[inner].astype(float) - np.clip(np.rint(b[inner]), 0, 255)).max())
    out["peak_rss_mb"] = _vmhwm_mb()
    return out


def case_bent(size: int, workdir: Path) -> dict:
    from napari_registration import register
    from napari_registration.bigdata import slide_pair

    levels = max(1, int(np.floor(np.log2(size / 512))) + 1)
    amp = size / 800
    fixed, moving, truth = slide_pair(size, angle=2.0, shift=(123.4, -56.7), levels=levels,
                                      chunks=1024, deform=amp)
    out = {"size": size, "levels": levels, "deform_px": amp}
    for name, extra in (("linear", {}), ("deformable", {"pyramid_deformable": True})):
        t0 = time.perf_counter()
        r = register(fixed, moving, method="fourier", transform="rigid", **extra)
        out[f"{name}_seconds"] = time.perf_counter() - t0
        out.update({f"{name}_{k}": v for k, v in _tre(r.transform, truth, (size, size)).items()})
        if name == "deformable":
            out["deformable_info"] = r.info["pyramid"]["deformable"]
        region = r.warped[0][size // 2 - 1024:size // 2 + 1024, size // 2 - 1024:size // 2 + 1024]
        t0 = time.perf_counter()
        region.compute()
        out[f"{name}_warp_2048_seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _vmhwm_mb()
    return out


def _mni():
    import SimpleITK as sitk
    import nilearn

    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    return (vol / vol.max() * 60000).astype(np.float32)


def case_volume(depth: int, workdir: Path) -> dict:
    from napari_registration import Transform, register
    from napari_registration.bigdata import lazy_scene
    from napari_registration.core.pyramid import level_warper
    from napari_registration.io_big import write_ome_zarr

    texture = _mni()  # 193 x 229 x 193 voxels of 1 mm
    shape = (depth, 2 * depth, 2 * depth)
    magnify = max(s / t for s, t in zip(shape, texture.shape))
    c = (np.array(shape) - 1) / 2
    rot = np.eye(3)
    a = np.deg2rad(3.0)
    rot[1:, 1:] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]  # about the plane axis
    truth = Transform.from_linear(rot, center=c, shift=np.array([2.5, -6.25, 4.75]) * depth / 128)
    n_levels = max(1, int(np.floor(np.log2(depth / 32))) + 1)
    pyr_f, pyr_m = [], []
    for k in range(n_levels):
        f = 2 ** k
        sh = tuple(s // f for s in shape)
        pyr_f.append(lazy_scene(texture, sh, magnify=magnify, factor=f, dtype=np.uint16, chunks=128))
        pyr_m.append(lazy_scene(texture, sh, magnify=magnify, factor=f, dtype=np.uint16, chunks=128,
                                transform=truth))
    input_mb = np.prod(shape) * 2 / 1e6
    t0 = time.perf_counter()
    result = register(pyr_f, pyr_m, method="intensity", transform="rigid", warp=False,
                      pixel_budget=1024)
    out = {"shape": list(shape), "input_mb": input_mb, "transform_seconds": time.perf_counter() - t0,
           "fixed_level": result.info["pyramid"]["fixed_level"],
           "refinements": result.info["pyramid"]["refinements"],
           **_tre(result.transform, truth, shape, n=5)}
    out["coarse_tre_max_px"] = _tre(Transform.from_dict(result.info["pyramid"]["coarse_transform"]),
                                    truth, shape, n=5)["tre_max_px"]
    out["rss_after_transform_mb"] = _vmhwm_mb()
    warp = level_warper(pyr_m, result.transform, chunks=128)
    target = workdir / f"vol{depth}.ome.zarr"
    t0 = time.perf_counter()
    write_ome_zarr(target, warp(shape, np.ones(3), np.zeros(3)), n_levels=n_levels,
                   make_level=warp, chunks=128)
    out["write_seconds"] = time.perf_counter() - t0
    out["write_mb_per_s"] = input_mb / out["write_seconds"]
    out["peak_rss_mb"] = _vmhwm_mb()
    out["peak_over_input"] = out["peak_rss_mb"] / input_mb
    shutil.rmtree(target, ignore_errors=True)
    return out


FAST = os.environ.get("BENCH_FAST_WARP", "1") == "1"  # OpenCV block warps (see docs)
TRANSFORM_ONLY = os.environ.get("BENCH_TRANSFORM_ONLY", "0") == "1"  # slides: skip the write
CASES = {"slide": case_slide, "throughput": case_throughput, "volume": case_volume,
         "bent": case_bent}


def _child(kind: str, size: int, workdir: str) -> None:
    import dask

    dask.config.set(scheduler="threads", num_workers=2)
    out = CASES[kind](size, Path(workdir))
    print("RESULT " + json.dumps(out))


def _run(kind: str, size: int, workdir: Path, timeout: float, src: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = (src or str(HERE.parent / "src")) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(size), str(workdir)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"kind": kind, "size": size, "error": proc.stderr.strip().splitlines()[-3:]}
    out = json.loads(lines[-1][7:])
    out.update(kind=kind, wall_seconds=time.perf_counter() - t0)
    if src:
        out["source"] = src
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, nargs="*", default=[5000, 10000, 20000])
    p.add_argument("--throughput", type=int, nargs="*", default=[4096])
    p.add_argument("--volumes", type=int, nargs="*", default=[128, 256])
    p.add_argument("--bent", type=int, nargs="*", default=[])
    p.add_argument("--out", default=str(HERE / "results" / "bigimage.json"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--transform-only", action="store_true",
                   help="slides: time the transform and its TRE, skip writing the warp")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="also run each slide case with the package from DIR (e.g. an older "
                        "commit's src, from `git archive`), interleaved, for before/after ratios")
    p.add_argument("--child", nargs=3, metavar=("KIND", "SIZE", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    results = []
    if args.transform_only:
        os.environ["BENCH_TRANSFORM_ONLY"] = "1"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for kind, sizes in (("throughput", args.throughput), ("slide", args.slides),
                            ("volume", args.volumes), ("bent", args.bent)):
            for size in sizes:
                srcs = [None] + ([args.baseline_src] if args.baseline_src and kind == "slide" else [])
                for src in srcs:
                    r = _run(kind, size, Path(tmp), args.timeout, src)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    record = {"command": "python benchmarks/bench_bigimage.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])),
        "cpus": os.cpu_count(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
