"""Write the DICOM objects of one analysis into a folder: SEG, SR and (optionally) maps.

::

    source = read_source_series("ct_dicom/")                 # before the work: refuses what cannot be referenced
    ...                                                      # the analysis
    content = content_from_results(results, labels, catalog, model=..., segmenter=..., software_version=...)
    written = write_dicom(content, source.on_grid(ct.geometry), folder)

``folder`` receives ``seg.dcm``, ``sr.dcm`` and ``maps/<anatomy>__<finding>.dcm``; every object
gets new Study-level-unchanged, Series and SOP Instance UIDs (the study is the source's, its
patient and study attributes are copied, never made up). The caller makes it all-or-nothing
(:class:`fvlm_core.outputs.OutputPlan` stages the folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from fvlm_core.dicom.pmap import build_map
from fvlm_core.dicom.records import ExportContent, check_content, present_anatomies
from fvlm_core.dicom.seg import build_segmentation
from fvlm_core.dicom.source import SourceSeries
from fvlm_core.dicom.sr import build_report
from fvlm_core.errors import InputError
from fvlm_core.zeroshot.similarity import map_filename

SEG_FILE, SR_FILE, MAPS_FOLDER = "seg.dcm", "sr.dcm", "maps"


def write_dicom(content: ExportContent, source: SourceSeries, folder: str | os.PathLike) -> dict[str, Any]:
    """Write the objects of ``content`` (``source``: the CT's series, on the label map's grid).

    Returns:
        JSON-ready record of what was written: per object its file (relative to ``folder``),
        SOP Class, Series and SOP Instance UIDs; the SEG's segments (number -> anatomy).

    Raises:
        InputError: no analysed anatomy has voxels, an anatomy lacks a SNOMED CT code, a map
            names an anatomy not segmented.
    """
    folder = Path(folder)
    names = present_anatomies(content)
    if not names:
        raise InputError(
            "no analysed anatomy has voxels in the segmentation: there is nothing to write as DICOM"
        )
    check_content(content, names)
    seg = build_segmentation(content, source, names)
    _save(seg, folder / SEG_FILE)
    sr = build_report(content, source, seg, names)
    _save(sr, folder / SR_FILE)
    written = {
        "source_series": source.series_uid,
        "study": source.study_uid,
        "seg": {**_identity(seg, SEG_FILE), "segments": {str(n): name for n, name in enumerate(names, 1)}},
        "sr": _identity(sr, SR_FILE),
        "maps": [],
    }
    series_uid = generate_uid()
    for number, record in enumerate(content.maps, 1):
        name = f"{MAPS_FOLDER}/{map_filename(record.anatomy, record.finding, '.dcm')}"
        pm = build_map(record, content, source, series_uid, number)
        _save(pm, folder / name)
        written["maps"].append({**_identity(pm, name), "anatomy": record.anatomy, "finding": record.finding})
    return written


def _save(dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def _identity(dataset, file: str) -> dict[str, str]:
    return {
        "file": file,
        "sop_class_uid": str(dataset.SOPClassUID),
        "series_instance_uid": str(dataset.SeriesInstanceUID),
        "sop_instance_uid": str(dataset.SOPInstanceUID),
    }
