"""A MRML scene outside the Slicer application (``pip install slicer-core``).

Inside Slicer the application sets up the segmentation converters, default colour tables and
the data I/O manager. Headless, :func:`new_scene` does the same minimum so that the module's
logic, saving/loading (.seg.nrrd, .tsv, .mrml, .mrb) and the tests work on real MRML.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import slicer


def register_segmentation_converters() -> None:
    """Register the labelmap/surface conversion rules once per process (Slicer does this at startup)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        if rule.__name__ not in have:
            factory.RegisterConverterRule(rule())


def new_scene(cache_dir: str | os.PathLike | None = None) -> Any:
    """A vtkMRMLScene ready for volumes, segmentations, tables and .mrb files."""
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir or tempfile.mkdtemp(prefix="fvlm-mrml-cache-")))
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    # default colour tables (Labels, GenericAnatomyColors, ...) and, as Slicer's Colors module
    # registers it at startup, the colour legend display node class
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    scene._fvlm_color_logic = colors  # keep the logic alive with the scene
    return scene
