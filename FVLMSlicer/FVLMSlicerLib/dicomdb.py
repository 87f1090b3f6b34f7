"""Slicer's DICOM database around "Export to DICOM": the files of the analysed series, and the
written objects put into the database.

As QuantitativeReporting and Slicer's own DICOM SEG export do (QIICR/QuantitativeReporting
``DICOMPlugins/DICOMSegmentationPlugin.py``, ``DICOMSegmentationExporter.getDICOMFileList`` and
``export``; ``QuantitativeReporting.py``, ``saveReport``; Slicer
``Modules/Scripted/DICOMPlugins/DICOMSegmentationPlugin.py``):

* a volume can be exported when it came from the database: its ``DICOM.instanceUIDs`` attribute
  (the SOP Instance UID of each slice, set by Slicer's ``DICOMScalarVolumePlugin`` when it loads
  a series) names the source instances and ``fileForInstance`` their files; files missing from
  the database are an error that says how many;
* the objects are written into a temporary folder (here: the job folder), each is put into the
  database with ``insert(path)``, which stores a copy in the database's folder
  (``ctkDICOMDatabase::insert``, ``storeFile`` true by default), and the temporary folder is
  removed.

Lookups and inserts run on the GUI thread (the database is Slicer's), a chunk per step. No Qt.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from fvlm_core.errors import FVLMError, InputError

INSTANCE_UIDS = "DICOM.instanceUIDs"
#: ``fileForInstance`` lookups per GUI step (each one SQL query).
LOOKUPS_PER_STEP = 64


def database() -> Any:
    """Slicer's DICOM database (``slicer.dicomDatabase``) when it is open, else None."""
    import slicer

    db = getattr(slicer, "dicomDatabase", None)
    return db if db is not None and db.isOpen else None


def instance_uids(volume_node: Any) -> list[str]:
    """The SOP Instance UIDs of the volume's slices ([] when it did not come from DICOM)."""
    return (volume_node.GetAttribute(INSTANCE_UIDS) or "").split() if volume_node is not None else []


def export_blocker(volume_node: Any, db: Any) -> str:
    """Why the analysed volume cannot be exported to DICOM ("" when it can): what the panel's
    disabled button says."""
    if volume_node is None:
        return "The analysed volume is no longer in the scene."
    if not instance_uids(volume_node):
        return (
            f"'{volume_node.GetName()}' was not loaded from Slicer's DICOM database (it has no "
            f"{INSTANCE_UIDS}), so there is no DICOM series for the objects to reference. Import the "
            "CT's DICOM files in the DICOM module, load the series from there and analyse it to export."
        )
    if db is None:
        return "Slicer's DICOM database is not open: open the DICOM module once, then export."
    return ""


def source_files_steps(db: Any, volume_node: Any) -> Generator[float, None, dict[str, Any]]:
    """The files of the volume's slices, looked up :data:`LOOKUPS_PER_STEP` at a time; returns
    ``{"files": [...]}`` (a :class:`~FVLMSlicerLib.job.TaskJob` ``prepare``)."""
    uids = instance_uids(volume_node)
    files = []
    for start in range(0, len(uids), LOOKUPS_PER_STEP):
        files += [db.fileForInstance(uid) for uid in uids[start : start + LOOKUPS_PER_STEP]]
        yield 0.0
    missing = sum(1 for f in files if not f)
    if missing:
        raise InputError(
            f"{missing} of the {len(uids)} files of '{volume_node.GetName()}' are not in Slicer's DICOM "
            "database any more: import the series again in the DICOM module, then export."
        )
    return {"files": files}


def insert_steps(db: Any, written: dict[str, Any]) -> Generator[float, None, list[dict[str, Any]]]:
    """Put the written objects (``fvlm_core.dicom.export_analysis``'s record) into the database,
    one per step, each checked to be there afterwards; returns their records."""
    folder = Path(written["folder"])
    objects = [written["seg"], written["sr"], *written.get("maps", [])]
    for obj in objects:
        db.insert(str(folder / obj["file"]))
        if not db.fileForInstance(obj["sop_instance_uid"]):
            raise FVLMError(
                f"Slicer's DICOM database did not take {obj['file']} (SOP Instance UID "
                f"{obj['sop_instance_uid']}); see Slicer's log."
            )
        yield 0.0
    return objects


def segmenter_fields(result: Any) -> dict[str, Any]:
    """What made the analysed anatomies, as ``fvlm_core.commands.analyze.segmenter_identity``
    reads it (``segmentation``, ``backend``, ``fast``): the built-in segmenter, TotalSegmentator,
    or a segmentation of the scene (how it was made is not known: SEMIAUTOMATIC)."""
    source = str(result.segmentation.get("source", ""))
    details = result.segmentation.get("details") or {}
    if source in ("builtin", "totalsegmentator"):
        return {"segmentation": None, "backend": source, "fast": bool(details.get("fast", False))}
    return {"segmentation": "3D Slicer segmentation", "backend": "labelmap", "fast": False}
