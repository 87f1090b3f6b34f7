"""Reading and writing CT volumes and label maps with their full geometry.

Conventions used across the project:

* Arrays are numpy arrays in SimpleITK order ``(z, y, x)`` (slowest to fastest axis).
* :class:`Geometry` holds the ITK description of the grid: ``size`` ``(X, Y, Z)``, ``spacing``
  ``(sx, sy, sz)`` in mm, ``origin`` and ``direction`` in LPS patient coordinates (DICOM / ITK).
* ``Geometry.affine_ras`` is the voxel-to-RAS affine with the index ordered ``(i, j, k)`` =
  ``(x, y, z)``, exactly 3D Slicer's ``IJKToRAS`` and nibabel's ``affine``.

No axis is ever flipped or permuted silently: the array is the file's voxel order and the
geometry says where each voxel is.

Voxels that are not numbers (NaN) or infinite are refused by every reader (NIfTI, NRRD, MHA,
DICOM, label maps) and by :func:`ct_from_array` (the 3D Slicer path), with the count and where
they are: a CT holds a number in every voxel, and any value put in their place (ITK's NIfTI
reader silently makes them 0 HU, water) would change what the model sees.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fvlm_core.atomic import atomic_path
from fvlm_core.errors import GeometryError, InputError, warn

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: File suffixes read as single image files (anything else that is a folder is tried as DICOM).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a 3D grid are in patient space (ITK / LPS convention).

    Attributes:
        size: number of voxels ``(X, Y, Z)`` (ITK order; the array shape is reversed).
        spacing: voxel size in mm ``(sx, sy, sz)``.
        origin: LPS position in mm of the centre of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines, row-major, columns are the x, y, z axis directions in LPS.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_affine_ras(cls, affine: np.ndarray, shape_zyx: tuple[int, int, int]) -> Geometry:
        """Build a geometry from a voxel(ijk)-to-RAS affine (nibabel / Slicer convention)."""
        affine = np.asarray(affine, dtype=float)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        m = lps[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise GeometryError(f"affine has zero or invalid voxel size {spacing.tolist()}")
        direction = m / spacing
        return cls(
            size=(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in lps[:3, 3]),
            direction=tuple(float(d) for d in direction.reshape(-1)),
        )

    # --- views ----------------------------------------------------------------------------
    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Shape of the numpy array holding this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 voxel ``(i, j, k, 1)`` (i = x index) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 voxel ``(i, j, k, 1)`` (i = x index) to RAS mm: Slicer's IJKToRAS, nibabel's affine."""
        a = self.affine_lps
        a[:3, :] = LPS_TO_RAS @ a[:3, :]
        return a

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_zyx_to_ras(self, index_zyx: Any) -> np.ndarray:
        """RAS position (mm) of array index ``(z, y, x)`` (works on ``(..., 3)`` arrays)."""
        idx = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return idx @ self.affine_ras[:3, :3].T + self.affine_ras[:3, 3]

    def ras_to_index_zyx(self, ras: Any) -> np.ndarray:
        """Continuous array index ``(z, y, x)`` of a RAS position (mm)."""
        inv = np.linalg.inv(self.affine_ras)
        ijk = np.asarray(ras, dtype=float) @ inv[:3, :3].T + inv[:3, 3]
        return ijk[..., ::-1]

    def physical_bounds_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres."""
        corners = np.array(
            [
                [i, j, k]
                for i in (0, self.size[0] - 1)
                for j in (0, self.size[1] - 1)
                for k in (0, self.size[2] - 1)
            ],
            dtype=float,
        )
        pts = corners @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]
        return pts.min(axis=0), pts.max(axis=0)

    def sub_grid(self, start_zyx: Sequence[int], shape_zyx: Sequence[int]) -> Geometry:
        """The grid of ``shape_zyx`` voxels whose first voxel is this grid's index ``start_zyx``.

        Same spacing and direction; ``start_zyx`` may lie outside this grid (a padded window).
        """
        start_xyz = np.asarray(start_zyx, dtype=float)[::-1]
        origin = self.affine_lps[:3, :3] @ start_xyz + self.affine_lps[:3, 3]
        return Geometry(
            size=(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])),
            spacing=self.spacing,
            origin=tuple(float(o) for o in origin),
            direction=self.direction,
        )

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when both describe the same voxel grid (sizes equal, positions within ``tol`` mm)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry (spacing, origin, direction) onto ``image`` and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def validate(self, source: str = "image") -> None:
        """Raise :class:`GeometryError` if spacing or direction cannot describe a real grid."""
        sp = np.asarray(self.spacing, dtype=float)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise GeometryError(
                f"{source}: voxel spacing {tuple(self.spacing)} is zero, negative or NaN. "
                "Fix the header (e.g. re-export the series) or pass the spacing from the scan's metadata."
            )
        d = self.direction_matrix
        if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
            raise GeometryError(
                f"{source}: direction cosines {tuple(np.round(self.direction, 4))} are not a rotation. "
                "Fix the image header before using it."
            )
        if not np.all(np.isfinite(self.origin)):
            raise GeometryError(f"{source}: origin {tuple(self.origin)} is not finite.")

    def to_dict(self) -> dict[str, list]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Geometry:
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        array: float32 HU values, shape ``(Z, Y, X)``.
        geometry: where the voxels are.
        source: where it was read from (for messages).
        dicom_series: the Series Instance UID read, when ``source`` is a DICOM folder.
    """

    array: np.ndarray
    geometry: Geometry
    source: str = "<array>"
    dicom_series: str | None = None

    def to_sitk(self) -> sitk.Image:
        return array_to_sitk(self.array, self.geometry)


def ct_from_array(
    array: np.ndarray, geometry: Geometry, source: str = "<array>", *, allow_non_hu: bool = False
) -> CTVolume:
    """A :class:`CTVolume` from an in-memory ``(Z, Y, X)`` array in HU (e.g. a Slicer volume node),
    with the same checks as :func:`read_ct`: 3D, matching shape, valid geometry, every voxel a
    finite number (always, even with ``allow_non_hu``), HU-like values.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(
            f"{source}: array has {array.ndim} dimensions (shape {array.shape}); a CT is 3D (Z, Y, X)."
        )
    if tuple(array.shape) != geometry.shape_zyx:
        raise GeometryError(
            f"{source}: array shape {array.shape} does not match its geometry {geometry.shape_zyx} (Z, Y, X)."
        )
    geometry.validate(source)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if allow_non_hu:
        check_finite(array, source)
    else:
        check_hu(array, source)  # checks finiteness first
    return CTVolume(array=array, geometry=geometry, source=source)


def check_finite(array: np.ndarray, source: str) -> None:
    """Raise :class:`InputError` when any voxel of ``array`` is NaN or infinite.

    The message gives the count and the first such voxel ``(z, y, x)``, and says what to do:
    fvlm does not guess values for voxels that hold none.
    """
    if array.dtype.kind not in "fc":
        return  # integers are always finite
    bad = ~np.isfinite(array)
    n = int(np.count_nonzero(bad))
    if n:
        first = tuple(int(i) for i in np.argwhere(bad)[0]) if array.ndim else ()
        raise InputError(_nonfinite_message(source, n, int(array.size), first))


def _nonfinite_message(source: str, n: int, total: int, first: tuple[int, ...] | None) -> str:
    at = f", the first at voxel (z, y, x) = {first}" if first else ""
    return (
        f"{source}: {n} of {total} voxels are NaN or infinite{at}. A CT holds a number in every "
        "voxel and fvlm does not guess one: replace them in the program that made the volume (e.g. "
        "with -1024 HU, air, if they lie outside the body) and save it again, or export the scan again."
    )


def array_to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Wrap a ``(Z, Y, X)`` array as a SimpleITK image with ``geometry``."""
    if tuple(array.shape) != geometry.shape_zyx:
        raise GeometryError(f"array shape {array.shape} does not match geometry shape {geometry.shape_zyx}")
    return geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder: its Series Instance UID, slice files and description."""

    uid: str
    files: tuple[str, ...]
    description: str = ""

    def label(self) -> str:
        """``UID (N slices, "description")`` for messages."""
        what = f', "{self.description}"' if self.description else ""
        return f"{self.uid} ({len(self.files)} slices{what})"


def dicom_series(path: str | os.PathLike) -> list[DicomSeries]:
    """The series of a DICOM folder, most slices first (empty when it holds none)."""
    folder = str(path)
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        found.append(DicomSeries(uid, files, _dicom_tag(files[0], "0008|103e") if files else ""))
    return sorted(found, key=lambda s: -len(s.files))


def _dicom_tag(file: str, tag: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
    except RuntimeError:
        return ""


def choose_dicom_series(path: Path, series: str | None = None) -> DicomSeries:
    """The series of DICOM folder ``path`` to read: ``series`` (a Series Instance UID), else the
    one with most slices; when the folder holds several, an :class:`FVLMWarning` names the
    chosen one and the others.

    Raises:
        InputError: no series in the folder, or ``series`` is not one of them.
    """
    found = dicom_series(path)
    if not found:
        raise InputError(
            f"{path}: folder holds no readable DICOM series. Point to the folder of one CT series "
            "(the .dcm files of one acquisition), or to a NIfTI/NRRD/MHA file."
        )
    if series is not None:
        chosen = [s for s in found if s.uid == series.strip()]
        if not chosen:
            raise InputError(
                f"{path}: holds no DICOM series {series}; its series are: "
                + "; ".join(s.label() for s in found)
                + ". Pass one of these UIDs with --series."
            )
        return chosen[0]
    if len(found) > 1:
        warn(
            f"{path} holds {len(found)} DICOM series; reading {found[0].label()}, the one with most "
            f"slices. Others: {'; '.join(s.label() for s in found[1:])}. Pass --series UID to read another."
        )
    return found[0]


def _read_dicom_series(path: Path, series: str | None = None) -> sitk.Image:
    chosen = choose_dicom_series(path, series)
    best, files = chosen.uid, chosen.files
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # GDCM applies RescaleSlope/Intercept per slice
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"{path}: DICOM series {best} could not be decoded ({_first_line(exc)}). Export the series "
            "again (or convert it to NIfTI, e.g. with dcm2niix) and retry."
        ) from exc
    _check_dicom_slices(path, reader, len(files), image)
    # Remember the rescale GDCM applied (first slice), so a metadata override can undo it.
    for tag in (_DICOM_SLOPE, _DICOM_INTERCEPT):
        if reader.HasMetaDataKey(0, tag):
            image.SetMetaData(tag, reader.GetMetaData(0, tag).strip())
    image.SetMetaData(_DICOM_MARK, "1")
    image.SetMetaData(_DICOM_SERIES, best)
    return image


def _check_dicom_slices(path: Path, reader: sitk.ImageSeriesReader, n: int, image: sitk.Image) -> None:
    """Refuse what ITK only warns about: several volumes at the same positions (a 4D or
    multi-phase series) and unevenly spaced slices (missing files), which give a wrong z spacing."""
    if n < 2:
        return
    try:
        ipp = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):
        return  # no positions (e.g. secondary capture): nothing to check
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    gaps = np.abs(np.diff(ipp @ normal))
    if np.any(gaps < 1e-3):
        raise InputError(
            f"{path}: DICOM series has several images at the same slice position (a 4D, multi-phase "
            "or duplicated series). Put the files of one 3D volume (one phase) in a folder of their own."
        )
    median = float(np.median(gaps))
    if gaps.max() - gaps.min() > 0.05 * median + 1e-3:
        raise GeometryError(
            f"{path}: DICOM slices are unevenly spaced (gaps {gaps.min():.3g}..{gaps.max():.3g} mm): "
            "slices are missing or the series mixes acquisitions. Copy the complete series again."
        )


_DICOM_SLOPE, _DICOM_INTERCEPT, _DICOM_MARK = "0028|1053", "0028|1052", "fvlm_dicom_series"
_DICOM_SERIES = "0020|000e"  # Series Instance UID
_NIFTI_INTEGER_TYPES = {2, 4, 8, 256, 512, 768, 1024, 1280}


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(
        f"{path}: {what}. The file is damaged or incomplete (e.g. an interrupted download or copy): "
        "copy or export it again."
    )


def _nifti1_byte_order(head: bytes) -> str | None:
    """``"<"`` or ``">"``: the byte order in which the header's ``sizeof_hdr`` reads 348 (NIfTI-1);
    None for a header cut short, NIfTI-2 or not NIfTI at all."""
    if len(head) < 348:
        return None
    return next((e for e in "<>" if struct.unpack_from(e + "i", head, 0)[0] == 348), None)


def _nifti_expected_bytes(head: bytes) -> int | None:
    """File size (header + voxels) a single-file NIfTI-1 header promises, or None if unknown."""
    endian = _nifti1_byte_order(head)
    if endian is None:
        return None
    dim = struct.unpack_from(endian + "8h", head, 40)
    bitpix = struct.unpack_from(endian + "h", head, 72)[0]
    vox_offset = struct.unpack_from(endian + "f", head, 108)[0]
    if head[344:347] != b"n+1" or bitpix <= 0 or not math.isfinite(vox_offset) or not 1 <= dim[0] <= 7:
        return None
    dims = [max(int(d), 1) for d in dim[1 : dim[0] + 1]]
    return int(vox_offset) + int(np.prod(dims, dtype=np.int64)) * (bitpix // 8)


def _gzip_isize(path: Path) -> int | None:
    """The uncompressed size (mod 2**32) that a gzip file's trailer records."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return None
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _check_nifti_header(path: Path, head: bytes, data_bytes: int) -> None:
    """Catch what ITK's NIfTI reader silently papers over: a truncated voxel block (it returns
    zeros/garbage) and zero or NaN voxel sizes (it replaces them with 1 mm)."""
    if len(head) < 348:
        raise _corrupt(path, f"the NIfTI header is cut short ({len(head)} of 348 bytes)")
    endian = _nifti1_byte_order(head)
    if endian is None:
        return  # NIfTI-2 or not NIfTI at all: let SimpleITK decide
    expected = _nifti_expected_bytes(head)  # None: not a single file, or a header that cannot say
    if expected is not None and data_bytes < expected:
        raise _corrupt(
            path, f"it is truncated: the header describes {expected} bytes but only {data_bytes} are there"
        )
    dim = struct.unpack_from(endian + "8h", head, 40)
    pixdim = struct.unpack_from(endian + "8f", head, 76)
    qform_code, sform_code = struct.unpack_from(endian + "2h", head, 252)
    srow = np.asarray(struct.unpack_from(endian + "12f", head, 280), dtype=float).reshape(3, 4)
    ndim = int(dim[0])
    if not 1 <= ndim <= 7:
        return
    dims = [max(int(d), 1) for d in dim[1 : ndim + 1]]
    axes = [i for i in range(min(ndim, 3)) if dims[i] > 1]
    if sform_code > 0:
        norms = np.linalg.norm(srow[:, :3], axis=0)
        if not np.all(np.isfinite(srow)) or np.any(norms[axes] <= 0):
            raise GeometryError(
                f"{path}: the NIfTI sform gives voxel sizes {norms.round(4).tolist()} (zero or NaN). "
                "Fix the header (e.g. re-export the volume) or read it with a CT-RATE metadata row."
            )
    if sform_code <= 0 or qform_code > 0:
        sizes = np.asarray(pixdim[1:4], dtype=float)
        if not np.all(np.isfinite(sizes[axes])) or np.any(sizes[axes] <= 0):
            raise GeometryError(
                f"{path}: the NIfTI header gives voxel sizes {sizes.tolist()} (zero, negative or NaN). "
                "Fix the header (e.g. re-export the volume) or read it with a CT-RATE metadata row."
            )


def _validate_file(path: Path) -> None:
    """Check what SimpleITK does not: a complete gzip stream and a consistent NIfTI header."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        # Fast path: the gzip trailer records the uncompressed size; if it equals what the header
        # promises, the stream is complete (a cut file ends in arbitrary bytes). Else scan it all.
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(348)
        except (OSError, EOFError, zlib.error):
            head = b""
        expected = _nifti_expected_bytes(head)
        if expected is not None and _gzip_isize(path) == expected % 2**32:
            _check_nifti_header(path, head, expected)
            return
    if name.endswith(".gz"):
        total, head = 0, b""
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(348)
                total = len(head)
                while chunk := f.read(1 << 22):
                    total += len(chunk)
        except gzip.BadGzipFile as exc:
            raise InputError(
                f"{path}: is not gzip-compressed although its name ends in .gz ({exc}); it is not an "
                "image file. Point to the CT itself (NIfTI .nii/.nii.gz, NRRD, MHA, or a DICOM folder)."
            ) from exc
        except EOFError as exc:
            raise _corrupt(path, "the gzip stream ends early (the file is truncated)") from exc
        except (OSError, zlib.error) as exc:
            raise _corrupt(path, f"the gzip stream is corrupt ({exc})") from exc
        if name.endswith(".nii.gz"):
            _check_nifti_header(path, head, total)
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            head = f.read(348)
        _check_nifti_header(path, head, path.stat().st_size)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful part after 'Description:' or last.
    for ln in lines:
        if "description" in ln.lower():
            return ln.split(":", 1)[-1].strip()
    return lines[-1] if lines else type(exc).__name__


def read_image(path: str | os.PathLike, series: str | None = None) -> sitk.Image:
    """Read any image SimpleITK can read (file or DICOM series folder) with clear errors.

    Args:
        path: image file or DICOM folder.
        series: Series Instance UID to read from a DICOM folder holding several (default: the
            one with most slices, with a warning naming the others).

    Raises:
        InputError: unreadable, damaged, ``series`` given for a file or absent from the folder,
            or voxels that are NaN or infinite.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder.")
    if path.is_dir():  # a folder can only be a DICOM series; the reader says so when it holds none
        image = _read_dicom_series(path, series)
        _check_image_finite(image, str(path))
        return image
    if series is not None:
        raise InputError(
            f"{path}: a series (--series {series}) can only be chosen in a DICOM folder; this is a file. "
            "Leave --series out, or give the folder of the DICOM series."
        )
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty.")
    _validate_file(path)
    _check_nifti_finite(path)
    image = _read_file(path)
    _check_image_finite(image, str(path))
    return image


def _check_image_finite(image: sitk.Image, source: str) -> None:
    if image.GetPixelIDValue() in (sitk.sitkFloat32, sitk.sitkFloat64):
        check_finite(sitk.GetArrayViewFromImage(image), source)


#: NIfTI-1 ``datatype`` codes of floating-point and complex voxels (the only ones that hold NaN/Inf).
_NIFTI_FLOAT_CODES = frozenset({16, 32, 64, 1536, 1792, 2048})


def _nifti_may_hold_nonfinite(path: Path) -> bool:
    """False when the NIfTI-1 header's ``datatype`` is an integer type (most CTs: int16), so the
    voxel check can be skipped; True for float data and for headers this cannot read."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError):
        return True
    endian = _nifti1_byte_order(head)
    return endian is None or struct.unpack_from(endian + "h", head, 70)[0] in _NIFTI_FLOAT_CODES


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0 (water): find them before it does.
    Only floating-point NIfTI can hold them (integer voxels are read as they are)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")) or not _nifti_may_hold_nonfinite(path):
        return
    import nibabel as nib  # imported only here: it pulls pydicom, PIL, ... (~0.3 s)

    try:
        img = nib.load(str(path))
        if img.get_data_dtype().kind not in "fc":
            return
        data = np.asanyarray(img.dataobj)
    except Exception:
        return
    bad = ~np.isfinite(data)
    n = int(np.count_nonzero(bad))
    if n:
        first = None
        if bad.ndim >= 3:  # nibabel's (i, j, k, ...) -> ITK's (z, y, x), first in the same order
            zyx = bad.reshape(*bad.shape[:3], -1).any(axis=-1).transpose(2, 1, 0)
            first = tuple(int(i) for i in np.argwhere(zyx)[0])
        raise InputError(_nonfinite_message(str(path), n, int(data.size), first))


def _read_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        text = str(exc)
        if (
            "Refusing to change spacing" in text
            or "space vector" in text
            or "spacing" in _first_line(exc).lower()
        ):
            raise GeometryError(
                f"{path}: its header gives an invalid voxel spacing or direction ({_first_line(exc)}). "
                "Fix the header (e.g. re-export the volume) before using it."
            ) from exc
        raise InputError(
            f"{path}: not a readable image ({_first_line(exc)}). Give a CT as NIfTI (.nii/.nii.gz), "
            "NRRD, MHA/MHD, or a DICOM series folder; if this is one, it is damaged: copy or export it again."
        ) from exc


def _squeeze_to_3d(image: sitk.Image, source: str) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
            "vector image); a CT has one intensity per voxel."
        )
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(
                f"{source}: is a 4D series with {size[3]} time points/volumes. Pick one 3D volume "
                "(e.g. one phase) and save it as its own file."
            )
        image = sitk.Extract(image, (*size[:3], 0), (0, 0, 0, 0))
        dim = 3
    if dim != 3:
        raise InputError(
            f"{source}: is a {dim}D image; a CT volume must be 3D (a stack of slices). Give the whole "
            "volume file, or the folder of the DICOM series rather than one slice."
        )
    if min(image.GetSize()) < 2:
        raise InputError(
            f"{source}: has size {image.GetSize()}, i.e. a single slice. A CT volume needs several "
            "slices; for a DICOM series point to the folder, not to one file."
        )
    return image


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)", re.IGNORECASE)


def _parse_list(value: Any) -> list[float]:
    """Numbers of a metadata cell: 0.75, "0.75", "[0.75, 0.8]", "['0.75', '0.8']", "0.75\\0.8"."""
    if isinstance(value, str):
        found = _NUMBER.findall(value)
        if not found:
            raise ValueError(f"no number in {value!r}")
        return [float(v) for v in found]
    if isinstance(value, (int, float, np.number)):
        return [float(value)]
    return [float(v) for v in value]


def geometry_from_ctrate_metadata(
    row: Mapping[str, Any], size_xyz: tuple[int, int, int], source: str = "CT-RATE metadata row"
) -> Geometry:
    """Geometry from a CT-RATE metadata row (XYSpacing, ZSpacing, ImagePositionPatient,
    ImageOrientationPatient), following DICOM semantics: x along a row, y along a column, z
    along the slice normal (row x column), origin at the first voxel. Cells may be numbers or
    strings such as ``"[0.75, 0.75]"`` (as in the CT-RATE CSVs).
    """
    try:
        xy = _parse_list(row["XYSpacing"])
        z = _parse_list(row["ZSpacing"])[0]
        ipp = _parse_list(row["ImagePositionPatient"])
        iop = _parse_list(row["ImageOrientationPatient"])
    except KeyError as exc:
        raise InputError(
            f"{source}: CT-RATE metadata row lacks column {exc.args[0]!r}; use a row of "
            "metadata/{train,validation}_metadata.csv."
        ) from exc
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: CT-RATE metadata row has an unparsable geometry value: {exc}") from exc
    if len(iop) != 6 or len(ipp) != 3:
        raise InputError(
            f"{source}: CT-RATE metadata ImageOrientationPatient needs 6 values and ImagePositionPatient 3, "
            f"got {iop}, {ipp}; fix the metadata row."
        )
    r = np.asarray(iop[:3])
    c = np.asarray(iop[3:])
    if not (np.all(np.isfinite(iop)) and np.linalg.norm(r) > 0.5 and np.linalg.norm(c) > 0.5):
        raise InputError(f"{source}: CT-RATE metadata ImageOrientationPatient {iop} is not two directions.")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    n = np.cross(r, c)
    direction = np.stack([r, c, n], axis=1)
    # DICOM PixelSpacing is [row spacing (y), column spacing (x)].
    sx, sy = (xy[1], xy[0]) if len(xy) >= 2 else (xy[0], xy[0])
    return Geometry(
        size=size_xyz,
        spacing=(float(sx), float(sy), float(z)),
        origin=tuple(float(v) for v in ipp),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )


def check_hu(array: np.ndarray, source: str) -> None:
    """Raise :class:`InputError` if the intensities do not look like CT in Hounsfield units.

    CT has air (about -1000 HU) around the body or in the lungs/bowel, soft tissue near 0-100 and
    bone in the hundreds. MR, PET, or an already normalised array look different; so does a CT
    stored without its rescale intercept (air near 0, everything positive).
    """
    if array.size == 0:
        raise InputError(f"{source}: holds no voxels; give the whole CT volume.")
    check_finite(array, source)  # every voxel: a sample could miss a few
    flat = array.reshape(-1)
    if flat.size > 2_000_000:  # a strided sample is plenty for percentiles
        flat = flat[:: flat.size // 2_000_000]
    lo, hi = np.percentile(flat, [0.5, 99.5])
    hint = " If you are sure this is a CT in HU, pass allow_non_hu=True (command line: --allow-non-hu)."
    if hi - lo < 50:
        raise InputError(
            f"{source}: intensities span only {lo:.3g}..{hi:.3g}; it looks already normalised (or blank), "
            "not CT in Hounsfield units. Give the original CT." + hint
        )
    if lo > -300:
        if lo >= -50 and hi > 1000:
            what = (
                "no air-like values (< -300); it may be a CT stored without its rescale intercept "
                "(add -1024) or an MR/PET volume"
            )
        else:
            what = "no air-like values (< -300 HU); it looks like MR or another modality, or a tight crop"
        raise InputError(f"{source}: intensity range {lo:.0f}..{hi:.0f} has {what}." + hint)
    if lo < -5000 or hi > 40000:
        raise InputError(f"{source}: intensity range {lo:.0f}..{hi:.0f} is outside any CT range." + hint)


def read_ct(
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    allow_non_hu: bool = False,
    series: str | None = None,
) -> CTVolume:
    """Read a CT volume (NIfTI, NRRD, MHA, or a DICOM series folder) in Hounsfield units.

    Args:
        path: image file or DICOM series folder.
        metadata: optional CT-RATE metadata row. When given, its geometry (XYSpacing, ZSpacing,
            ImagePositionPatient, ImageOrientationPatient) replaces the header's, and its
            RescaleSlope / RescaleIntercept are applied to the stored values (CT-RATE NIfTI
            headers are unreliable). Missing rescale columns leave the header's scaling.
        allow_non_hu: skip the check that the intensities look like CT in HU (voxels that are
            NaN or infinite are refused all the same).
        series: Series Instance UID to read from a DICOM folder holding several (default: the
            one with most slices; a warning names the others).

    Returns:
        :class:`CTVolume` with a float32 ``(Z, Y, X)`` array and its :class:`Geometry`
        (``dicom_series`` set for a DICOM folder).

    Raises:
        InputError: unreadable file, not 3D, bad geometry, NaN or infinite voxels, or
            intensities that are not CT.
    """
    source = str(path)
    image = _squeeze_to_3d(read_image(path, series), source)
    dicom_uid = image.GetMetaData(_DICOM_SERIES) if image.HasMetaDataKey(_DICOM_MARK) else None
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    geometry = Geometry.from_sitk(image)

    if metadata is not None:
        volume_name = metadata.get("VolumeName") if hasattr(metadata, "get") else None
        if isinstance(volume_name, str) and _volume_stem(volume_name) != _volume_stem(Path(path).name):
            raise InputError(
                f"{source}: the metadata row is for {volume_name!r}, not this file; pass the row whose "
                "VolumeName matches the file (a wrong row gives a wrong geometry and HU)."
            )
        geometry = geometry_from_ctrate_metadata(metadata, geometry.size, source)
        if "RescaleSlope" in metadata or "RescaleIntercept" in metadata:
            try:
                slope = _parse_list(metadata.get("RescaleSlope", 1.0))[0]
                intercept = _parse_list(metadata.get("RescaleIntercept", 0.0))[0]
            except (ValueError, SyntaxError, IndexError) as exc:
                raise InputError(
                    f"{source}: metadata RescaleSlope/RescaleIntercept unparsable ({exc})."
                ) from exc
            if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
                raise InputError(
                    f"{source}: metadata RescaleSlope={slope}, RescaleIntercept={intercept} are invalid; "
                    "fix the metadata row (slope must be a non-zero number)."
                )
            array = _stored_values(image, array) * slope + intercept

    ct = ct_from_array(array, geometry, source, allow_non_hu=allow_non_hu)
    return replace(ct, dicom_series=dicom_uid) if dicom_uid else ct


def _volume_stem(name: str) -> str:
    name = Path(name).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _stored_values(image: sitk.Image, array: np.ndarray) -> np.ndarray:
    """Undo the rescale SimpleITK applied while reading (NIfTI scl_*, DICOM 0028,1052/3), giving
    the stored values, so that a metadata rescale is applied to what is really in the file."""
    keys = set(image.GetMetaDataKeys())
    slope, inter, integer = 1.0, 0.0, False
    if _DICOM_MARK in keys:
        slope = float(image.GetMetaData(_DICOM_SLOPE)) if _DICOM_SLOPE in keys else 1.0
        inter = float(image.GetMetaData(_DICOM_INTERCEPT)) if _DICOM_INTERCEPT in keys else 0.0
        integer = True  # DICOM stores integer pixel values
    elif "scl_slope" in keys:
        slope = float(image.GetMetaData("scl_slope"))
        inter = float(image.GetMetaData("scl_inter")) if "scl_inter" in keys else 0.0
        if not math.isfinite(slope) or slope == 0.0:  # NIfTI: no scaling
            slope, inter = 1.0, 0.0
        if not math.isfinite(inter):
            inter = 0.0
        integer = "datatype" in keys and int(image.GetMetaData("datatype")) in _NIFTI_INTEGER_TYPES
    if slope == 1.0 and inter == 0.0:
        return array.astype(np.float64)
    stored = (array.astype(np.float64) - inter) / slope
    # The stored values were integers: remove float32 round-off from the reader's scaling.
    return np.round(stored) if integer else stored


@dataclass
class LabelVolume:
    """An integer label map on a grid. ``array`` has shape ``(Z, Y, X)``."""

    array: np.ndarray
    geometry: Geometry
    source: str = "<array>"


def check_overlap(moving: Geometry, reference: Geometry, source: str = "image") -> None:
    """Raise :class:`GeometryError` when two grids do not overlap in physical space (LPS boxes
    of their voxel centres, with one voxel of slack)."""
    lo_a, hi_a = moving.physical_bounds_lps()
    lo_b, hi_b = reference.physical_bounds_lps()
    tol = np.maximum(np.asarray(moving.spacing), np.asarray(reference.spacing))
    if np.any(hi_a + tol < lo_b) or np.any(hi_b + tol < lo_a):
        raise GeometryError(
            f"{source}: its grid does not overlap the CT in physical space "
            f"(image spans LPS {np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()}, "
            f"CT spans {np.round(lo_b, 1).tolist()}..{np.round(hi_b, 1).tolist()}). "
            "Check that the label map belongs to this CT (same patient and scan)."
        )


def resample_to(
    image: sitk.Image, reference: Geometry, *, is_label: bool, default: float = 0.0, source: str = "image"
) -> sitk.Image:
    """Resample ``image`` onto ``reference`` by physical position (labels: nearest neighbour).

    Raises :class:`GeometryError` when the two grids do not overlap in physical space.
    """
    check_overlap(Geometry.from_sitk(image), reference, source)
    ref = reference.apply_to(sitk.Image(list(reference.size), image.GetPixelID()))
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, ref, sitk.Transform(), interp, default, image.GetPixelID())


def read_label_map(path: str | os.PathLike, reference: Geometry | None = None) -> LabelVolume:
    """Read an integer label map; if ``reference`` is given, put it on that grid.

    A label map on a different grid is resampled (nearest neighbour) by physical position; one
    that does not overlap the reference raises :class:`GeometryError`.
    """
    source = str(path)
    image = _squeeze_to_3d(read_image(path), source)
    pixel = image.GetPixelIDValue()
    if pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        if not np.allclose(arr, np.round(arr)):
            raise InputError(f"{source}: holds non-integer values; a label map must hold integer labels.")
        image = sitk.Cast(image, sitk.sitkUInt16)
    geom = Geometry.from_sitk(image)
    geom.validate(source)
    if reference is not None:
        if not geom.same_grid(reference):
            image = resample_to(image, reference, is_label=True, source=source)
        geom = reference
    array = sitk.GetArrayFromImage(image)
    if array.min() < 0:
        raise InputError(f"{source}: holds negative labels; label values must be >= 0.")
    return LabelVolume(array=array, geometry=geom, source=source)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_image(
    array: np.ndarray, geometry: Geometry, path: str | os.PathLike, *, compress: bool = True
) -> Path:
    """Write a ``(Z, Y, X)`` array with ``geometry`` atomically (format from the suffix).

    The image is written to a temporary file next to ``path`` and renamed onto it, so a failed
    write leaves no partial file and keeps a previous ``path`` intact.
    """
    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(
            f"{path}: unknown image file type; name the output .nii.gz, .nii, .nrrd or .mha "
            f"(supported: {', '.join(IMAGE_SUFFIXES)})."
        )
    image = array_to_sitk(array, geometry)
    try:
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
            # ITK's NIfTI writer does not report a failed write (e.g. disk full): check the
            # temporary file before it replaces anything.
            _validate_file(tmp)
    except (RuntimeError, InputError) as exc:
        reason = _first_line(exc) if isinstance(exc, RuntimeError) else "the written file was incomplete"
        raise InputError(
            f"{path}: could not be written ({reason}). Check that the folder is writable and has free "
            "space; nothing was written and any previous file is unchanged."
        ) from exc
    return path
