"""FVLM: anatomy-level zero-shot findings on CT (3D Slicer scripted module).

Thin layer: module metadata, the panel (widget), the logic facade and a self-test. The work
is in ``FVLMSlicerLib`` (no Qt) and ``fvlm_core``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# fvlm_core lives next to this file in a built extension and one folder up in a source checkout.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isfile(os.path.join(_candidate, "fvlm_core", "__init__.py")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)
        break

from FVLMSlicerLib.logic import AnalysisLogic

README_URL = "https://github.com/fvlm-slicer/fvlm-slicer#3d-slicer-extension"


class FVLMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FVLM"
        self.parent.categories = ["Segmentation", "Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["fVLM for 3D Slicer contributors"]
        self.parent.helpText = (
            "Flags findings per anatomy on a CT with fVLM (Shui et al., ICLR 2025): the CT is segmented "
            "into anatomies (or an existing segmentation, e.g. from TotalSegmentator, is reused), each "
            "anatomy is embedded by the model and compared with text prompts of findings. Flagged "
            "anatomies are highlighted, probabilities are listed in a table and stored in segment tags. "
            f'<br>Documentation: <a href="{README_URL}">README</a>. '
            "Not for clinical use."
        )
        self.parent.acknowledgementText = (
            "fVLM: Shui et al., Large-scale and Fine-grained Vision-language Pre-training for Enhanced "
            "CT Image Understanding, ICLR 2025. Built on MONAI, PyTorch and 3D Slicer."
        )


@parameterNodeWrapper
class FVLMSlicerParameterNode:
    """Panel state, saved with the scene. Names match the .ui's SlicerParameterName properties."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    anatomySource: Annotated[str, Choice(["builtin", "segmentation", "totalsegmentator"])] = "builtin"
    inputSegmentation: slicer.vtkMRMLSegmentationNode
    modelDir: pathlib.Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    similarityMaps: bool = True


class FVLMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._context = None
        self._results = None
        self._modelAnatomies: list[str] = []
        self._layoutTableView = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FVLMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FVLMSlicerLogic()

        self.ui.findingsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.addFindingButton.connect("clicked(bool)", self.onAddFinding)
        self.ui.newFindingLineEdit.connect("returnPressed()", self.onAddFinding)
        self.ui.removeFindingButton.connect("clicked(bool)", self.onRemoveFindings)
        self.ui.resetFindingsButton.connect("clicked(bool)", self.onResetFindings)
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyze)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.resultsTableView.connect("selectionChanged()", lambda: self.onResultRowSelected())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        if not str(self._parameterNode.modelDir or "").strip(". "):
            remembered = self.logic.resolve_model_dir_or_empty()
            if remembered:
                self._parameterNode.modelDir = pathlib.Path(remembered)
        self.onModelChanged()

    def cleanup(self) -> None:
        self.onCancel()
        self._pollTimer.stop()
        self.removeObservers()
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(FVLMSlicerParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, node) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._job is not None
        ready = bool(p and p.inputVolume) and not running
        if p and p.anatomySource == "segmentation":
            ready = ready and bool(p.inputSegmentation)
        self.ui.analyzeButton.enabled = ready
        self.ui.cancelButton.enabled = running
        self.ui.inputSegmentationSelector.enabled = bool(p and p.anatomySource == "segmentation")

    # --- findings table ----------------------------------------------------------------------
    def onModelChanged(self, *args) -> None:
        """Pre-fill the findings table and anatomy list from the model's configuration."""
        from FVLMSlicerLib.settings import read_model_info

        path = self.ui.modelPathLineEdit.currentPath
        try:
            info = read_model_info(self.logic.resolve_model_dir(path))
        except Exception as exc:  # no model yet: keep the table, say why
            self.ui.statusLabel.text = str(exc)
            return
        self._modelAnatomies = info.anatomies
        self.ui.newFindingAnatomyComboBox.clear()
        for name in info.anatomies:
            self.ui.newFindingAnatomyComboBox.addItem(name)
        self._setFindingRows([(f["name"], f["anatomy"]) for f in info.findings])
        self.ui.statusLabel.text = (
            f"Model {info.name}: {len(info.findings)} findings on {', '.join(info.anatomies)}."
        )

    def _setFindingRows(self, rows) -> None:
        table = self.ui.findingsTable
        table.setRowCount(0)
        for name, anatomy in rows:
            self._appendFindingRow(name, anatomy)

    def _appendFindingRow(self, name: str, anatomy: str) -> None:
        table = self.ui.findingsTable
        r = table.rowCount
        table.insertRow(r)
        table.setItem(r, 0, qt.QTableWidgetItem(name))
        combo = qt.QComboBox()
        for a in self._modelAnatomies or [anatomy]:
            combo.addItem(a)
        combo.setCurrentText(anatomy)
        table.setCellWidget(r, 1, combo)

    def _findingRows(self) -> list[tuple[str, str]]:
        table = self.ui.findingsTable
        rows = []
        for r in range(table.rowCount):
            item = table.item(r, 0)
            combo = table.cellWidget(r, 1)
            if item is not None and item.text().strip() and combo is not None:
                rows.append((item.text().strip(), combo.currentText))
        return rows

    def onAddFinding(self, *args) -> None:
        name = self.ui.newFindingLineEdit.text.strip()
        anatomy = self.ui.newFindingAnatomyComboBox.currentText
        if not name or not anatomy:
            self.ui.statusLabel.text = "Type a finding and choose its anatomy, then click Add."
            return
        self._appendFindingRow(name, anatomy)
        self.ui.newFindingLineEdit.clear()

    def onRemoveFindings(self, *args) -> None:
        table = self.ui.findingsTable
        rows = sorted({index.row() for index in table.selectedIndexes()}, reverse=True)
        for r in rows:
            table.removeRow(r)

    def onResetFindings(self, *args) -> None:
        self.onModelChanged()

    # --- running -----------------------------------------------------------------------------
    def onAnalyze(self, *args) -> None:
        from FVLMSlicerLib import dependencies

        p = self._parameterNode
        try:
            if p.anatomySource == "totalsegmentator" and not dependencies.totalsegmentator_available():
                slicer.util.errorDisplay(
                    "TotalSegmentator is not installed in Slicer. Install the TotalSegmentator extension "
                    "(Extensions Manager) and run it once, or choose the 'builtin' anatomy source, or select "
                    "an existing segmentation."
                )
                return
            if not dependencies.ensure_dependencies(ask=True):
                self.ui.statusLabel.text = "Dependencies not installed: analysis not started."
                return
            from FVLMSlicerLib.runner import findings_from_rows

            findings = findings_from_rows(self._findingRows()) or None
            self._job, self._context = self.logic.start(
                p.inputVolume,
                p.inputSegmentation if p.anatomySource == "segmentation" else None,
                model_dir=str(p.modelDir or ""),
                anatomy_source=p.anatomySource,
                findings=findings,
                device=p.device,
                similarity_maps=p.similarityMaps,
                background="process",
                python=pythonSlicerExecutable(),
            )
        except Exception as exc:
            self._job = None
            slicer.util.errorDisplay(f"Analysis could not start: {exc}")
            logging.exception("FVLM: analysis could not start")
            self._updateButtons()
            return
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting..."
        self._updateButtons()
        self._pollTimer.start()

    def onCancel(self, *args) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def onPoll(self) -> None:
        if self._job is None:
            self._pollTimer.stop()
            return
        status = self._job.poll()
        self.ui.progressBar.value = int(100 * status.fraction)
        self.ui.statusLabel.text = f"{status.stage} ({status.elapsed_s:.0f} s)"
        if not status.finished:
            return
        self._pollTimer.stop()
        job, context, self._job = self._job, self._context, None
        self.ui.progressBar.visible = False
        self._updateButtons()
        if status.state == "cancelled":
            self.ui.statusLabel.text = "Cancelled."
            return
        if status.state == "failed":
            self.ui.statusLabel.text = (
                "Failed: " + status.error.splitlines()[-1] if status.error else "Failed."
            )
            slicer.util.errorDisplay(f"FVLM analysis failed:\n\n{status.error}")
            return
        if hasattr(job, "cleanup"):
            job.cleanup()  # the results are in memory now (status.output)
        with slicer.util.tryWithErrorDisplay("Could not show the FVLM results.", waitCursor=True):
            self._results = self.logic.finish(status, context)
            self.showResults(self._results)
        rows = self._results.summary_rows if self._results else []
        flagged = [r for r in rows if r.flagged]
        self.ui.statusLabel.text = (
            f"Done in {status.elapsed_s:.1f} s on {status.output.summary.device}: "
            f"{len(flagged)} of {len(rows)} findings flagged in "
            f"{len({r.anatomy for r in flagged})} anatomies."
        )

    # --- results -----------------------------------------------------------------------------
    def showResults(self, nodes) -> None:
        nodes.segmentation.GetDisplayNode().SetVisibility(True)
        self.ui.resultsTableView.setMRMLTableNode(nodes.table)
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(nodes.table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        # clicking a row in the layout's table view also jumps to the anatomy
        tableWidget = layoutManager.tableWidget(0)
        view = tableWidget.tableView() if tableWidget else None
        if view is not None and view is not self._layoutTableView:
            view.connect("selectionChanged()", lambda v=view: self.onResultRowSelected(v))
            self._layoutTableView = view
        volume = self._parameterNode.inputVolume
        best = max(nodes.similarity_volumes, key=lambda k: nodes.probability(k), default=None)
        overlay = nodes.similarity_volumes.get(best) if best else None
        slicer.util.setSliceViewerLayers(
            background=volume, foreground=overlay, foregroundOpacity=0.4 if overlay else 0.0
        )

    def onResultRowSelected(self, tableView=None) -> None:
        """Center the slice views on the selected row's anatomy; show its similarity map."""
        if self._results is None:
            return
        view = self.ui.resultsTableView if tableView is None else tableView
        rows = view.selectionModel().selectedIndexes() if view.selectionModel() else []
        if not rows:
            return
        # read the row through the view's (possibly sorted) model: columns 0/1 are anatomy/finding
        model = view.model()
        row = rows[0].row()
        anatomy = str(model.index(row, 0).data())
        finding = str(model.index(row, 1).data())
        from FVLMSlicerLib.results import anatomy_center_ras

        center = anatomy_center_ras(self._results.segmentation, anatomy)
        if center is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
        overlay = self._results.similarity_volumes.get((anatomy, finding))
        if overlay is not None:
            slicer.util.setSliceViewerLayers(foreground=overlay, foregroundOpacity=0.4)


def pythonSlicerExecutable() -> str:
    """Slicer's command-line Python (runs the background worker with Slicer's packages)."""
    exe = shutil.which("PythonSlicer")
    if exe:
        return exe
    bindir = os.path.join(os.path.dirname(slicer.app.applicationFilePath()), "..", "bin")
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.normpath(os.path.join(bindir, name))
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


class FVLMSlicerLogic(ScriptedLoadableModuleLogic, AnalysisLogic):
    """Console use::

    logic = slicer.util.getModuleLogic("FVLMSlicer")   # or FVLMSlicerLogic()
    nodes = logic.analyze(volumeNode, segmentationNode=None, modelDir="/path/to/model")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AnalysisLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)

    def resolve_model_dir_or_empty(self) -> str:
        from FVLMSlicerLib.settings import remembered_model_dir

        return remembered_model_dir()

    def analyze(self, volumeNode, segmentationNode=None, modelDir=None, **kwargs):
        """Blocking analysis (Python console); see ``FVLMSlicerLib.logic.AnalysisLogic.analyze``."""
        from FVLMSlicerLib import dependencies

        if not dependencies.ensure_dependencies(ask=True):
            raise RuntimeError("FVLM dependencies are not installed.")
        return AnalysisLogic.analyze(
            self, volumeNode, segmentationNode, kwargs.pop("model_dir", modelDir), **kwargs
        )


class FVLMSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on a phantom it builds itself (no downloads; a random tiny model)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_geometry_roundtrip()
        self.test_analyze_phantom()

    def _phantom(self):
        import numpy as np

        from fvlm_core.io import CTVolume, Geometry

        z, y, x = np.mgrid[0:40, 0:64, 0:64].astype(np.float32)
        hu = np.full((40, 64, 64), -1000.0, dtype=np.float32)
        body = ((y - 32) / 28) ** 2 + ((x - 32) / 30) ** 2 < 1
        hu[body] = 20.0
        labels = np.zeros(hu.shape, dtype=np.uint8)
        for cx in (18, 46):  # two lungs
            lung = ((y - 30) / 14) ** 2 + ((x - cx) / 9) ** 2 + ((z - 20) / 16) ** 2 < 1
            hu[lung], labels[lung] = -850.0, 1
        heart = ((y - 40) / 8) ** 2 + ((x - 32) / 7) ** 2 + ((z - 18) / 8) ** 2 < 1
        hu[heart], labels[heart] = 40.0, 2
        aorta = ((y - 44) ** 2 + (x - 26) ** 2 < 9) & (z > 4)
        hu[aorta], labels[aorta] = 200.0, 4
        # an oblique LPS direction checks that no axis is flipped on the way into Slicer
        c, s = np.cos(0.3), np.sin(0.3)
        geometry = Geometry(
            (64, 64, 40), (1.5, 1.5, 3.0), (-40.0, -60.0, 100.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
        )
        return CTVolume(hu, geometry, "phantom"), labels

    def test_geometry_roundtrip(self):
        import numpy as np
        from FVLMSlicerLib import mrml_io

        ct, _ = self._phantom()
        node = mrml_io.ct_to_volume_node(ct, slicer.mrmlScene, "FVLM phantom")
        back = mrml_io.volume_node_to_ct(node)
        self.assertTrue(back.geometry.same_grid(ct.geometry))
        self.assertTrue(np.array_equal(back.array, ct.array))
        self.delayDisplay("Geometry round trip OK")

    def test_analyze_phantom(self):
        import tempfile

        from FVLMSlicerLib import dependencies, mrml_io

        from fvlm_core.anatomy import CTRATE_CATALOG

        if not dependencies.ensure_dependencies(ask=False):
            self.skipTest("FVLM dependencies not installed")
        from fvlm_core.model import FVLM

        ct, labels = self._phantom()
        volume = mrml_io.ct_to_volume_node(ct, slicer.mrmlScene, "FVLM phantom")
        seg = mrml_io.labelmap_to_segmentation_node(
            labels, ct.geometry, CTRATE_CATALOG, slicer.mrmlScene, "input"
        )
        model_dir = tempfile.mkdtemp(prefix="fvlm-test-model-")
        FVLM.from_config("fvlm-tiny").save_pretrained(model_dir)
        nodes = FVLMSlicerLogic().analyze(volume, seg, modelDir=model_dir, device="cpu")
        self.assertGreater(nodes.table.GetNumberOfRows(), 0)
        self.assertIsNotNone(nodes.segmentation.GetSegmentation().GetSegment("lung"))
        self.delayDisplay("Analysis on a phantom OK")


__all__ = ["FVLMSlicer", "FVLMSlicerLogic", "FVLMSlicerTest", "FVLMSlicerWidget", "ctk"]
