"""Registration in physical space for files whose axes are rotated (direction cosines).

NIfTI, MHA/MHD, NRRD and DICOM store where each voxel is in the scanner's space:
``physical = origin + D @ (index * spacing)`` (napari axis order; ``D``'s columns are the
array axes' directions). napari's world ignores ``D`` (``index * scale + translate``), so
two scans of one head taken with different orientations do not overlap there. This module
registers such files in **physical space**:

1. each file's *placement* ``P`` maps its napari world to physical space
   (``p = origin + D (w - origin)``, a rotation about the origin);
2. the moving image is brought onto the fixed grid through ``P_fixed^-1 . P_moving``
   (where the headers say it is), and registered from there;
3. the result ``T`` (moving napari world -> fixed napari world) is reported in physical
   space, ``P_fixed . T . P_moving^-1``: it maps a physical point of the moving scan to
   the physical point of the fixed scan showing the same thing.

The CLI's ``register`` uses it when either file's direction is not the identity; its
``transform.json`` then maps physical points and records both files' geometry, and its
``transform.tfm`` is what ``sitk.Resample(moving, fixed, tfm)`` needs, with the files' own
geometry.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .core.transform import Transform

__all__ = ["placement", "physical_transform", "direction_of", "register_files_physical"]

_ITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def _direction_matrix(direction, ndim: int) -> np.ndarray:
    """``D`` (columns: array axes as physical directions, napari order) from a BigImage's
    ``direction`` (rows: array axes), checked to be a rotation or reflection."""
    if direction is None:
        return np.eye(ndim)
    rows = np.asarray(direction, float)
    if rows.shape != (ndim, ndim) or not np.all(np.isfinite(rows)):
        raise ValueError(f"a {ndim}D image's direction must be {ndim}x{ndim} finite numbers; got "
                         f"{np.asarray(direction).tolist()}")
    d = rows.T
    if not np.allclose(d.T @ d, np.eye(ndim), atol=1e-4):
        raise ValueError("the file's direction cosines are not orthonormal (a sheared or scaled "
                         "orientation); resample it to an orthonormal orientation first (e.g. "
                         "with 3D Slicer or SimpleITK)")
    return d


def placement(spacing, origin, direction) -> Transform:
    """napari world (``index * spacing + origin``) -> physical space
    (``origin + D (index * spacing)``) of one file: a rotation/reflection about ``origin``."""
    origin = np.asarray(origin, float)
    ndim = origin.size
    d = _direction_matrix(direction, ndim)
    return Transform.from_linear(d, center=origin)


def physical_transform(transform: Transform, fixed_placement: Transform,
                       moving_placement: Transform) -> Transform:
    """A napari-world transform (moving -> fixed) as a physical one."""
    return moving_placement.inverse().then(transform).then(fixed_placement)


def direction_of(path):
    """The direction (rows: array axes, napari order) recorded in an ITK-format file's
    header or a DICOM series, or None for formats that have none (TIFF, PNG, OME-Zarr)."""
    from .io_big import _suffix, is_big_path, read_big, read_geometry

    path = Path(path)
    if _suffix(path) in _ITK_SUFFIXES and path.is_file():
        return read_geometry(path)["direction"]
    if path.is_dir() and is_big_path(path) and _suffix(path) not in (".zarr", ".ome.zarr"):
        try:
            return read_big(path).direction  # a DICOM series folder
        except ValueError:
            return None
    return None


def needs_physical(fixed_path, moving_path) -> bool:
    """True when either file's axes are not the scanner's (a non-identity direction)."""
    for p in (fixed_path, moving_path):
        d = direction_of(p)
        if d is not None and not np.allclose(np.asarray(d, float), np.eye(len(d)), atol=1e-9):
            return True
    return False


def register_files_physical(fixed_path, moving_path, out, *, method="fourier",
                            transform="translation", fixed_spacing=None, moving_spacing=None,
                            progress=None, **options) -> dict:
    """Register two files in physical space (see the module docstring) and write
    ``warped.nii.gz`` (on the fixed file's grid, with its orientation), ``transform.json``
    (physical, with both geometries), ``transform.tfm`` (linear), ``checkerboard.png`` and
    ``report.json`` (last). Returns the output paths and the result."""
    from . import register, save_transform
    from .core.files import write_atomic, write_text_atomic
    from .core.resample import resample
    from .io_big import read_big

    t0 = time.perf_counter()
    fixed, moving = read_big(fixed_path), read_big(moving_path)
    f_arr, m_arr = np.asarray(fixed.levels[0]), np.asarray(moving.levels[0])
    ndim = len(fixed.spacing)
    if len(moving.spacing) != ndim or fixed.rgb or moving.rgb:
        raise ValueError(f"physical-space registration needs two grey images with the same number "
                         f"of axes; got {f_arr.shape} and {m_arr.shape}")
    f_sp = tuple(fixed_spacing) if fixed_spacing else fixed.spacing
    m_sp = tuple(moving_spacing) if moving_spacing else moving.spacing
    f_or, m_or = fixed.origin, moving.origin
    p_f = placement(f_sp, f_or, fixed.direction)
    p_m = placement(m_sp, m_or, moving.direction)
    # where the headers put the moving image, in the fixed image's napari world
    start = p_m.then(p_f.inverse())
    lin = start.matrix
    geometry_only = np.allclose(lin[:ndim, :ndim], np.eye(ndim), atol=1e-9)
    if geometry_only:
        # axes agree: the headers' placement is a shift, carried by the moving origin
        m_or_reg = tuple(np.asarray(m_or, float) + lin[:ndim, ndim])
        moving_reg, m_sp_reg, pre = m_arr, m_sp, Transform.identity(ndim)
        m_or_reg = m_or_reg
    else:
        # axes differ: resample the moving image onto the fixed grid where the headers put it
        moving_reg = resample(m_arr, start, f_arr.shape, output_spacing=f_sp, output_origin=f_or,
                              input_spacing=m_sp, input_origin=m_or, preserve_dtype=False)
        m_sp_reg, m_or_reg, pre = f_sp, f_or, start
        # the voxels the moving file really covers: the zeros this resampling fills in
        # beyond its grid are not image (they pulled a 3D polish 0.2 mm off)
        if "moving_mask" not in options:
            covered = resample(np.ones(m_arr.shape, bool), start, f_arr.shape, labels=True,
                               output_spacing=f_sp, output_origin=f_or, input_spacing=m_sp,
                               input_origin=m_or)
            if not covered.all():
                options = {**options, "moving_mask": covered}
    result = register(f_arr, moving_reg, method=method, transform=transform,
                      fixed_spacing=f_sp, moving_spacing=m_sp_reg, fixed_origin=f_or,
                      moving_origin=m_or_reg, progress=progress, **{**options, "warp": False})
    if geometry_only:
        shift = Transform.from_translation(lin[:ndim, ndim])
        napari_tf = shift.then(result.transform)
    else:
        napari_tf = pre.then(result.transform)
    physical = physical_transform(napari_tf, p_f, p_m)
    warped = resample(m_arr, napari_tf, f_arr.shape, output_spacing=f_sp, output_origin=f_or,
                      input_spacing=m_sp, input_origin=m_or)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)
    geo = {"fixed": {"file": str(fixed_path), **fixed.geometry(), "spacing": list(f_sp)},
           "moving": {"file": str(moving_path), **moving.geometry(), "spacing": list(m_sp)}}
    paths = {}
    paths["warped"] = str(write_atomic(out / "warped.nii.gz",
                                       lambda tmp: _write_oriented(tmp, warped, f_sp, f_or,
                                                                   fixed.direction)))
    doc = {**physical.to_dict(), "space": "physical",
           "convention": ("maps moving PHYSICAL points -> fixed PHYSICAL points (scanner space "
                          "from the files' spacing, origin and direction; napari axis order)"),
           "geometry": geo}
    paths["transform"] = str(write_text_atomic(out / "transform.json", json.dumps(doc, indent=1)))
    if physical.is_linear and not physical.is_projective:
        paths["transform_itk"] = str(save_transform(physical, out / "transform.tfm"))
    from .core.qc import checkerboard
    from .io import write_image

    board = checkerboard(np.asarray(f_arr, np.float32), np.asarray(warped, np.float32), spacing=f_sp)
    if board.ndim == 3:
        board = board[board.shape[0] // 2]
    paths["checkerboard"] = str(write_image(out / "checkerboard.png", (board * 255).astype(np.uint8)))
    report = result.to_dict()
    report["transform"] = physical.to_dict()
    report["transform_napari_world"] = napari_tf.to_dict()
    report["space"] = "physical"
    report["fixed"] = {**report.get("fixed", {}), "geometry": geo["fixed"]}
    report["moving"] = {**report.get("moving", {}), "geometry": geo["moving"]}
    report["headers_start"] = start.to_dict()
    report["outputs"] = dict(paths)
    # batch trusts a finished item only when every output is there with this size
    report["output_bytes"] = {k: Path(v).stat().st_size for k, v in paths.items()}
    report["seconds_total"] = time.perf_counter() - t0
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    paths["report"] = str(out / "report.json")
    return {"paths": paths, "result": result, "transform": physical,
            "napari_transform": napari_tf}


def _write_oriented(path, array, spacing, origin, direction):
    import SimpleITK as sitk

    from .core.itk import to_sitk_image

    image = to_sitk_image(np.asarray(array), spacing, origin)
    ndim = len(spacing)
    d = _direction_matrix(direction, ndim)  # napari order, columns = array axes
    # ITK order (x, y, z): reverse rows and columns
    image.SetDirection(tuple(d[::-1, ::-1].ravel()))
    sitk.WriteImage(image, str(path))


def cli_register(args) -> int:
    """The CLI's ``register`` for files with rotated axes (called by ``cli.cmd_register``)."""
    from .cli import _parse_options, _progress_printer, _summary

    options = _parse_options(args.option)
    if args.equalize:
        options["equalize"] = args.equalize
    if args.pixel_budget is not None:
        options["pixel_budget"] = args.pixel_budget
    done = register_files_physical(
        args.fixed, args.moving, Path(args.out), method=args.method, transform=args.transform,
        fixed_spacing=args.fixed_spacing, moving_spacing=args.moving_spacing,
        progress=_progress_printer(not args.quiet), **options)
    print(_summary(done["result"]))
    print("  registered in physical space (the files' direction cosines applied)")
    for key, path in done["paths"].items():
        print(f"  {key}: {path}")
    return 0
