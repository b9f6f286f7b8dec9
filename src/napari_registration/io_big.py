"""Big images on disk: OME-Zarr, pyramidal OME-TIFF, DICOM series, and the geometry
(spacing, origin, orientation) of NIfTI/MHA/NRRD files.

Readers return a :class:`BigImage`: the pyramid levels as lazy dask arrays (napari axis
order, colour last), level-0 spacing and origin, and the file's orientation. Nothing is
read until a block is asked for. Files are checked (dimensions, dtype, sizes) before a
native library decodes pixels, and problems come back as ``ValueError`` saying what to do.

Writers are atomic: OME-Zarr is written into ``name.tmp/`` and renamed into place when
every block is in; a crashed write resumes where it stopped (a block is marked done
only after it is written, so finished blocks are not recomputed). The OME-NGFF metadata
(multiscales, axes, coordinateTransformations) comes from ``ngff-zarr``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["BigImage", "read_big", "read_ome_zarr", "write_ome_zarr", "read_ome_tiff",
           "write_ome_tiff", "read_dicom_series", "read_geometry", "is_big_path", "label_levels"]

MAX_SIDE = 1 << 31  # larger axes are certainly a corrupt header
_MARKER = ".napari-registration-write.json"
_DONE = ".done"


@dataclass
class BigImage:
    """A (possibly pyramidal) image read lazily from disk.

    ``levels``: dask arrays, fine -> coarse, napari axis order, colour last when ``rgb``;
    ``spacing``/``origin``: level 0 (napari ``scale``/``translate``); ``direction``: the
    file's orientation (rows: array axes in napari order, as world direction cosines),
    identity when the file has none; ``meta``: what else the file said."""

    levels: list
    spacing: tuple
    origin: tuple
    rgb: bool = False
    direction: list | None = None
    meta: dict = field(default_factory=dict)

    @property
    def data(self):
        """Level 0, or the list of levels when there are several (what register() takes)."""
        return self.levels if len(self.levels) > 1 else self.levels[0]

    def geometry(self) -> dict:
        """JSON-safe geometry, for reports and transform files."""
        return {"shape": list(self.levels[0].shape), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": self.direction, "rgb": self.rgb,
                "levels": [list(a.shape) for a in self.levels], **self.meta}


def _suffix(path: Path) -> str:
    name = path.name.lower().rstrip("/")
    for s in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_big_path(path) -> bool:
    """Paths that :func:`read_big` handles and ``io.read_image`` does not."""
    path = Path(path)
    return (_suffix(path) in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif")
            or (path.is_dir() and not (path / "zarr.json").exists() and not (path / ".zattrs").exists()
                and not (path / ".zgroup").exists()))


def _check_array(name, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise ValueError(f"{name} has dtype {dtype}; registration needs a real numeric image")
    if any(int(n) < 1 for n in shape):
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")
    if any(int(n) >= MAX_SIDE for n in shape):
        raise ValueError(f"{name} claims shape {tuple(shape)}: an axis that large is a damaged "
                         "header, not an image")


# ------------------------------------------------------------------------------ reading
def read_big(path, *, channel: int | None = None) -> BigImage:
    """Read OME-Zarr, (pyramidal) OME-TIFF / TIFF, a DICOM series folder, or any file
    ``io.read_image`` reads (as one level, with its orientation for ITK formats)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    suffix = _suffix(path)
    if path.is_dir() and ((path / "zarr.json").exists() or (path / ".zattrs").exists()
                          or suffix in (".zarr", ".ome.zarr")):
        return read_ome_zarr(path, channel=channel)
    if path.is_dir():
        return read_dicom_series(path)
    if suffix in (".tif", ".tiff", ".ome.tif", ".ome.tiff"):
        return read_ome_tiff(path)
    import dask.array as da

    from .io import read_image

    array, spacing, origin = read_image(path)
    geo = read_geometry(path) if suffix in (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr") else {}
    ndim = array.ndim - (1 if array.ndim == 3 and array.shape[-1] in (3, 4) and suffix in
                         (".png", ".jpg", ".jpeg", ".bmp") else 0)
    return BigImage([da.from_array(array, chunks=array.shape)],
                    tuple(spacing or (1.0,) * ndim), tuple(origin or (0.0,) * ndim),
                    rgb=ndim < array.ndim, direction=geo.get("direction"), meta=geo.get("meta", {}))


def read_ome_zarr(path, *, channel: int | None = None) -> BigImage:
    """OME-Zarr (NGFF 0.4/0.5) multiscale image via ngff-zarr: every level as a dask array
    with its scale and translation. A channel axis of 3/4 on a 2D image becomes RGB
    (last axis); otherwise pass ``channel`` to pick one. A time axis is not supported."""
    import ngff_zarr as nz

    path = Path(path)
    try:
        ms = nz.from_ome_zarr(str(path))
    except Exception as err:  # ngff-zarr/zarr raise many kinds for foreign folders
        first = str(err).strip().splitlines()
        raise ValueError(f"cannot read OME-Zarr {path}: {first[-1] if first else type(err).__name__} "
                         "(expected an OME-NGFF multiscales group, e.g. written by "
                         "napari-registration, ngff-zarr, ome-zarr or bioformats2raw)") from None
    images = list(ms.images)
    if not images:
        raise ValueError(f"OME-Zarr {path} has no levels")
    dims = tuple(images[0].dims)
    if "t" in dims:
        raise ValueError(f"OME-Zarr {path} has a time axis {dims}: register one time point "
                         "(or use register_stack)")
    spatial = [d for d in dims if d in ("z", "y", "x")]
    if len(spatial) not in (2, 3) or any(d not in ("c", "z", "y", "x") for d in dims):
        raise ValueError(f"OME-Zarr {path} has axes {dims}; need 2 or 3 spatial axes (z, y, x) "
                         "and at most a channel axis")
    levels, rgb = [], False
    for k, im in enumerate(images):
        a = im.data
        _check_array(f"OME-Zarr {path} level {k}", a.shape, a.dtype)
        if "c" in dims:
            ci = dims.index("c")
            nc = a.shape[ci]
            if channel is not None:
                if not 0 <= int(channel) < nc:
                    raise ValueError(f"channel {channel} is not in 0..{nc - 1} for {path}")
                a = a[(slice(None),) * ci + (int(channel),)]
            elif nc == 1:
                a = a[(slice(None),) * ci + (0,)]
            elif nc in (3, 4) and len(spatial) == 2:
                a = da_moveaxis(a, ci, -1)
                rgb = True
            else:
                raise ValueError(f"OME-Zarr {path} has {nc} channels: pass channel=N (CLI: "
                                 "--channel N) to register one of them")
        levels.append(a)
    sp = tuple(float(images[0].scale.get(d, 1.0)) for d in spatial)
    org = tuple(float(images[0].translation.get(d, 0.0)) for d in spatial)
    if not all(np.isfinite(sp)) or min(sp) <= 0 or not all(np.isfinite(org)):
        raise ValueError(f"OME-Zarr {path} has a bad scale {sp} or translation {org}")
    meta = {"format": "ome-zarr", "axes": list(dims),
            "level_scales": [[float(im.scale.get(d, 1.0)) for d in spatial] for im in images],
            "level_translations": [[float(im.translation.get(d, 0.0)) for d in spatial] for im in images]}
    units = getattr(images[0], "axes_units", None)
    units = {str(k): str(v) for k, v in dict(units or {}).items() if v is not None}
    if units:
        meta["units"] = units
    return BigImage(levels, sp, org, rgb=rgb, meta=meta)


def da_moveaxis(a, source, dest):
    import dask.array as da

    return da.moveaxis(a, source, dest)


_OPEN_TIFFS: list = []  # TiffFiles whose levels are read lazily stay open


def read_ome_tiff(path) -> BigImage:
    """A TIFF's first series with all its pyramid levels (OME-TIFF SubIFDs, SVS, NDPI ...),
    each a dask array over tifffile's zarr view (tiles are read on demand). Spacing from
    the OME metadata (PhysicalSize*) or ImageJ resolution tags."""
    import dask.array as da
    import tifffile
    import zarr

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:
        raise ValueError(f"cannot read TIFF {path}: {str(err).strip().splitlines()[-1:] or err}") from None
    try:
        series = tif.series[0]
        axes = series.axes.upper()
        _check_array(f"TIFF {path}", series.shape, series.dtype)
        keep = [i for i, ax in enumerate(axes) if ax in "ZYXS" or (ax == "C" and series.shape[i] in (3, 4))]
        drop = [i for i, ax in enumerate(axes) if i not in keep]
        if any(series.shape[i] != 1 for i in drop):
            raise ValueError(f"TIFF {path} has axes {axes} {series.shape}: only Z, Y, X and colour "
                             "samples are supported; save one channel/time point per file")
        spatial = [ax for i, ax in enumerate(axes) if i in keep and ax in "ZYX"]
        rgb = any(ax in "SC" for i, ax in enumerate(axes) if i in keep)
        if len(spatial) not in (2, 3):
            raise ValueError(f"TIFF {path} has axes {axes}; need 2 or 3 spatial axes")
        levels = []
        for k in range(len(series.levels)):
            z = zarr.open_array(series.aszarr(level=k), mode="r")
            a = da.from_zarr(z)
            a = a[tuple(0 if i in drop else slice(None) for i in range(a.ndim))]
            kept_axes = [ax for i, ax in enumerate(axes) if i in keep]
            if rgb and kept_axes[-1] not in "SC":
                a = da.moveaxis(a, [i for i, ax in enumerate(kept_axes) if ax in "SC"][0], -1)
            levels.append(a)
        spacing = _tiff_spacing(tif, spatial)
    except ValueError:
        tif.close()
        raise
    except Exception as err:
        tif.close()
        raise ValueError(f"cannot read TIFF {path}: {str(err).strip().splitlines()[-1:] or err}") from None
    _OPEN_TIFFS.append(tif)
    return BigImage(levels, spacing, (0.0,) * len(spatial), rgb=rgb,
                    meta={"format": "tiff", "axes": axes, "ome": bool(tif.is_ome)})


def _tiff_spacing(tif, spatial) -> tuple:
    sp = {ax: 1.0 for ax in spatial}
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            for ax in spatial:
                v = pixels.get(f"PhysicalSize{ax}")
                if v is not None and float(v) > 0 and np.isfinite(float(v)):
                    sp[ax] = float(v)
        except (ET.ParseError, StopIteration, ValueError):
            pass
    elif tif.is_imagej:
        page = tif.pages[0]
        for ax, tag in (("X", "XResolution"), ("Y", "YResolution")):
            t = page.tags.get(tag)
            if t is not None and t.value[0] > 0:
                sp[ax] = t.value[1] / t.value[0]
        if "Z" in sp and (tif.imagej_metadata or {}).get("spacing"):
            sp["Z"] = float(tif.imagej_metadata["spacing"])
    return tuple(sp[ax] for ax in spatial)


def read_dicom_series(path) -> BigImage:
    """A folder holding one DICOM series (the largest if several), via SimpleITK's
    ImageSeriesReader; spacing, origin and orientation from the headers."""
    import dask.array as da
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder of DICOM files")
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(path))
    if not ids:
        raise ValueError(f"no DICOM series found in {path} (expected .dcm files of one scan); "
                         "for other formats pass the file itself")
    files = max((reader.GetGDCMSeriesFileNames(str(path), i) for i in ids), key=len)
    try:
        # headers first: sizes and pixel type before decoding any pixels
        head = sitk.ImageFileReader()
        head.SetFileName(files[0])
        head.ReadImageInformation()
        size = head.GetSize()
        _check_array(f"DICOM series {path}", tuple(size) + (len(files),), np.uint16)
        reader.SetFileNames(files)
        img = reader.Execute()
    except RuntimeError as err:
        raise ValueError(f"cannot read DICOM series {path}: {str(err).strip().splitlines()[-1]}") from None
    array = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"DICOM series {path} has colour pixels; convert it to grey first")
    geo = _itk_geometry(img)
    return BigImage([da.from_array(array, chunks=array.shape)], geo["spacing"], geo["origin"],
                    direction=geo["direction"],
                    meta={"format": "dicom", "files": len(files), "series": len(ids)})


def _itk_geometry(img) -> dict:
    d = img.GetDimension()
    direction = np.array(img.GetDirection(), float).reshape(d, d)
    # ITK: columns = index axes (x, y, z), rows = physical axes (x, y, z); napari order
    # reverses both
    napari_dir = direction[::-1, ::-1].T  # rows: array axes (napari order)
    return {"spacing": tuple(float(v) for v in img.GetSpacing()[::-1]),
            "origin": tuple(float(v) for v in img.GetOrigin()[::-1]),
            "direction": napari_dir.round(12).tolist()}


def read_geometry(path) -> dict:
    """Spacing, origin and orientation (direction cosines) of a NIfTI/MHA/NRRD file, from
    its header only (no pixels read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ValueError(f"cannot read the header of {path}: {str(err).strip().splitlines()[-1]}") from None
    d = reader.GetDimension()
    direction = np.array(reader.GetDirection(), float).reshape(d, d)
    return {"spacing": list(reader.GetSpacing()[::-1]), "origin": list(reader.GetOrigin()[::-1]),
            "direction": direction[::-1, ::-1].T.round(12).tolist(),
            "meta": {"format": _suffix(Path(path)).lstrip("."),
                     # axes not along the scanner's (a rotation, not a permutation/flip)
                     "oblique": bool(not np.allclose(np.abs(direction).round(), np.abs(direction))),
                     "identity_direction": bool(np.allclose(direction, np.eye(d)))}}


# ------------------------------------------------------------------------------ writing
def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_ome_zarr(path, data, *, spacing=None, origin=None, rgb: bool = False,
                   n_levels: int | None = None, chunks=None,
                   make_level: Callable | None = None, client=None, resume: bool = True,
                   progress: Callable | None = None, labels: bool = False) -> Path:
    """Write a multiscale OME-Zarr (NGFF 0.5, metadata by ngff-zarr), block by block.

    Parameters
    ----------
    data : array or list of arrays
        Level 0 (numpy or dask; colour last when ``rgb``), or levels fine -> coarse.
    spacing, origin : level 0's napari ``scale`` and ``translate``.
    n_levels : int
        Levels to write (2x each); default: the given levels, or until a side < 512.
    chunks : int or tuple
        Chunk shape of every level (spatial); default 1024 (2D) / 128 (3D).
    make_level : callable(shape, spacing, origin) -> dask array, optional
        Builds a level directly on its grid (e.g. a lazy warp from the moving pyramid)
        instead of downsampling level 0: no level reads the one above it.
    client : dask.distributed.Client, optional
        Run the block writes on this cluster (same tasks as locally).
    resume : bool
        Continue a crashed write into ``path.tmp/``: blocks already marked done are not
        recomputed.
    labels : bool
        ``data`` is a label image (integer ids): coarser levels built here are the mode of
        each 2x2 (2x2x2) block of the level above (:func:`label_levels`), never averages,
        so no level holds an id that is not in level 0.

    The store is built in ``path.tmp/`` and renamed to ``path`` when complete.
    """
    import dask
    import dask.array as da
    import ngff_zarr as nz

    path = Path(path)
    tmp = _tmp_path(path)
    given = list(data) if isinstance(data, (list, tuple)) else [data]
    base = given[0]
    if not hasattr(base, "shape"):
        raise ValueError(f"data must be an array or a list of arrays; got {type(base).__name__}")
    ndim = base.ndim - (1 if rgb else 0)
    if ndim not in (2, 3):
        raise ValueError(f"write_ome_zarr writes 2D or 3D images (plus colour); got shape {base.shape}")
    _check_array("image", base.shape, base.dtype)
    _check_labels(labels, base, rgb)
    from .core.resample import _geometry

    sp = _geometry(spacing, ndim, 1.0, "spacing")
    org = _geometry(origin, ndim, 0.0, "origin")
    spatial_shape = tuple(base.shape[:ndim])
    if n_levels is None:
        n_levels = len(given) if len(given) > 1 else 1 + max(
            0, int(np.floor(np.log2(max(min(spatial_shape), 1) / 512))) + 1
            if min(spatial_shape) >= 1024 else 0)
    n_levels = max(1, int(n_levels))
    side = 1024 if ndim == 2 else 128
    block = tuple(int(c) for c in np.broadcast_to(np.asarray(chunks or side).ravel(), (ndim,)))
    dims = ("z", "y", "x")[-ndim:]
    base_d = base if hasattr(base, "dask") else da.from_array(np.asarray(base),
                                                              chunks=block + ((base.shape[-1],) if rgb else ()))
    img = nz.to_ngff_image(base_d, dims=dims + (("c",) if rgb else ()),
                           scale=dict(zip(dims, map(float, sp))),
                           translation=dict(zip(dims, map(float, org))))
    chunk_map = dict(zip(dims, block))
    if rgb:
        chunk_map["c"] = base.shape[-1]
    ms = nz.to_multiscales(img, scale_factors=[2 ** k for k in range(1, n_levels)],
                           chunks=chunk_map, method=nz.Methods.ITKWASM_BIN_SHRINK, cache=False)
    if len(ms.images) != n_levels:
        n_levels = len(ms.images)
    plan = {"shapes": [list(im.data.shape) for im in ms.images], "dtype": str(base.dtype),
            "dims": list(ms.images[0].dims)}

    if tmp.exists() and resume and _same_plan(tmp, plan):
        pass  # carry on: finished blocks are marked in tmp/.done
    else:
        if tmp.exists():
            shutil.rmtree(tmp)
        nz.to_ome_zarr(str(tmp), ms, metadata_only=True)
        (tmp / _MARKER).write_text(json.dumps(plan), encoding="utf-8")
    datasets = [ds.path for ds in ms.metadata.datasets]
    modes = label_levels(base_d, len(ms.images)) if labels and make_level is None else None

    tasks = []
    total = written = 0
    for k, im in enumerate(ms.images):
        shape_k = tuple(im.data.shape[-ndim:]) if not rgb else tuple(im.data.shape[1:])
        sp_k = np.array([im.scale[d] for d in dims])
        or_k = np.array([im.translation[d] for d in dims])
        if make_level is not None:
            src = make_level(shape_k, sp_k, or_k)
        elif k < len(given) and tuple(given[k].shape[:ndim]) == shape_k:
            src = given[k] if hasattr(given[k], "dask") else da.from_array(np.asarray(given[k]))
        elif modes is not None:
            # labels: mode of 2x blocks of the level above; a level the metadata makes
            # larger than that (odd sides) is padded by repeating the edge
            src = modes[k][tuple(slice(0, n) for n in shape_k)]
            pad = [(0, n - m) for n, m in zip(shape_k, src.shape)]
            if any(p[1] for p in pad):
                src = da.pad(src, pad, mode="edge")
        elif k > 0 and tuple(np.array(spatial_shape) // 2 ** k) == shape_k:
            # block averages of level 0: pixel centres where the metadata puts them
            f = 2 ** k
            src = da.coarsen(np.mean, base_d.astype(np.float32), {a: f for a in range(ndim)},
                             trim_excess=True)
            if np.issubdtype(base.dtype, np.integer):
                src = da.round(src)
        else:
            src = im.data
            if rgb:
                src = da.moveaxis(src, 0, -1)
        if tuple(src.shape[:ndim]) != shape_k:
            raise ValueError(f"level {k} has shape {src.shape}, the OME-Zarr metadata {shape_k}")
        src = src.astype(base.dtype)
        if rgb:  # OME-NGFF order: channel first
            src = da.moveaxis(src, -1, 0)
            target_chunks = (base.shape[-1],) + block
        else:
            target_chunks = block
        src = src.rechunk(target_chunks)
        done_dir = tmp / _DONE / str(k)
        done_dir.mkdir(parents=True, exist_ok=True)
        done = set(os.listdir(done_dir))
        arr_path = str(tmp / datasets[k])
        # one write task per block, on the block's own key (no per-block dask arrays:
        # dask would fuse and recompute source chunks that neighbouring blocks share);
        # blocks marked done get no task, and culling drops what only they needed
        name = f"write-ome-zarr-{k}-{dask.base.tokenize(src.name, arr_path)}"
        dsk = {}
        for idx in np.ndindex(*src.numblocks):
            total += 1
            key = ".".join(map(str, idx))
            if key in done:
                continue
            region = tuple(slice(sum(c[:i]), sum(c[:i + 1])) for c, i in zip(src.chunks, idx))
            dsk[(name, *idx)] = (_write_block, (src.name, *idx), arr_path, region,
                                 str(done_dir / key))
        if dsk:
            from dask.delayed import Delayed
            from dask.highlevelgraph import HighLevelGraph

            keys = list(dsk)
            dsk[name] = (len, keys)
            graph = HighLevelGraph.from_collections(name, dsk, dependencies=[src])
            tasks.append(Delayed(name, graph))
            written += len(keys)
    if progress is not None:
        progress(0.0, f"writing {written} of {total} blocks")
    if tasks:
        if client is not None:
            client.gather(client.compute(tasks))
        else:
            dask.compute(*tasks)
    shutil.rmtree(tmp / _DONE, ignore_errors=True)
    (tmp / _MARKER).unlink(missing_ok=True)
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def _check_labels(labels, base, rgb) -> None:
    if not labels:
        return
    if rgb:
        raise ValueError("labels=True is for label images (one integer id per pixel), not RGB")
    if np.dtype(base.dtype).kind not in "biu":
        raise ValueError(f"labels=True needs an integer (or bool) label image; got dtype "
                         f"{base.dtype} (pass labels=False for intensities)")


def _block_mode(a, axis=None):
    """Reduction for ``dask.array.coarsen``: the most frequent value of each block (ties:
    the first in the block, i.e. its top-left pixel), so only existing values appear."""
    if axis is None:  # dask probes the output type
        return a
    axis = tuple(int(x) for x in np.atleast_1d(axis))
    keep = [i for i in range(a.ndim) if i not in axis]
    v = np.transpose(a, keep + list(axis))
    v = v.reshape(v.shape[:len(keep)] + (-1,))
    counts = np.empty(v.shape, np.int32)
    for i in range(v.shape[-1]):
        counts[..., i] = np.count_nonzero(v == v[..., i:i + 1], axis=-1)
    pick = counts.argmax(axis=-1)  # the first of the most frequent
    return np.take_along_axis(v, pick[..., None], axis=-1)[..., 0]


def label_levels(labels, n_levels: int) -> list:
    """A label image's pyramid, lazily: level ``k`` is the mode of each 2x2 (2x2x2) block
    of level ``k - 1`` (odd edges trimmed), the dtype kept, so every id in a coarser level
    is an id of level 0 (averaging would invent ids between neighbours)."""
    import dask.array as da

    base = labels if hasattr(labels, "dask") else da.from_array(np.asarray(labels))
    if np.dtype(base.dtype).kind not in "biu":
        raise ValueError(f"label_levels needs an integer (or bool) label image; got {base.dtype}")
    levels = [base]
    for _ in range(1, int(n_levels)):
        prev = levels[-1]
        if min(prev.shape) < 2:
            break
        levels.append(da.coarsen(_block_mode, prev, {a: 2 for a in range(prev.ndim)},
                                 trim_excess=True).astype(base.dtype))
    return levels


def _same_plan(tmp: Path, plan: dict) -> bool:
    try:
        return json.loads((tmp / _MARKER).read_text(encoding="utf-8")) == plan
    except (OSError, ValueError):
        return False


def _write_block(block, arr_path, region, marker):
    """Write one block into the zarr array, then mark it done (a crash between the two
    only costs this block again)."""
    import zarr

    arr = zarr.open_array(arr_path, mode="r+")
    arr[region] = np.asarray(block)
    Path(marker).touch()
    return 1


def write_ome_tiff(path, levels, *, spacing=None, rgb: bool = False, tile: int = 512,
                   labels: bool = False, n_levels: int | None = None) -> Path:
    """A pyramidal OME-TIFF (levels as SubIFDs), written tile by tile from (dask) levels,
    to ``path.tmp`` first. ``labels=True`` with ``n_levels`` (and one level given): the
    coarser levels are modes of 2x2 blocks (:func:`label_levels`), never averages."""
    import tifffile

    path = Path(path)
    levels = list(levels) if isinstance(levels, (list, tuple)) else [levels]
    base = levels[0]
    ndim = base.ndim - (1 if rgb else 0)
    if ndim != 2:
        raise ValueError("write_ome_tiff writes 2D images (optionally RGB); use OME-Zarr for volumes")
    _check_array("image", base.shape, base.dtype)
    _check_labels(labels, base, rgb)
    if n_levels is not None and int(n_levels) > len(levels):
        if len(levels) != 1:
            raise ValueError("n_levels builds coarser levels from level 0: give one level, "
                             "or all of them")
        if labels:
            levels = label_levels(base, int(n_levels))
        else:
            import dask.array as da

            src = base if hasattr(base, "dask") else da.from_array(np.asarray(base))
            for k in range(1, int(n_levels)):
                mean = da.coarsen(np.mean, src.astype(np.float32), {0: 2 ** k, 1: 2 ** k},
                                  trim_excess=True)
                if np.issubdtype(base.dtype, np.integer):
                    mean = da.round(mean)
                levels.append(mean.astype(base.dtype))
    sp = (1.0, 1.0) if spacing is None else tuple(float(v) for v in np.broadcast_to(spacing, (2,)))
    tmp = path.with_name(path.name + ".tmp")

    def tiles(a):
        for i in range(0, a.shape[0], tile):
            row = np.asarray(a[i:i + tile])
            for j in range(0, a.shape[1], tile):
                yield row[:, j:j + tile]

    meta = {"axes": "YXS" if rgb else "YX", "PhysicalSizeY": sp[0], "PhysicalSizeX": sp[1]}
    extra = {"photometric": "rgb"} if rgb else {"photometric": "minisblack"}
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(tiles(base), shape=base.shape, dtype=base.dtype, tile=(tile, tile),
                 subifds=len(levels) - 1, metadata=meta, compression="zlib", **extra)
        for lev in levels[1:]:
            tw.write(tiles(lev), shape=lev.shape, dtype=lev.dtype, tile=(tile, tile),
                     subfiletype=1, compression="zlib", **extra)
    os.replace(tmp, path)
    return path
