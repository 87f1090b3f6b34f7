"""The source CT series of a DICOM export: its headers, checked, in the order of the CT's grid.

The objects ``fvlm analyze --dicom-out`` writes reference the series they were computed from
(SOP instances, series, study, frame of reference) and copy its patient and study attributes.
So the series must carry those identifiers, consistently across its files, before any work is
done: :func:`read_source_series` reads only the headers (no pixel data) and refuses, with every
problem listed, a series whose identifiers are missing or empty (a series anonymised with its
UIDs removed), that mixes studies, frames of reference, image sizes, orientations or SOP
classes, that repeats a SOP instance, or that is a multi-frame image. :meth:`SourceSeries.on_grid`
then puts the files in the slice order of the CT grid read from them, checking each file's
position, orientation and pixel spacing against that grid.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description, tag_for_keyword
from pydicom.dataset import Dataset

from fvlm_core.dicom_series import choose_dicom_series
from fvlm_core.errors import FVLMWarning, InputError
from fvlm_core.geometry import Geometry

#: Attributes the derived objects need from every file (Type 1 there: no empty value).
REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
)
#: Attributes every file of one series must share (a series mixing them is refused).
SHARED = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SOPClassUID",
    "Modality",
    "Rows",
    "Columns",
    "PatientID",
    "PatientName",
)
#: Patient and study attributes the derived objects copy; Type 2 there, so an absent one is
#: written empty ("unknown"), never made up.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class SourceSeries:
    """The headers of one DICOM series (pixel data not read), checked by :func:`read_source_series`.

    Attributes:
        folder: the folder read.
        datasets: one header per file; after :meth:`on_grid`, ``datasets[k]`` is slice ``k``
            of the CT grid (array index ``[k, :, :]``).
    """

    folder: Path
    datasets: tuple[Dataset, ...]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(d.SOPInstanceUID) for d in self.datasets]

    def on_grid(self, geometry: Geometry) -> SourceSeries:
        """The series with ``datasets[k]`` the file of slice ``k`` of ``geometry`` (the grid the
        CT was read on), after checking that every file lies on that grid.

        Raises:
            InputError: the files and the grid differ (count, size, spacing, orientation or
                positions), e.g. because the folder changed since the CT was read.
        """
        where = f"{self.folder}: DICOM series {self.series_uid}"
        size_x, size_y, size_z = geometry.size
        if len(self.datasets) != size_z:
            raise InputError(f"{where} has {len(self.datasets)} files, the CT read from it {size_z} slices.")
        direction = geometry.direction_matrix
        spacing = np.asarray(geometry.spacing, dtype=float)
        order = np.full(size_z, -1)
        for i, ds in enumerate(self.datasets):
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            pixel = np.asarray([float(v) for v in ds.PixelSpacing])  # (between rows, between columns)
            if (int(ds.Columns), int(ds.Rows)) != (size_x, size_y):
                raise InputError(f"{where}: {_name(ds)} is {ds.Columns}x{ds.Rows}, the CT {size_x}x{size_y}.")
            if not (
                np.allclose(iop[:3], direction[:, 0], atol=1e-4)
                and np.allclose(iop[3:], direction[:, 1], atol=1e-4)
            ):
                raise InputError(f"{where}: {_name(ds)} is not oriented as the CT read from the series.")
            if not np.allclose(pixel[::-1], spacing[:2], atol=1e-4):
                raise InputError(f"{where}: {_name(ds)} has a pixel spacing other than the CT's.")
            position = np.asarray([float(v) for v in ds.ImagePositionPatient])
            index = geometry.ras_to_index_zyx(position * [-1.0, -1.0, 1.0])[::-1]  # LPS -> (i, j, k)
            k = round(float(index[2]))
            off_mm = np.abs((index - [0.0, 0.0, k]) * spacing).max()
            if off_mm > _TOLERANCE_MM + 0.01 * spacing.min() or not 0 <= k < size_z:
                raise InputError(
                    f"{where}: {_name(ds)} lies off the CT's slices (position {list(ds.ImagePositionPatient)})."
                )
            if order[k] >= 0:
                raise InputError(
                    f"{where}: {_name(ds)} and {_name(self.datasets[order[k]])} are at one slice position."
                )
            order[k] = i
        return replace(self, datasets=tuple(self.datasets[i] for i in order))

    def for_copying(self) -> list[Dataset]:
        """Copies of the headers with the copied Type 2 attributes present (empty when the
        source has none: unknown, not made up), as the DICOM writers read them."""
        out = []
        for ds in self.datasets:
            copy = Dataset(ds)  # shallow: the headers are not changed
            copy.file_meta = ds.file_meta
            for keyword in COPIED_TYPE2:
                if keyword not in copy:
                    setattr(copy, keyword, "")
            out.append(copy)
        return out


def _name(ds: Dataset) -> str:
    return Path(str(getattr(ds, "filename", "") or "?")).name


def read_source_series(folder: str | os.PathLike, series: str | None = None) -> SourceSeries:
    """Read and check the headers of the series ``fvlm analyze`` reads from ``folder``.

    Args:
        folder: a DICOM folder (a file is refused: DICOM objects can only reference a DICOM series).
        series: its Series Instance UID, when the folder holds several (default: the one with
            most slices, as the CT reader chooses).

    Raises:
        InputError: not a folder, no series, or a series the derived objects cannot reference
            (every problem listed, with what to do).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: --dicom-out writes DICOM objects that reference the source images, so the CT "
            "must be a DICOM series folder, not a file (NIfTI, NRRD, MHA). Give the folder of the "
            "DICOM series, or leave out --dicom-out."
        )
    with warnings.catch_warnings():  # the CT reader warns about several series itself
        warnings.simplefilter("ignore", FVLMWarning)
        chosen = choose_dicom_series(folder, series)
    return read_source_files(chosen.files, folder)


def read_source_files(
    files: Sequence[str | os.PathLike], folder: str | os.PathLike | None = None
) -> SourceSeries:
    """Read and check the headers of the files of one series (e.g. those 3D Slicer's DICOM
    database lists for a volume); ``folder`` names them in messages (default: the first's folder).

    Raises:
        InputError: no files, an unreadable file, or headers the derived objects cannot
            reference (every problem listed, with what to do).
    """
    if not files:
        raise InputError("no DICOM files given for the source series")
    folder = Path(folder) if folder is not None else Path(files[0]).parent
    datasets = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"{file}: not readable as DICOM ({exc}). Copy the series again.") from exc
    problems = series_problems(datasets)
    if problems:
        uid = str(datasets[0].get("SeriesInstanceUID", "") or "") or "(no Series Instance UID)"
        raise InputError(
            f"{folder}: DICOM series {uid} cannot be referenced by "
            f"DICOM objects: {'; '.join(problems)}. Nothing was done. The derived objects must name "
            "the study, series and images they belong to, as in the archive: export the series "
            "again from the archive (PACS), or, for a de-identified copy, give it identifiers with a "
            "de-identification tool that keeps one Study and one Series Instance UID for all its "
            "files. Without --dicom-out, fvlm analyze reads this series as it is."
        )
    return SourceSeries(folder, tuple(datasets))


def series_problems(datasets: Sequence[Dataset]) -> list[str]:
    """Why these headers (one series) cannot be referenced: missing or empty identifiers and
    geometry, values that differ between files, repeated SOP instances, multi-frame images."""
    n = len(datasets)
    problems = []
    for keyword in REQUIRED:
        bad = [ds for ds in datasets if _empty(ds.get(keyword))]
        if bad:
            what = "missing or empty" if len(bad) < n else ("empty" if keyword in bad[0] else "missing")
            problems.append(f"{_title(keyword)} is {what} in {_count(bad, n)} (e.g. {_name(bad[0])})")
    for keyword in SHARED:
        values = {str(ds.get(keyword, "")) for ds in datasets}
        if len(values) > 1:
            shown = ", ".join(sorted(v or "(empty)" for v in values)[:3])
            problems.append(f"the files mix {len(values)} values of {_title(keyword)} ({shown})")
    for keyword, atol in (("ImageOrientationPatient", 1e-4), ("PixelSpacing", 1e-4)):
        if _differs([ds.get(keyword) for ds in datasets], atol):
            problems.append(f"the files mix several {_title(keyword)} values")
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets if not _empty(ds.get("SOPInstanceUID"))]
    if len(set(uids)) < len(uids):
        problems.append("a SOP Instance UID is used by several files (copies of one image)")
    multi = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        problems.append(f"{_name(multi[0])} is a multi-frame image; only single-frame series are supported")
    return problems


def _empty(value) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (not isinstance(value, (str, int, float)) and len(value) == 0)
    )


def _differs(values: list, atol: float) -> bool:
    try:
        arrays = [np.asarray([float(v) for v in value]) for value in values if not _empty(value)]
    except (TypeError, ValueError):
        return True
    return any(a.shape != arrays[0].shape or not np.allclose(a, arrays[0], atol=atol) for a in arrays)


def _count(bad: Sequence, n: int) -> str:
    return f"all {n} files" if len(bad) == n else f"{len(bad)} of {n} files"


def _title(keyword: str) -> str:
    """``StudyInstanceUID`` -> ``Study Instance UID`` (the standard's name, as dcmdump shows it)."""
    tag = tag_for_keyword(keyword)
    return dictionary_description(tag) if tag is not None else keyword
