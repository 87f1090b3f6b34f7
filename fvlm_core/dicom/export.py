"""Write the DICOM objects of one analysis into a folder: SEG, SR and (optionally) maps.

::

    source = read_source_series("ct_dicom/")                 # before the work: refuses what cannot be referenced
    ...                                                      # the analysis
    content = content_from_results(results, labels, catalog, model_dir=..., model_name=..., segmenter=...)
    written = write_dicom(content, source.on_grid(ct.geometry), staged_folder)

``write_dicom`` fills a folder with ``seg.dcm``, ``sr.dcm`` and ``maps/<anatomy>__<finding>.dcm``;
every object gets new Series and SOP Instance UIDs in the source's study (its patient and study
attributes copied, never made up); the caller stages the folder (``fvlm analyze`` with its other
outputs). :func:`export_analysis` is the whole export in one call, for a caller that holds the
source files, the label map and the results (the 3D Slicer module): it checks everything first
and writes a new folder all at once, or nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from fvlm_core.anatomy import AnatomyCatalog
from fvlm_core.dicom.pmap import build_map
from fvlm_core.dicom.records import (
    Algorithm,
    ExportContent,
    check_content,
    content_from_results,
    present_anatomies,
)
from fvlm_core.dicom.seg import build_segmentation
from fvlm_core.dicom.source import SourceSeries, read_source_files
from fvlm_core.dicom.sr import build_report
from fvlm_core.errors import InputError
from fvlm_core.geometry import Geometry
from fvlm_core.outputs import OutputPlan

SEG_FILE, SR_FILE, MAPS_FOLDER = "seg.dcm", "sr.dcm", "maps"


def write_dicom(
    content: ExportContent,
    source: SourceSeries,
    folder: str | os.PathLike,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Write the objects of ``content`` (``source``: the CT's series, on the label map's grid);
    ``progress(message, fraction)`` hears of each object.

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
    say = progress or (lambda message, fraction: None)
    steps = 2 + len(content.maps)
    say("DICOM: segmentation", 0.0)
    seg = build_segmentation(content, source, names)
    _save(seg, folder / SEG_FILE)
    say("DICOM: structured report", 1 / steps)
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
    if content.maps:
        from fvlm_core.zeroshot.similarity import map_filenames  # (imports torch: only with maps)

        files = map_filenames([(r.anatomy, r.finding) for r in content.maps], ".dcm")
    for number, record in enumerate(content.maps, 1):
        say(f"DICOM: parametric map {number}/{len(content.maps)}", (1 + number) / steps)
        name = f"{MAPS_FOLDER}/{files[(record.anatomy, record.finding)]}"
        pm = build_map(record, content, source, series_uid, number)
        _save(pm, folder / name)
        written["maps"].append({**_identity(pm, name), "anatomy": record.anatomy, "finding": record.finding})
    say("DICOM: done", 1.0)
    return written


def export_analysis(
    source_files: Sequence[str | os.PathLike],
    geometry: Geometry,
    results: Mapping,
    labels: np.ndarray,
    catalog: AnatomyCatalog,
    folder: str | os.PathLike,
    *,
    model_dir: str | os.PathLike,
    model_name: str,
    segmenter: Algorithm,
    maps: Mapping[tuple[str, str], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write the DICOM objects of one analysis into the new folder ``folder`` (all or nothing).

    Args:
        source_files: the files of the analysed series (3D Slicer: the DICOM database's files of
            the volume's ``DICOM.instanceUIDs``), in any order.
        geometry: the CT grid ``labels`` and ``maps`` lie on (the volume read from those files).
        results: the analysis results as JSON (``fvlm analyze --out``).
        labels, catalog: the anatomy label map on ``geometry`` and its anatomies.
        folder: a folder that does not exist yet.
        model_dir, model_name: the model folder (its weights are hashed) and its name.
        segmenter: what made ``labels``.
        maps: ``(anatomy, finding) -> (Z, Y, X)`` similarity maps to write as Parametric Maps.

    Returns:
        :func:`write_dicom`'s record, with ``folder`` and ``model`` (name, weights SHA-256).

    Raises:
        InputError, OutputError: the series cannot be referenced or does not lie on
            ``geometry``, or ``folder`` exists or cannot be written; nothing is written then.
    """
    plan = OutputPlan()
    plan.inputs("source", source_files)
    plan.folder("DICOM folder", folder, replace=True, new=True)
    plan.check()
    source = read_source_files(source_files).on_grid(geometry)
    content = content_from_results(
        results, labels, catalog, model_dir=model_dir, model_name=model_name, segmenter=segmenter, maps=maps
    )
    with plan.writing() as staged:
        written = write_dicom(content, source, staged.path("DICOM folder"))
    return {**written, "folder": str(folder), "model": model_record(content)}


def model_record(content: ExportContent) -> dict[str, str]:
    """The model as the results JSON records it beside the objects."""
    return {"name": content.model.name, "weights_sha256": content.model.version}


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
