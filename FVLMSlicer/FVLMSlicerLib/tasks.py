"""What the analysis worker runs besides analyses: "Similar cases" and "Export to DICOM".

A task is a job folder (``job.TaskJob`` writes it) holding ``task.json``, ``{"task": name,
...}``, and the label-map layers it names; the worker (``worker.py``) runs :func:`run_task` on it
and writes what it returns as ``output.json``. Both tasks can take longer than a GUI step (a
store's first read or index, hashing the weights, building the DICOM objects), so they run in
the worker; both use fvlm_core only and need no Slicer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TASK_FILE = "task.json"
OUTPUT_FILE = "output.json"
#: The folder of a DICOM export inside the job folder (deleted with it once in the database).
DICOM_FOLDER = "dicom"

Report = Callable[[str, float], None]


def similar_cases(task: dict[str, Any], job: Path, report: Report) -> dict[str, Any]:
    """The scans of an embedding store most like each anatomy of one analysis.

    ``task``: ``store`` (a folder made by ``fvlm embed``), ``k`` (matches per anatomy),
    ``embeddings`` (the analysis' :class:`~fvlm_core.zeroshot.results.AnatomyEmbeddings` as JSON).
    A store of another model or other windows is refused before any vector is compared.

    Returns:
        ``{"store": description, "matches": {anatomy: [Match.to_dict(), ...]}, "notes": [...]}``,
        anatomies in the model's order; ``notes`` says why an anatomy has no matches.
    """
    from fvlm_core.errors import ConfigError, DataError
    from fvlm_core.store.format import EmbeddingStore, ModelIdentity, StoreInfo
    from fvlm_core.store.search import search_like
    from fvlm_core.zeroshot.results import AnatomyEmbeddings

    embeddings = AnatomyEmbeddings.from_dict(task["embeddings"])
    if not embeddings.model:
        raise ConfigError("this analysis does not record which model made its embeddings: analyse again.")
    report("similar cases: reading the store", 0.0)
    store = EmbeddingStore.open(task["store"])
    mine = StoreInfo(ModelIdentity.from_dict(embeddings.model), embeddings.windows, embeddings.max_window_zyx)
    store.check_identity(mine, what="compare this analysis with it")
    store.require_scans()
    anatomies = store.info.model.anatomies
    matches, notes = {}, []
    for i, anatomy in enumerate(anatomies):
        report(f"similar cases: {anatomy}", (i + 1) / (len(anatomies) + 1))
        if anatomy not in embeddings.vectors:
            notes.append(f"{anatomy}: not scored in this analysis, so nothing to compare.")
            continue
        try:
            found = search_like(store, embeddings.vectors, anatomy, int(task.get("k", 5)))
        except DataError as exc:  # no scan of the store has this anatomy scored
            notes.append(f"{anatomy}: {exc}")
            continue
        matches[anatomy] = [m.to_dict() for m in found]
    return {"store": store.describe(), "matches": matches, "notes": notes}


def dicom_export(task: dict[str, Any], job: Path, report: Report) -> dict[str, Any]:
    """The DICOM objects of one analysis (``fvlm analyze --dicom-out``'s SEG and SR) in ``JOB/dicom``.

    ``task``: ``files`` (the source series' files), ``result`` (the analysis result's JSON; its
    ``model`` folder is hashed for the objects' algorithm identification), ``segments`` (the
    anatomy segmentation's label-map layers as :class:`~fvlm_core.segmentation.labelmap.SegmentsBackend`
    takes them), ``segmenter`` (``segmentation``, ``backend``, ``fast``, as
    :func:`fvlm_core.commands.analyze.segmenter_identity` reads them).

    The segmentation painted from the layers must hold the analysed voxels exactly: segments
    edited after the analysis are refused (the report's volumes and findings describe the
    segments it analysed).

    Returns:
        :func:`fvlm_core.dicom.export_analysis`'s record of the files and their UIDs.
    """
    import argparse

    import numpy as np

    from fvlm_core.anatomy import get_catalog
    from fvlm_core.commands.analyze import segmenter_identity
    from fvlm_core.dicom import export_analysis
    from fvlm_core.errors import InputError
    from fvlm_core.model.config import load_config
    from fvlm_core.model.weights import WEIGHTS_NAME
    from fvlm_core.segmentation.labelmap import SegmentsBackend
    from fvlm_core.zeroshot.results import AnalysisResult

    result = AnalysisResult.from_dict(task["result"])
    model = Path(result.model)
    if not (model / WEIGHTS_NAME).is_file():
        raise InputError(
            f"the model this analysis used ({model}) is not there any more: the DICOM objects name the "
            "model by the SHA-256 of its weights. Put it back, or analyse again with a model that is there."
        )
    report("DICOM: the anatomy segmentation", 0.1)
    catalog = get_catalog(result.anatomy_names)
    # the layers are painted onto the CT grid; SegmentsBackend reads nothing of the CT but its grid
    seg = SegmentsBackend(task["segments"]).segment(SimpleNamespace(geometry=result.geometry), catalog)
    counts = np.bincount(seg.labelmap.ravel(), minlength=len(catalog) + 1)
    edited = [
        f"{a.name} ({counts[catalog.label(a.name)]} voxels now, {a.voxels} analysed)"
        for a in result.anatomies
        if counts[catalog.label(a.name)] != a.voxels
    ]
    if edited:
        raise InputError(
            "the anatomy segments were changed after the analysis: "
            + ", ".join(edited)
            + ". Analyse again before exporting, so that the report describes these segments."
        )
    report("DICOM: segmentation and structured report", 0.3)
    return export_analysis(
        task["files"],
        result.geometry,
        result.to_dict(),
        seg.labelmap,
        catalog,
        job / DICOM_FOLDER,
        model_dir=model,
        model_name=load_config(model).name,
        segmenter=segmenter_identity(argparse.Namespace(**task["segmenter"])),
    )


TASKS = {"similar": similar_cases, "dicom": dicom_export}


def run_task(
    task: dict[str, Any], job: Path, progress: Report, cancelled: Callable[[], bool]
) -> dict[str, Any]:
    """Run the task of ``task.json`` (:data:`TASKS`); each progress report may cancel it."""
    from fvlm_core.errors import CancelledError, ConfigError

    if task.get("task") not in TASKS:
        raise ConfigError(f"unknown task {task.get('task')!r}: this worker runs {', '.join(TASKS)}")

    def report(stage: str, fraction: float) -> None:
        if cancelled():
            raise CancelledError("cancelled")
        progress(stage, fraction)

    return TASKS[task["task"]](task, job, report)
