"""Synthetic DICOM studies written with pydicom, as a scanner exports them (for the DICOM tests).

``write_ct_series`` writes one CT Image Storage file per axial slice with every attribute the
CT Image IOD requires (dciodvfy reports neither error nor warning on them), the patient and study of a
:class:`Study`, and positions that put slice ``k`` of the array at ``geometry``'s slice ``k``.
``restore_identifiers`` gives a de-identified copy of a series (empty UIDs, as the shared
TotalSegmentator example series has) the identifiers an archive export would carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fvlm_core.geometry import Geometry


@dataclass(frozen=True)
class Study:
    """The patient and study every series of a synthetic study shares."""

    study_uid: str
    frame_of_reference_uid: str
    patient_name: str = "Phantom^Synthetic"
    patient_id: str = "FVLM-TEST-0001"
    birth_date: str = "19600101"
    sex: str = "O"
    study_date: str = "20250102"
    study_time: str = "101500"
    accession: str = "ACC0001"
    study_id: str = "S1"

    @classmethod
    def new(cls, seed: str) -> Study:
        return cls(generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "for"]))


def write_ct_series(
    folder: Path,
    hu_zyx: np.ndarray,
    geometry: Geometry,
    study: Study,
    series_number: int,
    description: str,
    series_uid: str | None = None,
) -> str:
    """Write ``hu_zyx`` (HU) on ``geometry`` (axial, LPS-aligned) as a CT series, files named
    ``<description>_<slice>.dcm``; returns its UID (``series_uid``, else one made from the study's
    and the series number)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid(entropy_srcs=[study.study_uid, str(series_number)])
    direction = geometry.direction_matrix
    sx, sy, sz = geometry.spacing
    stored = np.clip(np.round(np.asarray(hu_zyx, dtype=np.float64) + 1024), 0, 4095).astype(np.uint16)
    for k in range(stored.shape[0]):
        position = np.asarray(geometry.origin) + direction[:, 2] * sz * k
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality, ds.Manufacturer = "CT", "fVLM test phantom"
        ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
        ds.PatientBirthDate, ds.PatientSex = study.birth_date, study.sex
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study.study_uid, study.study_id, study.accession
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = study.study_date, study.study_time, ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_of_reference_uid, ""
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.PatientPosition, ds.KVP = "HFS", 120
        ds.ContentDate, ds.ContentTime = study.study_date, study.study_time
        ds.BodyPartExamined, ds.ImageLaterality = "CHEST", "U"  # unpaired: no series Laterality needed
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing, ds.SliceThickness = [float(sy), float(sx)], float(sz)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"{description}_{k:04d}.dcm", enforce_file_format=True)
    return series_uid


def restore_identifiers(source: Path, target: Path, seed: str) -> None:
    """Copy a de-identified series whose SOP Class, SOP Instance, Study and Series Instance UIDs
    are empty, giving it what an archive export carries: the file meta's SOP Class and Instance
    UIDs (Part 10 requires them equal to the dataset's) and one Study and one Series UID."""
    target.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "series"])
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(target / file.name)
