"""Similarity maps shown so that a reader can trust them: inside the anatomy, above a real level,
on a fixed colour scale.

A similarity map (``fvlm_core.zeroshot.similarity``) holds, per voxel, the score of the encoder
token covering it: ``sigmoid(token . (t_pos - t_neg) / tau)``, the rule the anatomy-level
probability uses. The result keeps it around the tokens that touch the anatomy
(``fvlm_core.zeroshot.results.AnatomyMap``); here it becomes a percentage volume on the
anatomy's bounding box, 0 outside the anatomy's voxels, displayed with

* the colour table :data:`COLOR_TABLE_NAME`, whose lowest entry is fully transparent;
* a display threshold at the finding's decision threshold: a voxel is coloured only where its
  token alone would be called positive, every other voxel is transparent;
* a fixed window, 0 to 100 %, the same for every map: a map whose tokens spread over 13-18 %
  stays dark red instead of filling the whole red-to-yellow ramp (which would look like a focal
  finding); and a colour legend (title and % labels).

:func:`overlay_image_steps` fills the volume's image a slab per step; :func:`show_overlay` only
sets MRML display properties. No Qt.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from .mrml_io import image_steps

COLOR_TABLE_NAME = "FVLM similarity"
ATTR_COLOR_TABLE = "FVLM.SimilarityColorTable"
LEGEND_TITLE = "FVLM similarity (%)"
LEVELS = 256
#: The colour window of every overlay, in percent (fixed: see the module docstring).
WINDOW_PERCENT = (0.0, 100.0)


def overlay_image_steps(
    amap: Any, labelmap: np.ndarray, label: int, box: tuple[slice, ...]
) -> Generator[float, None, Any]:
    """The map in percent on ``box`` (the anatomy's bounding box), 0 outside the anatomy's voxels
    (``labelmap == label``), as VTK image data filled a slab per step; returns the image."""
    (bz, by, bx) = box

    def fill(z0: int, z1: int) -> np.ndarray:
        sub = (slice(bz.start + z0, bz.start + z1), by, bx)
        return np.where(labelmap[sub] == label, 100.0 * amap.crop(sub), 0.0).astype(np.float32)

    shape = tuple(b.stop - b.start for b in box)
    return (yield from image_steps(shape, np.float32, fill))


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


def show_overlay(volume_node: Any, threshold_percent: float, scene: Any) -> Any:
    """Display a similarity volume: colour table, fixed window, threshold, legend (GUI thread).

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
    display.SetWindowLevelMinMax(*WINDOW_PERCENT)
    display.SetAutoThreshold(False)
    display.SetApplyThreshold(True)
    display.SetThreshold(float(np.clip(threshold_percent, 0.0, 99.9)), 100.0)
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
