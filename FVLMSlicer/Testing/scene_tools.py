"""Test tools on a MRML scene: what the tests paint into segmentations and read back from them.

The module itself never needs these (its analyses read segmentations through
``mrml_io.segmentation_layers`` in the worker and write them with ``set_anatomy_segments``):
they set a segment's voxels from a mask, read a segment back as a mask or a whole segmentation
as an anatomy label map on a CT's grid, list a table node's rows, and save and load a scene as
one .mrb file, with Slicer's own calls (real MRML: ``slicer-core``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import slicer
from FVLMSlicerLib import mrml_io
from FVLMSlicerLib.headless import new_scene

from fvlm_core.anatomy import AnatomyCatalog
from fvlm_core.errors import GeometryError, InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import array_to_sitk, resample_to


def set_segment_mask(segmentation_node: Any, segment_id: str, mask: np.ndarray, geometry: Geometry) -> None:
    """Replace a segment's voxels by a boolean ``(Z, Y, X)`` mask on ``geometry``."""
    image = mrml_io._mask_to_oriented_image(mask.astype(np.uint8), geometry)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image,
        segmentation_node,
        segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
        image.GetExtent(),
    )
    if not ok:
        raise InputError(
            f"{segmentation_node.GetName()}: could not set the voxels of segment {segment_id!r}."
        )


def segment_mask(segmentation_node: Any, segment_id: str, reference: Geometry) -> np.ndarray:
    """Boolean ``(Z, Y, X)`` mask of one segment on the ``reference`` grid (nearest neighbour).

    Segments stored only as closed surfaces are converted to binary labelmaps first; the
    segmentation's (linear) parent transform is applied.
    """
    mrml_io._require_labelmaps(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    mrml_io._parent_to_world(segmentation_node)  # raises for a non-linear transform
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, image, True
    ):
        raise InputError(f"{segmentation_node.GetName()}: segment {segment_id!r} has no binary labelmap.")
    array, geometry = mrml_io._oriented_image_to_array(image)
    if geometry is None or array.size == 0:
        return np.zeros(reference.shape_zyx, dtype=bool)
    # segments may share one labelmap layer, each with its own label value
    label_value = segmentation.GetSegment(segment_id).GetLabelValue()
    binary = (array == label_value).astype(np.uint8)
    if geometry.same_grid(reference):
        return binary.astype(bool)
    try:
        resampled = resample_to(array_to_sitk(binary, geometry), reference, is_label=True, source=segment_id)
    except GeometryError:
        return np.zeros(reference.shape_zyx, dtype=bool)  # segment entirely outside the CT
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(resampled) > 0


def segmentation_node_to_labelmap(
    segmentation_node: Any,
    reference: Geometry,
    catalog: AnatomyCatalog,
    overrides: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """An anatomy label map (anatomy ``i`` = ``i + 1``) on ``reference`` from a segmentation node
    (blocking).

    Segments are painted in the segmentation's order: where anatomies overlap the later wins.

    Returns:
        ``(labelmap uint8 (Z, Y, X), {segment_id: anatomy})``.
    """
    mapping = mrml_io.map_segmentation(segmentation_node, catalog, overrides)
    out = np.zeros(reference.shape_zyx, dtype=np.uint8)
    for segment_id, anatomy in mapping.items():
        out[segment_mask(segmentation_node, segment_id, reference)] = catalog.label(anatomy)
    return out, mapping


def table_rows(table_node: Any) -> list[dict[str, str]]:
    """Rows of a table node as ``{column: text}`` (works on tables reloaded from .tsv)."""
    names = [table_node.GetColumnName(c) for c in range(table_node.GetNumberOfColumns())]
    return [
        {names[c]: table_node.GetCellText(r, c) for c in range(len(names))}
        for r in range(table_node.GetNumberOfRows())
    ]


def save_scene_mrb(scene: Any, path: str | os.PathLike) -> bool:
    """Write the scene and all its data into one .mrb file."""
    return bool(scene.WriteToMRB(str(path)))


def load_scene_mrb(path: str | os.PathLike) -> Any:
    """Read a .mrb into a new headless scene."""
    scene = new_scene()
    if not scene.ReadFromMRB(str(path)):
        raise OSError(f"{path}: could not be read as a Slicer scene bundle (.mrb)")
    return scene
