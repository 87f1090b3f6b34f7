"""NIfTI-1 files (``.nii``, ``.nii.gz``): what ITK's reader papers over, checked with nibabel first.

SimpleITK reads the voxels and the geometry (:func:`fvlm_core.io.read_image`); this module reads
the header with nibabel and refuses what ITK would silently turn into a wrong volume: a truncated
voxel block or gzip stream (zeros or garbage), zero or NaN voxel sizes (replaced by 1 mm), and NaN
or infinite voxels (made 0 HU, water). It also says which intensity scaling (``scl_slope``,
``scl_inter``) ITK applied, so that a CT-RATE metadata rescale can be applied to the stored values
instead (:mod:`fvlm_core.data.ctrate_volume`).

nibabel is imported when a NIfTI file is first checked: importing it costs about 0.25 s (it pulls
pydicom), which every importer of :mod:`fvlm_core.io` (``fvlm --help``, 3D Slicer loading the
module) would otherwise pay.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fvlm_core.errors import GeometryError, InputError

if TYPE_CHECKING:
    import nibabel as nib

#: the size of a NIfTI-1 header (its ``sizeof_hdr``)
HEADER_BYTES = 348
SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def corrupt_file(path: Path, what: str) -> InputError:
    """The error for a file that is damaged or incomplete (``what`` says how)."""
    return InputError(
        f"{path}: {what}. The file is damaged or incomplete (e.g. an interrupted download or copy): "
        "copy or export it again."
    )


def header_of(head: bytes) -> nib.Nifti1Header | None:
    """The NIfTI-1 header in the first bytes of a file, in whichever byte order its ``sizeof_hdr``
    reads 348; None for a header cut short, NIfTI-2 or not NIfTI at all."""
    import nibabel as nib

    if len(head) < HEADER_BYTES:
        return None
    header = nib.Nifti1Header(head[:HEADER_BYTES], check=False)  # byte order guessed from sizeof_hdr
    return header if int(header["sizeof_hdr"]) == HEADER_BYTES else None


def read_header(path: str | os.PathLike) -> nib.Nifti1Header | None:
    """The NIfTI-1 header of ``path`` (None when unreadable, NIfTI-2 or not NIfTI)."""
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return header_of(f.read(HEADER_BYTES))
    except (OSError, EOFError, zlib.error):
        return None


def _dims(header: nib.Nifti1Header) -> list[int] | None:
    """The header's dimensions (at least 1 each), None when ``dim[0]`` is not 1..7."""
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        return None
    return [max(d, 1) for d in dim[1 : dim[0] + 1]]


def expected_bytes(header: nib.Nifti1Header | None) -> int | None:
    """File size (header + voxels) a single-file NIfTI-1 header promises, or None if unknown."""
    if header is None or header["magic"] != b"n+1":
        return None
    bitpix, vox_offset, dims = int(header["bitpix"]), float(header["vox_offset"]), _dims(header)
    if bitpix <= 0 or not math.isfinite(vox_offset) or dims is None:
        return None
    return int(vox_offset) + int(np.prod(dims, dtype=np.int64)) * (bitpix // 8)


def check_header(path: Path, head: bytes, data_bytes: int) -> None:
    """Catch what ITK's NIfTI reader silently papers over: a truncated voxel block (it returns
    zeros/garbage) and zero or NaN voxel sizes (it replaces them with 1 mm).

    Args:
        head: the file's first (uncompressed) bytes.
        data_bytes: the (uncompressed) file size.
    """
    if len(head) < HEADER_BYTES:
        raise corrupt_file(path, f"the NIfTI header is cut short ({len(head)} of {HEADER_BYTES} bytes)")
    header = header_of(head)
    if header is None:
        return  # NIfTI-2 or not NIfTI at all: let SimpleITK decide
    expected = expected_bytes(header)  # None: not a single file, or a header that cannot say
    if expected is not None and data_bytes < expected:
        raise corrupt_file(
            path, f"it is truncated: the header describes {expected} bytes but only {data_bytes} are there"
        )
    dims = _dims(header)
    if dims is None:
        return
    axes = [i for i in range(min(len(dims), 3)) if dims[i] > 1]
    if header["sform_code"] > 0:
        srow = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(float)
        norms = np.linalg.norm(srow[:, :3], axis=0)
        if not np.all(np.isfinite(srow)) or np.any(norms[axes] <= 0):
            raise GeometryError(
                f"{path}: the NIfTI sform gives voxel sizes {norms.round(4).tolist()} (zero or NaN). "
                "Fix the header (e.g. re-export the volume) or read it with a CT-RATE metadata row."
            )
    if header["sform_code"] <= 0 or header["qform_code"] > 0:
        sizes = np.asarray(header["pixdim"][1:4], dtype=float)
        if not np.all(np.isfinite(sizes[axes])) or np.any(sizes[axes] <= 0):
            raise GeometryError(
                f"{path}: the NIfTI header gives voxel sizes {sizes.tolist()} (zero, negative or NaN). "
                "Fix the header (e.g. re-export the volume) or read it with a CT-RATE metadata row."
            )


def _gzip_isize(path: Path) -> int | None:
    """The uncompressed size (mod 2**32) that a gzip file's trailer records."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return None
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def read_gzip(path: Path) -> tuple[bytes, int]:
    """The first :data:`HEADER_BYTES` uncompressed bytes of a gzip file and its uncompressed size,
    reading the whole stream.

    Raises:
        InputError: not gzip, a stream that ends early or is corrupt.
    """
    total, head = 0, b""
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            total = len(head)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except gzip.BadGzipFile as exc:
        raise InputError(
            f"{path}: is not gzip-compressed although its name ends in .gz ({exc}); it is not an "
            "image file. Point to the CT itself (NIfTI .nii/.nii.gz, NRRD, MHA, or a DICOM folder)."
        ) from exc
    except EOFError as exc:
        raise corrupt_file(path, "the gzip stream ends early (the file is truncated)") from exc
    except (OSError, zlib.error) as exc:
        raise corrupt_file(path, f"the gzip stream is corrupt ({exc})") from exc
    return head, total


def check_file(path: Path) -> None:
    """Check a ``.nii`` / ``.nii.gz`` file before ITK reads it: a complete gzip stream, a voxel
    block as long as the header says, valid voxel sizes (:func:`check_header`)."""
    if not path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        check_header(path, head, path.stat().st_size)
        return
    # Fast path: the gzip trailer records the uncompressed size; if it equals what the header
    # promises, the stream is complete (a cut file ends in arbitrary bytes). Else scan it all.
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except (OSError, EOFError, zlib.error):
        head = b""
    expected = expected_bytes(header_of(head))
    if expected is not None and _gzip_isize(path) == expected % 2**32:
        check_header(path, head, expected)
        return
    head, total = read_gzip(path)
    check_header(path, head, total)


def first_nonfinite(path: Path) -> tuple[int, int, tuple[int, int, int] | None] | None:
    """``(count, voxels, first (z, y, x))`` of the NaN or infinite voxels of a NIfTI file (None when
    there are none). ITK's reader turns them into 0 (water), so they are found before it reads.
    Only floating-point NIfTI can hold them (integer voxels are read as they are)."""
    header = read_header(path)
    if header is not None and header.get_data_dtype().kind not in "fc":
        return None  # an integer type (most CTs: int16): no voxel to check
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if img.get_data_dtype().kind not in "fc":
            return None
        data = np.asanyarray(img.dataobj)
    except Exception:
        return None  # SimpleITK reports an unreadable file
    bad = ~np.isfinite(data)
    n = int(np.count_nonzero(bad))
    if not n:
        return None
    first = None
    if bad.ndim >= 3:  # nibabel's (i, j, k, ...) -> ITK's (z, y, x), first in the same order
        zyx = bad.reshape(*bad.shape[:3], -1).any(axis=-1).transpose(2, 1, 0)
        first = tuple(int(i) for i in np.argwhere(zyx)[0])
    return n, int(data.size), first


def applied_scaling(path: Path) -> tuple[float, float, bool]:
    """``(slope, intercept, integer)``: the intensity scaling ITK applied while reading ``path``
    (the header's ``scl_slope`` / ``scl_inter``; none when the slope is 0 or not finite, a
    non-finite intercept taken as 0) and whether the stored values are integers."""
    header = read_header(path)
    if header is None:
        return 1.0, 0.0, False
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if not math.isfinite(slope) or slope == 0.0:  # NIfTI: no scaling
        slope, inter = 1.0, 0.0
    if not math.isfinite(inter):
        inter = 0.0
    return slope, inter, header.get_data_dtype().kind in "iu"
