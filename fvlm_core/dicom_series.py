"""DICOM series folders: which series a folder holds, the one to read, and reading it with GDCM.

SimpleITK (GDCM) decodes the slices and applies each one's Rescale Slope / Intercept, so the image
is in HU; :func:`check_slices` refuses what ITK only warns about (several volumes at one position,
missing slices). The image records the rescale it applied and its Series Instance UID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fvlm_core.errors import GeometryError, InputError, itk_message, warn

SLOPE_TAG, INTERCEPT_TAG = "0028|1053", "0028|1052"
SERIES_TAG = "0020|000e"  # Series Instance UID
_MARK = "fvlm_dicom_series"  # set on every image read_series returns


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


def read_series(path: Path, series: str | None = None) -> sitk.Image:
    """The series of DICOM folder ``path`` chosen by :func:`choose_dicom_series` as a float32
    image in HU (GDCM applies each slice's rescale), checked by :func:`check_slices`; it records
    the rescale applied (:func:`applied_rescale`) and its Series Instance UID (:func:`series_uid`)."""
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
            f"{path}: DICOM series {best} could not be decoded ({itk_message(exc)}). Export the series "
            "again (or convert it to NIfTI, e.g. with dcm2niix) and retry."
        ) from exc
    check_slices(path, reader, len(files), image)
    # Remember the rescale GDCM applied (first slice), so a metadata override can undo it.
    for tag in (SLOPE_TAG, INTERCEPT_TAG):
        if reader.HasMetaDataKey(0, tag):
            image.SetMetaData(tag, reader.GetMetaData(0, tag).strip())
    image.SetMetaData(_MARK, "1")
    image.SetMetaData(SERIES_TAG, best)
    return image


def check_slices(path: Path, reader: sitk.ImageSeriesReader, n: int, image: sitk.Image) -> None:
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


def series_uid(image: sitk.Image) -> str | None:
    """The Series Instance UID of an image :func:`read_series` returned (None for other images)."""
    return image.GetMetaData(SERIES_TAG) if image.HasMetaDataKey(_MARK) else None


def applied_rescale(image: sitk.Image) -> tuple[float, float] | None:
    """``(slope, intercept)`` GDCM applied to the stored values (the first slice's) of an image
    :func:`read_series` returned; None for other images."""
    if not image.HasMetaDataKey(_MARK):
        return None
    slope = float(image.GetMetaData(SLOPE_TAG)) if image.HasMetaDataKey(SLOPE_TAG) else 1.0
    inter = float(image.GetMetaData(INTERCEPT_TAG)) if image.HasMetaDataKey(INTERCEPT_TAG) else 0.0
    return slope, inter
