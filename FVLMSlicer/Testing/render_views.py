"""Offscreen rendering of Slicer slice views from a MRML scene, with Slicer's own pipeline.

Outside the Slicer application (``slicer-core``) the same classes that draw a slice view in Slicer
render it here into an offscreen VTK window:

* ``vtkMRMLSliceLogic`` reslices and blends the background, foreground and label layers with
  their display nodes (window/level, colour tables with their alpha, thresholds, opacity), the
  image ``qMRMLSliceWidget`` shows (``qMRMLSliceControllerWidget`` feeds its
  ``GetImageDataConnection`` to the view);
* the displayable managers a slice view instantiates draw on top: segmentations
  (``vtkMRMLSegmentationsDisplayableManager2D``, registered in Slicer by the Segmentations
  module) and colour legends (``vtkMRMLColorLegendDisplayableManager``, Colors module).

What is not reproduced: the Qt slice controller bar and annotations (corner text), and Slicer's
application-wide default settings (fonts, DPI). Used by the tests and by ``render_result.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

#: Displayable managers a Slicer slice view has for the nodes this module creates.
SLICE_DISPLAYABLE_MANAGERS = (
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLColorLegendDisplayableManager",
)


class SliceView:
    """One slice view ("Red", "Yellow", "Green") of a scene, rendered offscreen.

    Attributes:
        logic: the view's ``vtkMRMLSliceLogic``.
        node: its ``vtkMRMLSliceNode``; ``composite``: its ``vtkMRMLSliceCompositeNode``.
    """

    def __init__(self, scene: Any, app_logic: Any, name: str = "Red", size: tuple[int, int] = (512, 512)):
        self.size = size
        # the slice logic and the displayable managers keep only a raw pointer to the application
        # logic (as in Slicer, where it lives as long as the application): the view keeps it alive
        self.app_logic = app_logic
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        self.logic.SetMRMLScene(scene)
        self.node = self.logic.AddSliceNode(name)
        # Slicer's layout manager registers every view's slice logic with the application logic;
        # displayable managers (e.g. colour legends) find the view's composite node through it
        logics = app_logic.GetSliceLogics() or vtk.vtkCollection()
        logics.AddItem(self.logic)
        app_logic.SetSliceLogics(logics)
        self.node.SetDimensions(size[0], size[1], 1)
        self.composite = self.logic.GetSliceCompositeNode()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(self.mapper)
        self.renderer.AddViewProp(actor)
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app_logic)
        for manager in SLICE_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = factory.InstantiateDisplayableManagers(self.renderer)
        # InstantiateDisplayableManagers returns a New() object that VTK's wrapping does not know it
        # owns (Slicer's C++ takes it into a vtkSmartPointer): hand its reference to the wrapper, or
        # the managers would outlive the view and their application logic, still observing the
        # scene, and crash the interpreter at exit when the scene's colour logic removes its nodes
        self.managers.UnRegister(None)
        self.managers.SetMRMLDisplayableNode(self.node)

    def fit(self) -> None:
        """Fit the field of view to the background volume (Slicer's "reset field of view")."""
        self.logic.FitSliceToBackground(*self.size)

    def set_offset(self, offset: float) -> None:
        self.logic.SetSliceOffset(float(offset))

    def render(self) -> np.ndarray:
        """``(H, W, 3)`` uint8 screenshot, first row at the top (as on screen)."""
        self.logic.UpdatePipeline()
        # the logic builds a new blend output when layers change (qMRMLSliceControllerWidget
        # re-connects the view on imageDataConnectionChanged): connect the current one
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3]
        return np.ascontiguousarray(rgb[::-1])


def application_logic(scene: Any) -> Any:
    """A ``vtkSlicerApplicationLogic`` on ``scene`` (selection and interaction nodes)."""
    logic = slicer.vtkSlicerApplicationLogic()
    logic.SetMRMLScene(scene)
    return logic


def save_png(rgb: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path, optimize=True)
