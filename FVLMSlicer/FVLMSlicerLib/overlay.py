"""Similarity maps shown so that a reader can trust them: inside the anatomy, above a real level.

A similarity map (``fvlm_core.zeroshot.similarity``) holds, per voxel, the score of the encoder
token covering it: ``sigmoid(token . (t_pos - t_neg) / tau)``, the rule the anatomy-level
probability uses. It is 0 outside the anatomy's window, and inside it every voxel has a value,
so shown as-is it tints the whole slice. A map leaves the worker cropped to its anatomy's
bounding box and set to 0 outside the anatomy's voxels (``summary.AnatomyMap``); here it becomes
a percentage volume on that box, displayed with

* the colour table :data:`COLOR_TABLE_NAME`, whose lowest entry is fully transparent;
* a display threshold at the finding's decision threshold: a voxel is coloured only where its
  token alone would be called positive, every other voxel is transparent;
* the window spanning the threshold to the map's highest value inside the anatomy (the colours
  use their whole range), and a colour legend (title and % labels).

:func:`prepare_overlay` is array work for a background thread; :func:`show_overlay` only sets
MRML display properties (GUI thread). No Qt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fvlm_core.io import Geometry

from .summary import AnatomyMap

COLOR_TABLE_NAME = "FVLM similarity"
ATTR_COLOR_TABLE = "FVLM.SimilarityColorTable"
LEGEND_TITLE = "FVLM similarity (%)"
LEVELS = 256


@dataclass
class PreparedOverlay:
    """A similarity map ready for a volume node.

    Attributes:
        array: ``(Z, Y, X)`` float32 percentages on ``geometry`` (0 outside the anatomy).
        geometry: the anatomy's bounding box on the CT grid.
        threshold_percent: the finding's decision threshold, in percent.
        top_percent: the map's highest value inside the anatomy, in percent.
        image: ``array`` copied into VTK image data (by :func:`prepare_overlay`).
    """

    array: np.ndarray
    geometry: Geometry
    threshold_percent: float
    top_percent: float = 100.0
    image: Any = None  # the array as vtkImageData, made off the GUI thread


def prepare_overlay(similarity: AnatomyMap, geometry: Geometry, threshold: float) -> PreparedOverlay:
    """A map inside its anatomy (an :class:`~FVLMSlicerLib.summary.AnatomyMap`) in percent.

    Args:
        similarity: raw scores in [0, 1] in the anatomy's bounding box, 0 outside the anatomy.
        geometry: the CT grid.
        threshold: the finding's decision threshold in [0, 1].
    """
    from .mrml_io import array_to_image

    values = np.multiply(similarity.values, 100.0, dtype=np.float32)
    top = float(values.max())
    return PreparedOverlay(
        values,
        geometry.sub_grid(similarity.start, values.shape),
        100.0 * threshold,
        top,
        array_to_image(values),
    )


def overlay_rgba(level: float) -> tuple[float, float, float, float]:
    """The colour of table entry ``level`` in [0, 1]: transparent at 0, then dark red to yellow."""
    if level <= 0.0:
        return (0.0, 0.0, 0.0, 0.0)
    return (1.0, 0.15 + 0.85 * level, 0.1 * level, 0.75 + 0.25 * level)


def similarity_color_table(scene: Any) -> Any:
    """The scene's FVLM similarity colour table (created once; saved with the scene)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ATTR_COLOR_TABLE) == "1":
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(LEVELS)
    for i in range(LEVELS):
        node.SetColor(i, f"{100.0 * i / (LEVELS - 1):.0f}%", *overlay_rgba(i / (LEVELS - 1)))
    node.SetAttribute(ATTR_COLOR_TABLE, "1")
    node.SetAttribute("Category", "FVLM")
    return node


def show_overlay(volume_node: Any, threshold_percent: float, scene: Any, top_percent: float = 100.0) -> Any:
    """Display a similarity volume: colour table, threshold, window, legend (GUI thread).

    Call it before the volume gets its image: a display node created with automatic window and
    threshold on would compute them from the voxels (seconds for a large CT) on this thread.
    """
    import slicer

    display = volume_node.GetDisplayNode()
    if display is None:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.SetAutoWindowLevel(False)
        display.SetAutoThreshold(False)
        volume_node.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAndObserveColorNodeID(similarity_color_table(scene).GetID())
    display.SetAutoWindowLevel(False)
    lower = float(np.clip(threshold_percent, 0.0, 99.9))
    display.SetWindowLevelMinMax(lower, max(float(top_percent), lower + 1.0))
    display.SetAutoThreshold(False)
    display.SetApplyThreshold(True)
    display.SetThreshold(lower, 100.0)
    display.SetInterpolate(False)  # one token per patch: show the blocks, not a blur across them
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(volume_node)
    if legend is None:
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volume_node)
    legend.SetTitleText(LEGEND_TITLE)
    legend.SetSize(0.12, 0.4)  # a fraction of the view: leave the anatomy visible
    legend.SetLabelFormat("%.0f")  # the scalar bar prints "%%" as is: the unit is in the title
    return legend


def set_legend_visible(volume_node: Any, visible: bool) -> None:
    """Show the legend of the overlay on screen, hide the others'."""
    import slicer

    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(volume_node)
    if legend is not None:
        legend.SetVisibility(bool(visible))
        legend.Modified()  # views decide again whether the volume is shown (its layer may have changed)
