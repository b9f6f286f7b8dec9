"""Reading and writing images with their spacing (napari scale) for the command line.

TIFF via tifffile (ImageJ spacing when present), PNG/JPEG via imageio, NIfTI/MHA/NRRD via
SimpleITK (spacing and origin from the header, converted to napari axis order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .core.files import write_atomic

ITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path) -> tuple[np.ndarray, tuple | None, tuple | None]:
    """Return ``(array, spacing or None, origin or None)`` in napari axis order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    suffix = _suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                array = tif.asarray()
                spacing = None
                ij = tif.imagej_metadata or {}
                page = tif.pages[0]
                res = page.tags.get("XResolution"), page.tags.get("YResolution")
                if all(r is not None for r in res) and ij:
                    x = res[0].value[1] / res[0].value[0]
                    y = res[1].value[1] / res[1].value[0]
                    spacing = (y, x)
                    if "spacing" in ij and array.ndim == 3:
                        spacing = (float(ij["spacing"]), y, x)
            return array, spacing, None
        if suffix in PLAIN_SUFFIXES:
            import imageio.v3 as iio

            return np.asarray(iio.imread(path)), None, None
        if suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            if suffix in (".nii", ".nii.gz"):
                check_nifti_header(path)
            else:
                check_data_file_reference(path)
            img = sitk.ReadImage(str(path))
            return (sitk.GetArrayFromImage(img), tuple(img.GetSpacing())[::-1],
                    tuple(img.GetOrigin())[::-1])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, EOFError, TypeError) as err:
        # the readers (tifffile, imageio, SimpleITK) report damaged or foreign files with
        # any of these; the user needs the file name and the reader's last line
        first = str(err).strip().splitlines()
        raise ValueError(f"cannot read image {path}: {first[-1] if first else type(err).__name__}") from None
    raise ValueError(
        f"unsupported image type {suffix!r} for {path}; use TIFF, PNG/JPEG, NIfTI (.nii/.nii.gz), "
        "MHA/MHD or NRRD"
    )


def check_nifti_header(path: Path) -> None:
    """Refuse a NIfTI-1/2 header whose voxel sizes (pixdim) are zero, negative or not
    finite for the image's axes: ITK would silently read them as 1.0."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
    if len(head) < 348:
        raise ValueError(f"cannot read image {path}: the NIfTI header is truncated "
                         f"({len(head)} of 348 bytes)")
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            break
        if size == 540 and len(head) >= 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            break
    else:
        raise ValueError(f"cannot read image {path}: not a NIfTI header (sizeof_hdr is not "
                         "348 or 540)")
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"cannot read image {path}: the NIfTI header claims {ndim} dimensions")
    sizes = [float(v) for v in pixdim[1:1 + min(ndim, 3)]]
    if not all(np.isfinite(v) and v > 0 for v in sizes):
        raise ValueError(f"{path}: the NIfTI header gives voxel sizes {sizes}; they must be "
                         "positive (fix the header's pixdim, e.g. with nibabel or 3D Slicer, "
                         "or save the image with its real voxel size)")


def check_data_file_reference(path: Path) -> None:
    """MetaImage (``ElementDataFile``) and NRRD (``data file``) headers may name another
    file holding the voxels; from an untrusted header that must stay beside it (no
    absolute path, no '..'), or any local file of the right size would be read."""
    import re

    with open(path, "rb") as fh:
        head = fh.read(65536).decode("latin-1")
    header = head.split("\n\n", 1)[0] if path.suffix.lower() in (".nrrd", ".nhdr") else head
    pattern = r"^\s*(?:ElementDataFile\s*=|data ?file\s*:)\s*(.+?)\s*$"
    for match in re.finditer(pattern, header, re.M | re.I):
        ref = match.group(1).strip()
        if ref.upper() in ("LOCAL", "LIST") or ref.upper().startswith("LIST"):
            continue
        for name in ref.split()[:1] if "%" in ref else [ref]:
            target = Path(name)
            if target.is_absolute() or ".." in target.parts or name.startswith(("/", "\\")):
                raise ValueError(f"{path}: its header names the data file {name[:80]!r} outside "
                                 "its own folder; refused (keep the data file beside the header)")




def write_image(path, array, spacing=None, origin=None) -> Path:
    path = Path(path)
    suffix = _suffix(path)
    array = np.asarray(array)
    if suffix in TIFF_SUFFIXES:
        import tifffile

        return write_atomic(path, lambda tmp: tifffile.imwrite(tmp, array))
    elif suffix in ITK_SUFFIXES:
        from .core.itk import to_sitk_image
        import SimpleITK as sitk

        image = to_sitk_image(array, spacing, origin)
        return write_atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp)))
    elif suffix in PLAIN_SUFFIXES:
        import imageio.v3 as iio

        a = array
        if a.dtype != np.uint8:
            from .core.metrics import robust_normalize

            a = (robust_normalize(a, low=0, high=100) * 255).astype(np.uint8)
        return write_atomic(path, lambda tmp: iio.imwrite(tmp, a, extension=suffix))
    else:
        raise ValueError(f"unsupported output type {suffix!r}; use .tif, .nii.gz, .mha or .png")
