"""Reading and writing CT volumes and label maps with their full geometry.

One reader per format: a DICOM series folder (:mod:`fvlm_core.dicom_series`), NIfTI (SimpleITK
after nibabel's header checks, :mod:`fvlm_core.nifti`), and NRRD / MHA / MHD (SimpleITK). Arrays
are in SimpleITK order ``(z, y, x)``; where the voxels are is a :class:`~fvlm_core.geometry.Geometry`.
A CT-RATE volume with its metadata row is read by :mod:`fvlm_core.data.ctrate_volume`.

Voxels that are not numbers (NaN) or infinite are refused by every reader (NIfTI, NRRD, MHA,
DICOM, label maps) and by :func:`ct_from_array` (the 3D Slicer path), with the count and where
they are: a CT holds a number in every voxel, and any value put in their place (ITK's NIfTI
reader silently makes them 0 HU, water) would change what the model sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fvlm_core import dicom_series, nifti
from fvlm_core.atomic import atomic_path
from fvlm_core.errors import GeometryError, InputError, itk_message
from fvlm_core.geometry import Geometry, check_overlap

#: File suffixes read as single image files (anything else that is a folder is tried as DICOM).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


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


def _check_file(path: Path) -> None:
    """Check what SimpleITK does not: a complete gzip stream and a consistent NIfTI header."""
    if nifti.is_nifti(path):
        nifti.check_file(path)
    elif path.name.lower().endswith(".gz"):
        nifti.read_gzip(path)


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
        image = dicom_series.read_series(path, series)
        _check_image_finite(image, str(path))
        return image
    if series is not None:
        raise InputError(
            f"{path}: a series (--series {series}) can only be chosen in a DICOM folder; this is a file. "
            "Leave --series out, or give the folder of the DICOM series."
        )
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty.")
    _check_file(path)
    if nifti.is_nifti(path):
        found = nifti.first_nonfinite(path)  # before ITK's reader makes them 0
        if found:
            raise InputError(_nonfinite_message(str(path), *found))
    image = _read_file(path)
    _check_image_finite(image, str(path))
    return image


def _check_image_finite(image: sitk.Image, source: str) -> None:
    if image.GetPixelIDValue() in (sitk.sitkFloat32, sitk.sitkFloat64):
        check_finite(sitk.GetArrayViewFromImage(image), source)


def _read_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        text = str(exc)
        if (
            "Refusing to change spacing" in text
            or "space vector" in text
            or "spacing" in itk_message(exc).lower()
        ):
            raise GeometryError(
                f"{path}: its header gives an invalid voxel spacing or direction ({itk_message(exc)}). "
                "Fix the header (e.g. re-export the volume) before using it."
            ) from exc
        raise InputError(
            f"{path}: not a readable image ({itk_message(exc)}). Give a CT as NIfTI (.nii/.nii.gz), "
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


def read_image_3d(path: str | os.PathLike, series: str | None = None) -> sitk.Image:
    """:func:`read_image`, refused unless it is one 3D volume of one component (a 4D file of a
    single volume is taken as that volume)."""
    return _squeeze_to_3d(read_image(path, series), str(path))


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


def read_ct(path: str | os.PathLike, *, allow_non_hu: bool = False, series: str | None = None) -> CTVolume:
    """Read a CT volume (NIfTI, NRRD, MHA, or a DICOM series folder) in Hounsfield units.

    Args:
        path: image file or DICOM series folder.
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
    image = read_image_3d(path, series)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    ct = ct_from_array(array, Geometry.from_sitk(image), str(path), allow_non_hu=allow_non_hu)
    uid = dicom_series.series_uid(image)
    return replace(ct, dicom_series=uid) if uid else ct


@dataclass
class LabelVolume:
    """An integer label map on a grid. ``array`` has shape ``(Z, Y, X)``."""

    array: np.ndarray
    geometry: Geometry
    source: str = "<array>"


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
    image = read_image_3d(path)
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
            _check_file(tmp)
    except (RuntimeError, InputError) as exc:
        reason = itk_message(exc) if isinstance(exc, RuntimeError) else "the written file was incomplete"
        raise InputError(
            f"{path}: could not be written ({reason}). Check that the folder is writable and has free "
            "space; nothing was written and any previous file is unchanged."
        ) from exc
    return path
