"""Analysis results -> MRML: highlighted segments, segment tags, a table node, similarity maps.

* Segments of anatomies with a flagged finding are recoloured from the anatomy's colour toward
  a highlight red in proportion to the highest flagged value and drawn opaque; the other
  segments are dimmed (greyed, low opacity). The original colour is kept in a tag so repeated
  runs do not compound.
* Each segment carries, per finding, ``FVLM.probability.<finding>`` (``"0.7342"``, the calibrated
  probability) or, for a finding the model has no calibration of,
  ``FVLM.uncalibratedScore.<finding>`` (never called a probability); ``FVLM.threshold.<finding>``
  on that same scale; ``FVLM.rawScore.<finding>``; ``FVLM.scale.<finding>`` (``probability
  (Platt)`` / ``uncalibrated score``); and ``FVLM.flagged`` (``"; "``-separated names),
  ``FVLM.findings`` (all scored names), ``FVLM.maxProbability`` (or ``FVLM.maxUncalibratedScore``
  when a flagged finding is uncalibrated), ``FVLM.status``.
* A table node lists anatomy, finding, probability (%) or uncalibrated score (x100), the
  threshold on that scale, flagged (Yes/No), the raw score and raw threshold (x100), the
  calibration, threshold source, status and note, one row per finding.
* Similarity maps of flagged findings become percentage volumes over their anatomy's box,
  displayed as overlays (``overlay.py``) above the raw threshold (the maps are raw scores).

The voxel work (label map and maps into VTK objects) is :func:`prepare_results`, which runs in a
background thread; what touches the scene is small (:func:`apply_to_segmentation`,
:func:`fill_table`, :func:`set_similarity_volume`). All of it is ordinary MRML content, so it is
saved with the scene (.mrml/.mrb) and by the segmentation (.seg.nrrd) and table (.tsv) storage
nodes. No Qt.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import vtk

from fvlm_core.anatomy import AnatomyCatalog
from fvlm_core.io import Geometry

from .mrml_io import TAG_PREFIX, AnatomyLayer, anatomy_layer, get_segment_tag, set_volume_image
from .overlay import PreparedOverlay, prepare_overlay, show_overlay
from .panel import flagged_text
from .summary import AnalysisSummary

HIGHLIGHT_RGB = (1.0, 0.12, 0.08)
DIM_OPACITY = 0.15
TABLE_COLUMNS = (
    ("anatomy", "string"),
    ("finding", "string"),
    ("probability (%)", "double"),  # calibrated; empty where uncalibrated or not scored
    ("uncalibrated score (x100)", "double"),  # the raw score where the finding has no calibration
    ("threshold (same scale)", "double"),  # on the scale of the row's probability or score
    ("flagged", "string"),
    ("raw score (x100)", "double"),
    ("raw threshold (x100)", "double"),
    ("calibration", "string"),
    ("threshold source", "string"),
    ("status", "string"),
    ("note", "string"),
)
#: Per-finding segment tags (``FVLM.<kind>.<finding>``), removed before a new analysis writes its own.
FINDING_TAGS = ("probability", "uncalibratedScore", "threshold", "rawScore", "scale")

#: Node attribute linking result nodes to the analysis (value: the segmentation node ID).
ATTR_SEGMENTATION = "FVLM.SegmentationNodeID"
ATTR_SIMILARITY = "FVLM.SimilarityMap"  # value: "anatomy|finding"
ATTR_ROLE = "FVLM.Role"
ATTR_SOURCE_VOLUME = "FVLM.SourceVolumeNodeID"


@dataclass
class ResultNodes:
    """The MRML nodes holding one analysis."""

    segmentation: Any
    table: Any
    similarity_volumes: dict[tuple[str, str], Any] = field(default_factory=dict)
    summary: AnalysisSummary | None = None

    @property
    def summary_rows(self) -> list:
        return self.summary.rows() if self.summary is not None else []

    def value(self, key: tuple[str, str]) -> float:
        """Probability (or uncalibrated score) of ``(anatomy, finding)`` (0 when it was not scored)."""
        return next((r.value for r in self.summary_rows if (r.anatomy, r.finding) == key), 0.0)


def _clean_tag(text: str) -> str:
    # the .seg.nrrd header stores tags as "name:value|": keep those characters out
    return text.replace("|", "/").replace(":", "-")


def finding_tag(kind: str, finding: str) -> str:
    """``FVLM.<kind>.<finding>`` (``kind`` one of :data:`FINDING_TAGS`)."""
    return f"{TAG_PREFIX}{kind}.{_clean_tag(finding)}"


def probability_tag(finding: str) -> str:
    return finding_tag("probability", finding)


def finding_tags(row) -> dict[str, str]:
    """The per-finding segment tags of one :class:`FindingRow` (a not-scored finding has none)."""
    if not row.scored:
        return {}
    kind = "probability" if row.calibrated else "uncalibratedScore"
    return {
        finding_tag(kind, row.finding): f"{row.value:.4f}",
        finding_tag("threshold", row.finding): f"{row.threshold:.4f}",
        finding_tag("rawScore", row.finding): f"{row.raw_score:.4f}",
        finding_tag("scale", row.finding): row.scale_text,
    }


def _remove_finding_tags(segment: Any) -> None:
    """Remove the per-finding tags an earlier analysis left (its findings are in FVLM.findings)."""
    for name in (get_segment_tag(segment, TAG_PREFIX + "findings") or "").split("; "):
        for kind in FINDING_TAGS:
            segment.RemoveTag(f"{TAG_PREFIX}{kind}.{name}")


def highlight_color(base_rgb: tuple[float, float, float], probability: float) -> tuple[float, float, float]:
    """Colour of a flagged anatomy: the anatomy colour moved toward red by ``probability``."""
    p = float(np.clip(probability, 0.0, 1.0))
    return tuple(float((1 - p) * b + p * h) for b, h in zip(base_rgb, HIGHLIGHT_RGB))


def dimmed_color(base_rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """Colour of an anatomy with nothing flagged: desaturated and darker."""
    h, s, v = colorsys.rgb_to_hsv(*base_rgb)
    return colorsys.hsv_to_rgb(h, s * 0.25, v * 0.6)


def _parse_rgb(text: str | None) -> tuple[float, float, float] | None:
    try:
        values = tuple(float(v) for v in (text or "").split(","))
        return values if len(values) == 3 else None
    except ValueError:
        return None


def apply_to_segmentation(segmentation_node: Any, summary: AnalysisSummary) -> None:
    """Recolour segments and write tags for every anatomy of ``summary``.

    Segments are found by ID (the anatomy name, as :func:`labelmap_to_segmentation_node`
    creates them) or by the ``FVLM.anatomy`` tag.
    """
    segmentation = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    by_anatomy: dict[str, list[str]] = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        anatomy = get_segment_tag(segment, TAG_PREFIX + "anatomy", segment_id)
        by_anatomy.setdefault(anatomy, []).append(segment_id)

    for result in summary.anatomies:
        for segment_id in by_anatomy.get(result.name, []):
            segment = segmentation.GetSegment(segment_id)
            base = _parse_rgb(get_segment_tag(segment, TAG_PREFIX + "originalColor"))
            if base is None:
                base = tuple(segment.GetColor())
                segment.SetTag(TAG_PREFIX + "originalColor", ",".join(f"{c:.4f}" for c in base))
            flagged = result.flagged
            p_max = result.max_value
            segment.SetColor(*(highlight_color(base, p_max) if flagged else dimmed_color(base)))
            _remove_finding_tags(segment)
            segment.SetTag(TAG_PREFIX + "status", result.status)
            segment.SetTag(TAG_PREFIX + "findings", "; ".join(_clean_tag(f.finding) for f in result.findings))
            segment.SetTag(TAG_PREFIX + "flagged", "; ".join(_clean_tag(f.finding) for f in flagged))
            calibrated = all(f.calibrated for f in flagged)
            segment.RemoveTag(TAG_PREFIX + ("maxUncalibratedScore" if calibrated else "maxProbability"))
            segment.SetTag(
                TAG_PREFIX + ("maxProbability" if calibrated else "maxUncalibratedScore"), f"{p_max:.4f}"
            )
            for f in result.findings:
                for tag, text in finding_tags(f).items():
                    segment.SetTag(tag, text)
            if display is not None:
                display.SetSegmentOpacity2DFill(segment_id, fill_opacity(result))
                display.SetSegmentOpacity2DOutline(segment_id, 1.0 if flagged else 0.3)
                display.SetSegmentOpacity3D(segment_id, 1.0 if flagged else 0.1)


def percent(value: float, digits: int = 1) -> float:
    """A probability (or score) x100 with ``digits`` decimals (NaN stays NaN: not scored)."""
    return float("nan") if math.isnan(value) else round(100.0 * float(value), digits)


def fill_opacity(result) -> float:
    """2D fill opacity of an anatomy: flagged ones opaque in proportion to the value."""
    return 0.5 + 0.5 * result.max_value if result.flagged else DIM_OPACITY


def outline_only(segmentation_node: Any, summary: AnalysisSummary, anatomy: str | None) -> None:
    """Draw ``anatomy`` as an outline (its similarity map is shown under it), the others filled."""
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    for result in summary.anatomies:
        if segmentation.GetSegment(result.name) is not None:
            opacity = 0.0 if result.name == anatomy else fill_opacity(result)
            display.SetSegmentOpacity2DFill(result.name, opacity)


def table_values(row, note: str) -> tuple:
    """One row of the table node, in :data:`TABLE_COLUMNS` order."""
    nan = float("nan")
    return (
        row.anatomy,
        row.finding,
        percent(row.value) if row.calibrated else nan,
        nan if row.calibrated else percent(row.value),
        percent(row.threshold),
        flagged_text(row),
        percent(row.raw_score, 2),
        percent(row.raw_threshold, 2),
        row.scale_text + (f": {row.calibration_note}" if row.calibration_note else ""),
        row.threshold_source,
        row.status,
        note,
    )


def fill_table(table_node: Any, summary: AnalysisSummary) -> Any:
    """Replace the table's content by one row per finding (values x100)."""
    table_node.RemoveAllColumns()
    arrays = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray}
    columns = []
    for name, kind in TABLE_COLUMNS:
        column = arrays[kind]()
        column.SetName(name)
        table_node.AddColumn(column)
        columns.append(column)
    notes = {a.name: a.note for a in summary.anatomies}
    for row in summary.rows():
        for column, value in zip(columns, table_values(row, notes.get(row.anatomy, ""))):
            column.InsertNextValue(value)
    table_node.GetTable().Modified()
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # results are read-only in the table view
    return table_node


def table_rows(table_node: Any) -> list[dict[str, str]]:
    """Rows of a table node as ``{column: text}`` (works on tables reloaded from .tsv)."""
    names = [table_node.GetColumnName(c) for c in range(table_node.GetNumberOfColumns())]
    return [
        {names[c]: table_node.GetCellText(r, c) for c in range(len(names))}
        for r in range(table_node.GetNumberOfRows())
    ]


@dataclass
class PreparedResults:
    """A finished analysis converted for MRML off the GUI thread (see :func:`prepare_results`).

    Attributes:
        summary: the analysis summary.
        layer: the anatomy label map as a VTK image plus the anatomies present in it.
        overlays: ``{(anatomy, finding): PreparedOverlay}`` for flagged findings with a map.
        catalog: the model's anatomies.
    """

    summary: AnalysisSummary
    layer: AnatomyLayer
    overlays: dict[tuple[str, str], PreparedOverlay]
    catalog: AnatomyCatalog


def prepare_results(
    summary: AnalysisSummary, labelmap: np.ndarray, geometry: Geometry, catalog: AnatomyCatalog
) -> PreparedResults:
    """Array work for showing an analysis: safe in a background thread (no scene access).

    Args:
        labelmap: ``(Z, Y, X)`` anatomy labels on the CT grid ``geometry``.
    """
    flagged = {(r.anatomy, r.finding): r for r in summary.rows() if r.flagged}
    # the maps are per-token raw scores: shown above the raw threshold
    overlays = {
        key: prepare_overlay(amap, geometry, flagged[key].raw_threshold)
        for key, amap in summary.similarity_maps.items()
        if key in flagged
    }
    return PreparedResults(summary, anatomy_layer(labelmap, geometry, catalog), overlays, catalog)


def set_similarity_volume(
    scene: Any, node: Any, key: tuple[str, str], prepared: PreparedOverlay, segmentation_node: Any
) -> Any:
    """Put one prepared overlay into a scalar volume node and display it (GUI thread).

    Args:
        node: the volume node to fill (``None``: a new one).
    """
    anatomy, finding = key
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"FVLM similarity {anatomy}: {finding}")
    node.SetAttribute(ATTR_SIMILARITY, f"{anatomy}|{finding}")
    node.SetAttribute(ATTR_SEGMENTATION, segmentation_node.GetID())
    show_overlay(node, prepared.threshold_percent, scene, prepared.top_percent)  # before the voxels
    set_volume_image(node, prepared.image, prepared.geometry)
    return node


def anatomy_center_ras(segmentation_node: Any, anatomy: str) -> tuple[float, float, float] | None:
    """RAS centre of an anatomy's segment (where the slice views jump for a table row)."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = anatomy if segmentation.GetSegment(anatomy) is not None else None
    if segment_id is None:
        for i in range(segmentation.GetNumberOfSegments()):
            sid = segmentation.GetNthSegmentID(i)
            if get_segment_tag(segmentation.GetSegment(sid), TAG_PREFIX + "anatomy") == anatomy:
                segment_id = sid
                break
    if segment_id is None:
        return None
    center = segmentation_node.GetSegmentCenterRAS(segment_id)
    return None if center is None else tuple(float(c) for c in center)
