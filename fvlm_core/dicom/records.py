"""What a DICOM export needs from an analysis, and nothing more.

The writers (:mod:`fvlm_core.dicom.export`) take an :class:`ExportContent`: the anatomy label map
on the CT grid with its catalog, per anatomy its volume and its findings (value, calibrated or
not, threshold, flagged), the model's name and weights digest, the segmenter, and optionally the
similarity maps. :func:`content_from_results` builds it from the analysis results as
``fvlm analyze`` writes them to JSON, so the objects carry exactly the JSON's numbers; it is the
one place that knows that layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fvlm_core import __version__
from fvlm_core.anatomy import AnatomyCatalog
from fvlm_core.errors import InputError
from fvlm_core.model.weights import weights_sha256


@dataclass(frozen=True)
class FindingRecord:
    """One scored finding on one anatomy.

    Attributes:
        name: the finding (``"Pleural effusion"``).
        value: the calibrated probability when ``calibrated``, else the raw (uncalibrated) score.
        calibrated: whether ``value`` is a probability.
        threshold: the decision threshold on the scale of ``value``.
        flagged: whether the finding is flagged (``value > threshold``).
    """

    name: str
    value: float
    calibrated: bool
    threshold: float
    flagged: bool


@dataclass(frozen=True)
class AnatomyRecord:
    """One anatomy of the analysis: its volume and its scored findings."""

    name: str
    volume_ml: float
    findings: tuple[FindingRecord, ...] = ()


@dataclass(frozen=True)
class Algorithm:
    """Who computed something: a name and a version (for the model, its weights' SHA-256).

    ``kind`` is the DICOM Segment Algorithm Type (``AUTOMATIC``, ``SEMIAUTOMATIC``); ``family``
    the CID 7162 family (``"ai"``, ``"morphology"``, ``"manual"``).
    """

    name: str
    version: str
    kind: str = "AUTOMATIC"
    family: str = "ai"


@dataclass(frozen=True)
class MapRecord:
    """A similarity map of one finding on one anatomy, ``(Z, Y, X)`` float32 on the CT grid."""

    anatomy: str
    finding: str
    array: np.ndarray


@dataclass(frozen=True)
class ExportContent:
    """Everything the DICOM writers need (see the module docstring).

    Attributes:
        labels: ``(Z, Y, X)`` integer anatomy label map on the CT grid; anatomy ``i`` of
            ``catalog`` is ``i + 1``.
        catalog: the anatomies of ``labels`` (names, SNOMED CT codes, colours).
        anatomies: the analysed anatomies with their volumes and scored findings.
        model: the model (name, weights SHA-256).
        segmenter: what made ``labels``.
        software_version: the fvlm version that wrote the objects.
        maps: similarity maps to write (``--dicom-maps``).
    """

    labels: np.ndarray
    catalog: AnatomyCatalog
    anatomies: tuple[AnatomyRecord, ...]
    model: Algorithm
    segmenter: Algorithm
    software_version: str
    maps: tuple[MapRecord, ...] = field(default=())


def content_from_results(
    results: Mapping,
    labels: np.ndarray,
    catalog: AnatomyCatalog,
    *,
    model_dir: str | os.PathLike,
    model_name: str,
    segmenter: Algorithm,
    maps: Mapping[tuple[str, str], np.ndarray] | None = None,
) -> ExportContent:
    """The export content of one analysis, from its results JSON (``fvlm analyze --out``).

    Args:
        results: the results dict as written to JSON (``anatomies[*].findings[*]`` with
            ``value``, ``scale``, ``threshold``, ``flagged``; ``volume_ml``).
        labels: the anatomy label map on the CT grid, in ``catalog``'s values.
        catalog: the anatomies of ``labels``.
        model_dir, model_name: the model folder (its weights are hashed: the model's version)
            and its name.
        segmenter: what made ``labels``.
        maps: ``(anatomy, finding) -> (Z, Y, X)`` similarity maps to write, or None.

    Findings that were not scored (their anatomy was absent or cut by a window cap) are left
    out: the SR reports what the model said, nothing else.
    """
    anatomies = []
    for a in results.get("anatomies", []):
        if a["name"] not in catalog:
            raise InputError(f"anatomy {a['name']!r} of the results is not in the label map's catalog")
        findings = tuple(
            FindingRecord(
                name=str(f["name"]),
                value=float(f["value"]),
                calibrated=f["scale"] == "probability",
                threshold=float(f["threshold"]),
                flagged=bool(f["flagged"]),
            )
            for f in a.get("findings", [])
            if f.get("value") is not None
        )
        anatomies.append(AnatomyRecord(str(a["name"]), float(a["volume_ml"]), findings))
    return ExportContent(
        labels=np.asarray(labels),
        catalog=catalog,
        anatomies=tuple(anatomies),
        model=Algorithm(model_name, weights_sha256(model_dir)),
        segmenter=segmenter,
        software_version=__version__,
        maps=tuple(MapRecord(anat, name, arr) for (anat, name), arr in (maps or {}).items()),
    )


def present_anatomies(content: ExportContent) -> list[str]:
    """The analysed anatomies that have voxels in the label map, in catalog order (the SEG's
    segments, numbered from 1 in this order)."""
    counts = np.bincount(
        np.asarray(content.labels).ravel().astype(np.int64), minlength=len(content.catalog) + 1
    )
    wanted = {a.name for a in content.anatomies}
    return [n for i, n in enumerate(content.catalog.names) if n in wanted and counts[i + 1] > 0]


def check_content(content: ExportContent, names: Sequence[str]) -> None:
    """Refuse an export whose anatomies lack a SNOMED CT code or whose maps name other anatomies."""
    uncoded = [n for n in names if not content.catalog[n].snomed]
    if uncoded:
        raise InputError(
            f"anatomies without a SNOMED CT code cannot be written as DICOM segments: {', '.join(uncoded)}. "
            "Give them a code in the anatomy catalog."
        )
    stray = sorted({m.anatomy for m in content.maps} - set(names))
    if stray:
        raise InputError(f"similarity maps of anatomies not in the segmentation: {', '.join(stray)}")
