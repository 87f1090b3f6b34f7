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
* ``FVLM.Result`` on the table node: the analysis result's JSON
  (:meth:`fvlm_core.zeroshot.results.AnalysisResult.to_json`).

:func:`show_steps` puts a result into the scene in short steps on the GUI thread (the label map
and the maps are copied into VTK a slab per step); the table node keeps the result's JSON
(``FVLM.Result``), so :func:`find_results` finds everything again in a reloaded scene. All of it
is ordinary MRML content, saved with the scene (.mrml/.mrb) and by the segmentation (.seg.nrrd)
and table (.tsv) storage nodes. No Qt.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from fvlm_core.zeroshot.results import AnalysisResult, AnatomyResult, FindingResult

from .mrml_io import (
    TAG_PREFIX,
    AnatomyLayer,
    get_segment_tag,
    image_steps,
    numpy_to_matrix,
    set_anatomy_segments,
)
from .overlay import overlay_image_steps, show_overlay
from .panel import flagged_text

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
ATTR_RESULT = "FVLM.Result"  # on the table node: the result's JSON

Row = tuple[AnatomyResult, FindingResult]


def rows(result: AnalysisResult) -> list[Row]:
    """``(anatomy, finding)`` of every finding, anatomy by anatomy."""
    return [(a, f) for a in result.anatomies for f in a.findings]


def number(value: float | None) -> float:
    """A value of the result as a table number (None, not scored: NaN, an empty cell)."""
    return math.nan if value is None else float(value)


@dataclass
class ResultNodes:
    """The MRML nodes holding one analysis, and the analysis."""

    segmentation: Any
    table: Any
    similarity_volumes: dict[tuple[str, str], Any] = field(default_factory=dict)
    result: AnalysisResult | None = None

    def value(self, key: tuple[str, str]) -> float:
        """Probability (or uncalibrated score) of ``(anatomy, finding)`` (0 when it was not scored)."""
        for a, f in rows(self.result) if self.result is not None else []:
            if (a.name, f.name) == key:
                return f.value or 0.0
        return 0.0


def _clean_tag(text: str) -> str:
    # the .seg.nrrd header stores tags as "name:value|": keep those characters out
    return text.replace("|", "/").replace(":", "-")


def finding_tag(kind: str, finding: str) -> str:
    """``FVLM.<kind>.<finding>`` (``kind`` one of :data:`FINDING_TAGS`)."""
    return f"{TAG_PREFIX}{kind}.{_clean_tag(finding)}"


def finding_tags(f: FindingResult) -> dict[str, str]:
    """The per-finding segment tags of one finding (a not-scored finding has none)."""
    if not f.scored:
        return {}
    kind = "probability" if f.calibrated else "uncalibratedScore"
    return {
        finding_tag(kind, f.name): f"{f.value:.4f}",
        finding_tag("threshold", f.name): f"{f.threshold:.4f}",
        finding_tag("rawScore", f.name): f"{f.raw_score:.4f}",
        finding_tag("scale", f.name): f.scale_text,
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


def anatomy_segments(segmentation_node: Any) -> dict[str, str]:
    """``{segment_id: anatomy}`` of a result segmentation: the ``FVLM.anatomy`` tag, else the ID
    (the anatomy name, as :func:`set_anatomy_segments` creates them)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return {sid: get_segment_tag(segmentation.GetSegment(sid), TAG_PREFIX + "anatomy", sid) for sid in ids}


def apply_to_segmentation(segmentation_node: Any, result: AnalysisResult) -> None:
    """Recolour segments and write tags for every anatomy of ``result`` (its segments as
    :func:`anatomy_segments` finds them)."""
    segmentation = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    by_anatomy: dict[str, list[str]] = {}
    for segment_id, anatomy in anatomy_segments(segmentation_node).items():
        by_anatomy.setdefault(anatomy, []).append(segment_id)
    for a in result.anatomies:
        flagged, top = a.flagged, a.max_flagged_value
        for segment_id in by_anatomy.get(a.name, []):
            segment = segmentation.GetSegment(segment_id)
            base = _parse_rgb(get_segment_tag(segment, TAG_PREFIX + "originalColor"))
            if base is None:
                base = tuple(segment.GetColor())
                segment.SetTag(TAG_PREFIX + "originalColor", ",".join(f"{c:.4f}" for c in base))
            segment.SetColor(*(highlight_color(base, top) if flagged else dimmed_color(base)))
            _remove_finding_tags(segment)
            segment.SetTag(TAG_PREFIX + "status", a.status)
            segment.SetTag(TAG_PREFIX + "findings", "; ".join(_clean_tag(f.name) for f in a.findings))
            segment.SetTag(TAG_PREFIX + "flagged", "; ".join(_clean_tag(f.name) for f in flagged))
            calibrated = all(f.calibrated for f in flagged)
            segment.RemoveTag(TAG_PREFIX + ("maxUncalibratedScore" if calibrated else "maxProbability"))
            segment.SetTag(
                TAG_PREFIX + ("maxProbability" if calibrated else "maxUncalibratedScore"), f"{top:.4f}"
            )
            for f in a.findings:
                for tag, text in finding_tags(f).items():
                    segment.SetTag(tag, text)
            if display is not None:
                display.SetSegmentOpacity2DFill(segment_id, fill_opacity(a))
                display.SetSegmentOpacity2DOutline(segment_id, 1.0 if flagged else 0.3)
                display.SetSegmentOpacity3D(segment_id, 1.0 if flagged else 0.1)


def percent(value: float | None, digits: int = 1) -> float:
    """A probability (or score) x100 with ``digits`` decimals (None or NaN: NaN, not scored)."""
    value = number(value)
    return value if math.isnan(value) else round(100.0 * value, digits)


def fill_opacity(a: AnatomyResult) -> float:
    """2D fill opacity of an anatomy: flagged ones opaque in proportion to the value."""
    return 0.5 + 0.5 * a.max_flagged_value if a.flagged else DIM_OPACITY


def outline_only(segmentation_node: Any, result: AnalysisResult, anatomy: str | None) -> None:
    """Draw ``anatomy`` as an outline (its similarity map is shown under it), the others filled."""
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    for a in result.anatomies:
        if segmentation.GetSegment(a.name) is not None:
            display.SetSegmentOpacity2DFill(a.name, 0.0 if a.name == anatomy else fill_opacity(a))


def table_values(a: AnatomyResult, f: FindingResult) -> tuple:
    """One row of the table node, in :data:`TABLE_COLUMNS` order."""
    nan = math.nan
    return (
        a.name,
        f.name,
        percent(f.value) if f.calibrated else nan,
        nan if f.calibrated else percent(f.value),
        percent(f.threshold),
        flagged_text(f),
        percent(f.raw_score, 2),
        percent(f.raw_threshold, 2),
        f.scale_text + (f": {f.calibration_note}" if f.calibration_note else ""),
        f.threshold_source,
        a.status,
        a.note,
    )


def fill_table(table_node: Any, result: AnalysisResult) -> Any:
    """Replace the table's content by one row per finding (values x100) and keep the result's JSON."""
    table_node.RemoveAllColumns()
    arrays = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray}
    columns = []
    for name, kind in TABLE_COLUMNS:
        column = arrays[kind]()
        column.SetName(name)
        table_node.AddColumn(column)
        columns.append(column)
    for a, f in rows(result):
        for column, value in zip(columns, table_values(a, f)):
            column.InsertNextValue(value)
    table_node.GetTable().Modified()
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # results are read-only in the table view
    table_node.SetAttribute(ATTR_RESULT, result.to_json())
    return table_node


def result_nodes(scene: Any, class_name: str, volume_node: Any) -> list[Any]:
    """Nodes of ``class_name`` this module made for ``volume_node``."""
    out = []
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if node.GetAttribute(ATTR_SOURCE_VOLUME) == volume_node.GetID():
            out.append(node)
    return out


def output_node(scene: Any, class_name: str, role: str, volume_node: Any, name: str) -> Any:
    """The result node of this role made for this volume before, or a new one."""
    for node in result_nodes(scene, class_name, volume_node):
        if node.GetAttribute(ATTR_ROLE) == role:
            return node
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(ATTR_ROLE, role)
    node.SetAttribute(ATTR_SOURCE_VOLUME, volume_node.GetID())
    return node


def _similarity_volumes(scene: Any, volume_node: Any) -> dict[tuple[str, str], Any]:
    return {
        tuple(node.GetAttribute(ATTR_SIMILARITY).split("|", 1)): node
        for node in result_nodes(scene, "vtkMRMLScalarVolumeNode", volume_node)
        if node.GetAttribute(ATTR_SIMILARITY)
    }


def show_steps(
    scene: Any, volume_node_id: str, result: AnalysisResult
) -> Generator[float, None, ResultNodes]:
    """Put a result (label map and maps memory-mapped) into the scene in short GUI-thread steps:
    the label map into VTK a slab per step, the segments, the table, each similarity map a slab
    per step, then the removal of maps an earlier run left for this volume."""
    from fvlm_core.anatomy import get_catalog

    volume = scene.GetNodeByID(volume_node_id)
    if volume is None:
        from fvlm_core.errors import InputError

        raise InputError("the analysed volume was removed from the scene before the results arrived.")
    catalog = get_catalog(result.anatomy_names)
    labels = result.labelmap
    image = slicer.vtkOrientedImageData()  # a segmentation's labelmap layer
    image = yield from image_steps(labels.shape, np.uint8, lambda z0, z1: labels[z0:z1], image)
    image.SetImageToWorldMatrix(numpy_to_matrix(result.geometry.affine_ras))
    seg = output_node(
        scene, "vtkMRMLSegmentationNode", "anatomies", volume, f"{volume.GetName()} FVLM anatomies"
    )
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    present = [a.name for a in result.anatomies if a.voxels > 0]
    set_anatomy_segments(seg, AnatomyLayer(image, present), catalog)
    apply_to_segmentation(seg, result)
    yield 0.0
    table = output_node(scene, "vtkMRMLTableNode", "findings", volume, f"{volume.GetName()} FVLM findings")
    fill_table(table, result)
    table.SetAttribute(ATTR_SEGMENTATION, seg.GetID())
    yield 0.0
    existing = _similarity_volumes(scene, volume)
    volumes = {}
    for a, f in rows(result):
        amap = result.similarity_maps.get((a.name, f.name))
        if not f.flagged or amap is None or a.box is None:
            continue
        overlay = yield from overlay_image_steps(amap, labels, catalog.label(a.name), a.box)
        node = existing.pop((a.name, f.name), None)
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"FVLM similarity {a.name}: {f.name}")
        node.SetAttribute(ATTR_SIMILARITY, f"{a.name}|{f.name}")
        node.SetAttribute(ATTR_SEGMENTATION, seg.GetID())
        node.SetAttribute(ATTR_SOURCE_VOLUME, volume.GetID())
        show_overlay(node, 100.0 * f.raw_threshold, scene)  # before the voxels: the maps are raw scores
        grid = result.geometry.sub_grid([b.start for b in a.box], [b.stop - b.start for b in a.box])
        node.SetIJKToRASMatrix(numpy_to_matrix(grid.affine_ras))
        node.SetAndObserveImageData(overlay)
        volumes[(a.name, f.name)] = node
        yield 0.0
    for stale in existing.values():  # maps of findings this run did not flag
        for i in reversed(range(stale.GetNumberOfDisplayNodes())):
            scene.RemoveNode(stale.GetNthDisplayNode(i))
        scene.RemoveNode(stale)
    return ResultNodes(seg, table, volumes, result)


def find_results(scene: Any, volume_node: Any = None) -> ResultNodes | None:
    """The results this module left in ``scene`` (for ``volume_node``, or the last analysed), e.g.
    after a saved scene was loaded; None when there are none (or their nodes are gone)."""
    tables = [
        scene.GetNthNodeByClass(i, "vtkMRMLTableNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode"))
    ]
    tables = [t for t in tables if t.GetAttribute(ATTR_ROLE) == "findings" and t.GetAttribute(ATTR_RESULT)]
    if volume_node is not None:
        tables = [t for t in tables if t.GetAttribute(ATTR_SOURCE_VOLUME) == volume_node.GetID()]
    for table in reversed(tables):
        volume = scene.GetNodeByID(table.GetAttribute(ATTR_SOURCE_VOLUME) or "")
        seg = scene.GetNodeByID(table.GetAttribute(ATTR_SEGMENTATION) or "")
        if volume is None or seg is None:
            continue
        result = AnalysisResult.from_json(table.GetAttribute(ATTR_RESULT))
        return ResultNodes(seg, table, _similarity_volumes(scene, volume), result)
    return None


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
