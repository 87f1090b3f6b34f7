"""FVLM: anatomy-level zero-shot findings on CT (3D Slicer scripted module).

Thin layer: module metadata, the panel (widget), the logic facade and a self-test. The work
is in ``FVLMSlicerLib`` (no Qt) and ``fvlm_core``.

The panel's Qt calls are written for PythonQt, Slicer's binding, which differs from PySide/PyQt:
a name that is a Qt property of the object is read as that property *before* any method of the
same name (PythonQtClassInfo::member), so ``widget.rowCount`` is an int and
``selectionModel().selectedIndexes`` is a list (calling it fails). Methods are used only where
no property of that name exists (``selectedItems()``, ``item(row, column)``); properties are
read and written as attributes. ``Testing/test_slicer_widget.py`` runs this widget on a layer
over PySide6 that applies the same lookup rule.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING

import ctk  # noqa: F401  (Slicer's CTK widgets are created from the .ui)
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The oldest Python fvlm_core runs on, and the first Slicer release that ships one (Slicer
#: 5.10 ships Python 3.12; 5.0-5.8 ship Python 3.9: Slicer's CMakeLists.txt,
#: Slicer_REQUIRED_PYTHON_VERSION).
MINIMUM_PYTHON = (3, 10)
MINIMUM_SLICER = "5.10"
SUPPORTED = tuple(sys.version_info[:2]) >= MINIMUM_PYTHON
UNSUPPORTED_TEXT = (
    f"FVLM needs 3D Slicer {MINIMUM_SLICER} or newer (Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}+). "
    f"This Slicer runs Python {sys.version_info[0]}.{sys.version_info[1]}: install a current Slicer "
    "from download.slicer.org."
)

# fvlm_core lives next to this file in a built extension and one folder up in a source checkout.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isfile(os.path.join(_candidate, "fvlm_core", "__init__.py")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)
        break

if SUPPORTED:
    from FVLMSlicerLib.logic import AnalysisLogic
    from FVLMSlicerLib.panel import AnatomySource, Device
    from slicer.parameterNodeWrapper import parameterNodeWrapper
else:  # an old Slicer: the module loads only to say what it needs
    AnalysisLogic = object
if TYPE_CHECKING:
    from FVLMSlicerLib.job import AnalysisJob, ImportJob, TaskJob
    from FVLMSlicerLib.results import ResultNodes

#: Where the documentation is: the project has no published web page, the README travels with it.
README_SECTION = "3D Slicer"


class FVLMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FVLM"
        self.parent.categories = ["Segmentation", "Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["fVLM for 3D Slicer contributors"]
        self.parent.helpText = ("" if SUPPORTED else f"<b>{UNSUPPORTED_TEXT}</b><br>") + (
            "Flags findings per anatomy on a CT with fVLM (Shui et al., ICLR 2025): the CT is segmented "
            "into anatomies (or an existing segmentation, e.g. from TotalSegmentator, is reused), each "
            "anatomy is embedded by the model and compared with text prompts of findings. Flagged "
            "anatomies are highlighted; calibrated probabilities (or, for a model without calibration, "
            "uncalibrated scores), the raw scores and the thresholds are listed in a table and stored in "
            "segment tags. "
            f"<br>Documentation: the section '{README_SECTION}' of README.md in the FVLM source folder "
            "(one folder above this module). "
            "Not for clinical use."
        )
        self.parent.acknowledgementText = (
            "fVLM: Shui et al., Large-scale and Fine-grained Vision-language Pre-training for Enhanced "
            "CT Image Understanding, ICLR 2025. Built on MONAI, PyTorch and 3D Slicer."
        )


if SUPPORTED:

    @parameterNodeWrapper
    class FVLMSlicerParameterNode:
        """Panel state, saved with the scene. Names match the .ui's SlicerParameterName properties.

        ``modelDir`` (bound by the panel itself: a ``pathlib.Path`` field would show an unset
        folder as "."); ``findings`` (no widget): JSON ``{"model": folder, "rows": [[finding,
        anatomy], ...]}``, the findings table as the user left it for that model.
        """

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        anatomySource: AnatomySource = AnatomySource.BUILTIN
        inputSegmentation: slicer.vtkMRMLSegmentationNode
        modelDir: str = ""
        device: Device = Device.AUTO
        similarityMaps: bool = True
        findings: str = ""


def _modelPath(path) -> str:
    """The model folder as text ('' when unset; '.' is what an unset ``pathlib.Path`` reads)."""
    text = str(path or "").strip()
    return "" if text in ("", ".") else text


class FVLMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    #: Where the worker's idle time is kept (a Slicer setting, not saved with the scene).
    IDLE_SETTING = "FVLM/WorkerIdleMinutes"

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: FVLMSlicerLogic | None = None
        self._parameterNode: FVLMSlicerParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: AnalysisJob | None = None  # the running analysis
        self._importJob: ImportJob | None = None
        self._taskJob: TaskJob | None = None  # similar cases or a DICOM export
        self._matches: list[dict] = []  # the similar cases in the table, by row
        self._doneJob: AnalysisJob | None = None  # the last analysis that finished
        self._results: ResultNodes | None = None  # the results in the table
        self._modelAnatomies: list[str] = []
        self._modelFindings: list[dict] = []  # the model's findings, with its prompts
        self._modelDirShown = None  # the model folder onModelChanged last read
        self._updatingFindings = False
        self._totalSegChosen = False
        self._cleanedUp = False
        self._logLength = 0
        self._jobTimer = qt.QTimer()  # one step of the running job per tick (job.py)
        self._jobTimer.setSingleShot(True)
        self._jobTimer.connect("timeout()", self.onJobStep)
        self._totalSegTimer = qt.QTimer()  # looks again until TotalSegmentator's status is known
        self._totalSegTimer.setInterval(300)
        self._totalSegTimer.setSingleShot(True)
        self._totalSegTimer.connect("timeout()", self._updateTotalSegmentatorInfo)

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if not SUPPORTED:
            label = qt.QLabel(UNSUPPORTED_TEXT)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FVLMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FVLMSlicerLogic()
        from FVLMSlicerLib import totalseg
        from FVLMSlicerLib.warm import DEFAULT_IDLE_MINUTES

        totalseg.check_in_background()  # TotalSegmentator's package and weights (a separate Python)
        self.ui.workerIdleSpinBox.value = int(qt.QSettings().value(self.IDLE_SETTING, DEFAULT_IDLE_MINUTES))
        self._setupTables()
        self._connect()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        if not _modelPath(self._parameterNode.modelDir):
            remembered = self.logic.resolve_model_dir_or_empty()
            if remembered:
                self._parameterNode.modelDir = remembered
        self.onModelChanged()
        self._restoreResults()

    def _setupTables(self) -> None:
        header = self.ui.findingsTable.horizontalHeader()
        header.setSectionResizeMode(0, qt.QHeaderView.Stretch)
        # every column as wide as its contents: anatomy, finding and Flagged (first) in view at the
        # panel's default width, the numbers beside them (scrolled to where the panel is narrow)
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)

    def _connect(self) -> None:
        ui = self.ui
        for button, slot in (
            (ui.addFindingButton, self.onAddFinding),
            (ui.removeFindingButton, self.onRemoveFindings),
            (ui.resetFindingsButton, self.onResetFindings),
            (ui.analyzeButton, self.onAnalyze),
            (ui.cancelButton, self.onCancel),
            (ui.importWeightsButton, self.onImportWeights),
            (ui.chooseModelButton, self.onChooseModel),
            (ui.installDependenciesButton, self.onInstallDependencies),
            (ui.installTotalSegmentatorButton, self.onInstallTotalSegmentator),
            (ui.exportDicomButton, self.onExportDicom),
            (ui.findSimilarButton, self.onFindSimilar),
        ):
            button.connect("clicked(bool)", slot)
        ui.newFindingLineEdit.connect("returnPressed()", self.onAddFinding)
        ui.findingsTable.connect("itemChanged(QTableWidgetItem*)", self._storeFindings)
        ui.resultsTable.connect("itemSelectionChanged()", self.onResultRowSelected)
        ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathEdited)
        ui.workerIdleSpinBox.connect("valueChanged(int)", self.onWorkerIdleChanged)
        ui.storePathLineEdit.connect("currentPathChanged(QString)", self._updateButtons)
        ui.similarTable.connect("itemDoubleClicked(QTableWidgetItem*)", self.onLoadCase)

    def cleanup(self) -> None:
        self._cleanedUp = True
        self._abandonJobs()
        if SUPPORTED:
            from FVLMSlicerLib.warm import stop_shared_worker

            stop_shared_worker()  # the warm worker process goes with the module
        self._totalSegTimer.stop()
        self.removeObservers()
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)

    def onReload(self) -> None:
        """Reload FVLMSlicerLib too: Slicer's Reload re-imports only this file."""
        import importlib

        import FVLMSlicerLib
        from FVLMSlicerLib.warm import stop_shared_worker

        self._abandonJobs()
        stop_shared_worker()  # a worker runs the old code: the next analysis starts a new one
        FVLMSlicerLib = importlib.reload(FVLMSlicerLib)
        for name in FVLMSlicerLib.LIB_MODULES:
            module = sys.modules.get(f"FVLMSlicerLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if SUPPORTED:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def _abandonJobs(self) -> None:
        """Stop the running jobs now: no further step, their files removed (the worker gives
        up a job whose folder is gone at its next progress report and stays warm)."""
        self._jobTimer.stop()
        for job in (self._job, self._importJob, self._taskJob):
            if job is not None:
                job.abandon()
        self._job = self._importJob = self._taskJob = None

    def onSceneStartClose(self, caller, event) -> None:
        self._abandonJobs()  # a job showing its results would add nodes to the next scene
        self._clearResults()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._totalSegChosen = False  # a new scene: its TotalSegmentator segmentation may be reused
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A scene was loaded (File > Load scene, an .mrb): show the results it holds."""
        if self.parent.isEntered:
            self.initializeParameterNode()
        self._restoreResults()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(FVLMSlicerParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, node) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()  # a new node (scene closed or loaded): its model, findings
        else:
            self._updateButtons()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p and self.ui.modelPathLineEdit.currentPath != _modelPath(p.modelDir):
            self.ui.modelPathLineEdit.currentPath = _modelPath(p.modelDir)
        if p and _modelPath(p.modelDir) != self._modelDirShown:
            self.onModelChanged()
            return
        self._restoreFindings()
        self._updateButtons()

    def onModelPathEdited(self, path) -> None:
        if self._parameterNode and _modelPath(path) != _modelPath(self._parameterNode.modelDir):
            self._parameterNode.modelDir = _modelPath(path)

    def onWorkerIdleChanged(self, minutes) -> None:
        qt.QSettings().setValue(self.IDLE_SETTING, int(minutes))

    def _idleMinutes(self):
        """The worker's idle time from the panel (None: it stays until Slicer closes)."""
        minutes = int(self.ui.workerIdleSpinBox.value)
        return float(minutes) if minutes > 0 else None

    def _running(self) -> bool:
        return any(job is not None for job in (self._job, self._importJob, self._taskJob))

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.inputVolume) and not self._running() and bool(self._modelAnatomies)
        useSegmentation = bool(p and p.anatomySource == AnatomySource.SEGMENTATION)
        if useSegmentation:
            ready = ready and bool(p.inputSegmentation)
        self.ui.analyzeButton.enabled = ready
        self.ui.cancelButton.enabled = self._running()
        self.ui.inputSegmentationSelector.enabled = useSegmentation
        self.ui.show3DButton.enabled = self._results is not None
        self._updateResultActions()
        self._updateTotalSegmentatorInfo()

    # --- TotalSegmentator ----------------------------------------------------------------------
    def _totalSegFound(self, node):
        """What a TotalSegmentator segmentation ``node`` gives the model (None: not one)."""
        from FVLMSlicerLib.mrml_io import segments
        from FVLMSlicerLib.totalseg import totalseg_mapping

        from fvlm_core.anatomy import get_catalog

        if node is None or not self._modelAnatomies:
            return None
        return totalseg_mapping(segments(node), get_catalog(self._modelAnatomies))

    def _chooseTotalSegmentation(self) -> None:
        """Once per scene: reuse a TotalSegmentator segmentation when the user has chosen none."""
        p = self._parameterNode
        if self._totalSegChosen or not p or p.inputSegmentation or p.anatomySource != AnatomySource.BUILTIN:
            return
        self._totalSegChosen = True
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
            node = slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            found = self._totalSegFound(node)
            if found is not None and found.mapping and node.GetAttribute("FVLM.Role") is None:
                p.inputSegmentation = node
                p.anatomySource = AnatomySource.SEGMENTATION
                return

    def _updateTotalSegmentatorInfo(self) -> None:
        """Say which anatomies a TotalSegmentator segmentation provides, or whether TotalSegmentator
        can run here (and offer to install it)."""
        from FVLMSlicerLib import totalseg

        if self._cleanedUp:  # a timer may fire after cleanup
            return
        p = self._parameterNode
        text, offerInstall = "", False
        status = totalseg.status()
        if status is None:  # still being computed by its process: look again shortly
            self._totalSegTimer.start()
        elif p and p.anatomySource == AnatomySource.TOTALSEGMENTATOR:
            text, offerInstall = totalseg.status_text(status)
        elif p and self._modelAnatomies:
            self._chooseTotalSegmentation()
            found = (
                self._totalSegFound(p.inputSegmentation)
                if p.anatomySource == AnatomySource.SEGMENTATION
                else None
            )
            if found is not None:
                text = totalseg.provides_text(p.inputSegmentation.GetName(), found)
        self.ui.totalSegmentatorLabel.text = text
        self.ui.installTotalSegmentatorButton.visible = offerInstall
        self.ui.totalSegmentatorFrame.visible = bool(text)

    def onInstallTotalSegmentator(self, *args) -> None:
        from FVLMSlicerLib import dependencies, totalseg

        with slicer.util.tryWithErrorDisplay("Installing TotalSegmentator failed.", waitCursor=True):
            if dependencies.install_totalsegmentator(ask=True):
                totalseg.check_in_background(refresh=True)
                totalseg.wait_for_status()
                self._updateTotalSegmentatorInfo()

    # --- model -------------------------------------------------------------------------------
    def _showModelHelp(self, text: str, needsDependencies: bool = False) -> None:
        self.ui.modelHelpLabel.text = text
        self.ui.installDependenciesButton.visible = needsDependencies
        self.ui.importWeightsButton.visible = not needsDependencies
        self.ui.chooseModelButton.visible = not needsDependencies
        self.ui.modelHelpFrame.visible = bool(text)

    def onModelChanged(self, *args) -> None:
        """Read the model's anatomies and findings; without a model, offer to import or choose one."""
        from FVLMSlicerLib.settings import read_model_info

        from fvlm_core.errors import DependencyError, FVLMError

        self._modelAnatomies, self._modelFindings = [], []
        self._modelDirShown = _modelPath(self._parameterNode.modelDir) if self._parameterNode else ""
        self.ui.findingsTable.setRowCount(0)  # findings belong to a model (saved ones come back below)
        try:
            info = read_model_info(self.logic.resolve_model_dir(self._modelDirShown))
        except DependencyError as exc:
            self._showModelHelp(str(exc), needsDependencies=True)
            self._updateButtons()
            return
        except FVLMError as exc:  # no model yet, or not a model folder: the message says what to do
            self._showModelHelp(str(exc))
            self._updateButtons()
            return
        self._showModelHelp("")
        self._modelAnatomies = list(info.anatomies)
        self._modelFindings = list(info.findings)
        self.ui.newFindingAnatomyComboBox.clear()
        for name in info.anatomies:
            self.ui.newFindingAnatomyComboBox.addItem(name)
        if not self._restoreFindings(force=True):
            self._setFindingRows([(f["name"], f["anatomy"]) for f in info.findings])
        self.ui.statusLabel.text = (
            f"Model {info.name}: {len(info.findings)} findings on {', '.join(info.anatomies)}."
        )
        self._updateButtons()

    def onChooseModel(self, *args) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), "Choose an FVLM model folder (holds config.yaml)"
        )
        if folder:
            self.ui.modelPathLineEdit.currentPath = folder

    def onInstallDependencies(self, *args) -> None:
        from FVLMSlicerLib import dependencies

        with slicer.util.tryWithErrorDisplay("Installing FVLM's dependencies failed.", waitCursor=True):
            if dependencies.ensure_dependencies(ask=True):
                self.onModelChanged()

    def onImportWeights(self, *args) -> None:
        """Ask for the official checkpoint and its text encoder folder; convert them in the background."""
        from FVLMSlicerLib.job import ImportJob
        from FVLMSlicerLib.settings import default_import_dir

        parent = slicer.util.mainWindow()
        checkpoint = qt.QFileDialog.getOpenFileName(
            parent, "Official fVLM checkpoint", "", "PyTorch checkpoint (*.pth *.pt);;All files (*)"
        )
        if not checkpoint:
            return
        textEncoder = qt.QFileDialog.getExistingDirectory(
            parent, "CXR-BERT text encoder folder (BiomedVLP-CXR-BERT-specialized: config + tokenizer files)"
        )
        if not textEncoder:
            return
        out = default_import_dir()
        if out.exists() and any(out.iterdir()):
            out = out.with_name(f"{out.name}-{len(list(out.parent.glob(out.name + '*')))}")
        self._importJob = ImportJob(checkpoint, textEncoder, str(out)).start()
        self._startPolling(f"Importing the official weights into {out}...")

    # --- findings table ----------------------------------------------------------------------
    def _setFindingRows(self, rows) -> None:
        self._fillFindingRows(rows)
        self._storeFindings()

    def _fillFindingRows(self, rows) -> None:
        """Replace the table's rows; the parameter node is left as it is."""
        self._updatingFindings = True
        try:
            self.ui.findingsTable.setRowCount(0)
            for name, anatomy in rows:
                self._appendFindingRow(name, anatomy)
        finally:
            self._updatingFindings = False

    def _appendFindingRow(self, name: str, anatomy: str) -> None:
        table = self.ui.findingsTable
        row = table.rowCount
        table.insertRow(row)
        table.setItem(row, 0, qt.QTableWidgetItem(name))
        combo = qt.QComboBox()
        for a in self._modelAnatomies or [anatomy]:
            combo.addItem(a)
        combo.currentText = anatomy
        combo.connect("currentIndexChanged(int)", self._storeFindings)
        table.setCellWidget(row, 1, combo)

    def _findingRows(self) -> list[tuple[str, str]]:
        table = self.ui.findingsTable
        rows = []
        for r in range(table.rowCount):
            item = table.item(r, 0)
            combo = table.cellWidget(r, 1)
            if item is not None and item.text().strip() and combo is not None:
                rows.append((item.text().strip(), combo.currentText))
        return rows

    def _storeFindings(self, *args) -> None:
        """Keep the table in the parameter node (saved with the scene)."""
        if self._updatingFindings or not self._parameterNode:
            return
        model = _modelPath(self._parameterNode.modelDir)
        self._parameterNode.findings = json.dumps({"model": model, "rows": self._findingRows()})

    def _restoreFindings(self, force: bool = False) -> bool:
        """Fill the table from the parameter node when it holds rows for the current model."""
        p = self._parameterNode
        if not p or not p.findings or not self._modelAnatomies:
            return False
        saved = json.loads(p.findings)
        if saved.get("model") != _modelPath(p.modelDir):
            return False
        rows = [tuple(r) for r in saved.get("rows", [])]
        if force or rows != self._findingRows():
            self._fillFindingRows(rows)
        return True

    def onAddFinding(self, *args) -> None:
        name = self.ui.newFindingLineEdit.text.strip()
        anatomy = self.ui.newFindingAnatomyComboBox.currentText
        if not name or not anatomy:
            self.ui.statusLabel.text = "Type a finding and choose its anatomy, then click Add."
            return
        self._appendFindingRow(name, anatomy)
        self.ui.newFindingLineEdit.clear()
        self._storeFindings()

    def onRemoveFindings(self, *args) -> None:
        table = self.ui.findingsTable
        for row in sorted({item.row() for item in table.selectedItems()}, reverse=True):
            table.removeRow(row)
        self._storeFindings()

    def onResetFindings(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.findings = ""
        self.onModelChanged()

    # --- running -----------------------------------------------------------------------------
    def onAnalyze(self, *args) -> None:
        from FVLMSlicerLib import dependencies
        from FVLMSlicerLib.panel import findings_from_rows

        p = self._parameterNode
        source = p.anatomySource
        try:
            if source == AnatomySource.TOTALSEGMENTATOR:
                from FVLMSlicerLib import totalseg

                status = totalseg.wait_for_status()
                if not status.get("installed") or status.get("missing_weights"):
                    slicer.util.errorDisplay(totalseg.status_text(status)[0])
                    return
            if not dependencies.ensure_dependencies(ask=True):
                self.ui.statusLabel.text = "Dependencies not installed: analysis not started."
                return
            self._job = self.logic.start(
                p.inputVolume,
                p.inputSegmentation if source == AnatomySource.SEGMENTATION else None,
                model_dir=_modelPath(p.modelDir),
                anatomy_source=source.value,
                findings=findings_from_rows(self._findingRows(), self._modelFindings) or None,
                device=p.device.value,
                similarity_maps=p.similarityMaps,
                idle_minutes=self._idleMinutes(),
            )
        except Exception as exc:
            self._job = None
            slicer.util.errorDisplay(f"Analysis could not start: {exc}")
            logging.exception("FVLM: analysis could not start")
            self._updateButtons()
            return
        self._startPolling("Starting...")

    def _startPolling(self, text: str) -> None:
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = text
        self.ui.logTextEdit.clear()
        self._logLength = 0
        self._updateButtons()
        self._jobTimer.start(0)

    def onCancel(self, *args) -> None:
        for job in (self._job, self._importJob, self._taskJob):
            if job is not None:
                job.cancel()
                self.ui.statusLabel.text = "Cancelling..."

    def _showLog(self, lines: list[str]) -> None:
        if len(lines) != self._logLength:
            self.ui.logTextEdit.setPlainText("\n".join(lines))
            self._logLength = len(lines)

    def onJobStep(self) -> None:
        """One step of the running job (a short piece of work: job.py); then the next, or the end."""
        job = self._job or self._importJob or self._taskJob
        if job is None:
            return
        delay = job.step()
        status = job.status
        self.ui.progressBar.value = int(100 * status.fraction)
        self.ui.statusLabel.text = f"{status.stage} ({status.elapsed_s:.0f} s)"
        self._showLog(status.log)
        if delay is not None:
            self._jobTimer.start(int(1000 * delay))
            return
        self.ui.progressBar.visible = False
        if job is self._importJob:
            self._importJob = None
            self._onImportFinished(job)
            return
        if job is self._taskJob:
            self._taskJob = None
            self._onTaskFinished(job)
            return
        self._job, self._doneJob = None, job
        if status.state == "cancelled":
            self.ui.statusLabel.text = "Cancelled."
        elif status.state == "failed":
            self.ui.statusLabel.text = "Failed: " + (status.error.splitlines() or ["see the log"])[-1]
            slicer.util.errorDisplay(f"FVLM analysis failed:\n\n{status.error}")
        else:
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.showResults(job.nodes)
            self._showDone(job)
        self._updateButtons()

    def _showDone(self, job) -> None:
        from FVLMSlicerLib.panel import absent_text, done_text

        text = done_text(job.nodes.result, job.status.elapsed_s)
        if job.nodes.result.warnings:  # the library's warnings about this input
            text += " Warning: " + " ".join(job.nodes.result.warnings)
        self.ui.statusLabel.text = text
        self.ui.resultsNoteLabel.text = absent_text(job.nodes.result, job.anatomy_source)

    def _onImportFinished(self, job) -> None:
        status = job.status
        if status.state == "done":
            self.ui.modelPathLineEdit.currentPath = job.out_dir
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.ui.statusLabel.text = f"Imported the official weights into {job.out_dir}."
        elif status.state == "cancelled":
            self.ui.statusLabel.text = "Import cancelled."
        else:
            self.ui.statusLabel.text = "Import failed: " + status.error
            slicer.util.errorDisplay(f"Importing the official fVLM weights failed:\n\n{status.error}")
        self._updateButtons()

    # --- results -----------------------------------------------------------------------------
    def _clearResults(self) -> None:
        self._results = None
        if hasattr(self, "ui"):
            self.ui.resultsTable.setRowCount(0)
            self.ui.resultsNoteLabel.text = ""
            self.ui.show3DButton.checked = False
            self._showSimilar({})

    def _restoreResults(self) -> None:
        """Show the results a loaded scene holds (the table node keeps the analysis as JSON)."""
        if self._results is not None or self._running() or not hasattr(self, "ui"):
            return
        p = self._parameterNode
        nodes = self.logic.find_results(p.inputVolume if p and p.inputVolume else None)
        if nodes is None and p and p.inputVolume:
            nodes = self.logic.find_results()
        if nodes is not None:
            self.showResults(nodes)
            self.ui.statusLabel.text = "Results of an earlier analysis, loaded with the scene."
            self._updateButtons()

    def showResults(self, nodes) -> None:
        """Fill the results table; show the CT, the anatomies and the strongest similarity map."""
        from FVLMSlicerLib.results import ATTR_SOURCE_VOLUME

        self._results = nodes
        nodes.segmentation.GetDisplayNode().SetVisibility(True)
        self._fillResultsTable(nodes.result)
        self._showSimilar({})  # matches of an earlier analysis are not this one's
        volume = slicer.mrmlScene.GetNodeByID(nodes.table.GetAttribute(ATTR_SOURCE_VOLUME) or "")
        best = max(nodes.similarity_volumes, key=nodes.value, default=None)
        slicer.util.setSliceViewerLayers(background=volume)
        self._showOverlay(best)
        segmentation = nodes.segmentation.GetSegmentation()
        self.ui.show3DButton.checked = bool(
            segmentation.ContainsRepresentation("Closed surface")
            and nodes.segmentation.GetDisplayNode().GetVisibility3D()
        )

    def _setResultsHeaders(self, findings) -> None:
        """Column titles saying what the numbers are: probabilities, or uncalibrated scores."""
        from FVLMSlicerLib.panel import RESULT_COLUMNS, header_tips, value_headers

        table = self.ui.resultsTable
        titles = list(RESULT_COLUMNS)
        titles[3:5] = value_headers(findings)
        table.setColumnCount(len(titles))
        tips = header_tips()
        for column, (key, title) in enumerate(zip(RESULT_COLUMNS, titles)):
            if len(title) > 16:  # on two lines: the finding's name keeps the width
                middle = min(
                    (i for i, c in enumerate(title) if c == " "), key=lambda i: abs(i - len(title) / 2)
                )
                title = title[:middle] + "\n" + title[middle + 1 :]
            item = qt.QTableWidgetItem(title)
            if key in tips:
                item.setToolTip(tips[key])
            table.setHorizontalHeaderItem(column, item)

    def _fillResultsTable(self, result) -> None:
        from FVLMSlicerLib.panel import FLAGGED_COLORS, flagged_text, result_order
        from FVLMSlicerLib.results import percent, rows

        table = self.ui.resultsTable
        table.sortingEnabled = False  # rows move while sorting is on: fill first
        table.setRowCount(0)
        self._setResultsHeaders([f for _, f in rows(result)])
        for anatomy, f in result_order(rows(result)):
            r = table.rowCount
            table.insertRow(r)
            key = f"{anatomy.name}|{f.name}"
            values = (anatomy.name, f.name, flagged_text(f), percent(f.value), percent(f.threshold))
            values += (percent(f.raw_score, 2), f.scale_text)
            for column, value in enumerate(values):
                item = qt.QTableWidgetItem()
                if value == value:  # NaN (not scored) stays an empty cell, sorted below any number
                    item.setData(qt.Qt.DisplayRole, value)  # numbers sort as numbers
                item.setData(qt.Qt.UserRole, key)
                table.setItem(r, column, item)
            table.item(r, 2).setForeground(qt.QBrush(qt.QColor(FLAGGED_COLORS[values[2]])))
            if f.calibration_note:  # why this finding's raw score was kept
                table.item(r, 6).setToolTip(f.calibration_note)
        # keep this order (flagged first) until the user clicks a column header
        table.horizontalHeader().setSortIndicator(-1, qt.Qt.AscendingOrder)
        table.sortingEnabled = True

    def _selectedResult(self):
        """``(anatomy, finding)`` of the selected results row, or None."""
        items = self.ui.resultsTable.selectedItems()
        if not items:
            return None
        key = str(items[0].data(qt.Qt.UserRole) or "")
        anatomy, _, finding = key.partition("|")
        return (anatomy, finding) if anatomy else None

    def onResultRowSelected(self, *args) -> None:
        """Center the slice views on the selected row's anatomy; show its similarity map."""
        if self._results is None:
            return
        selected = self._selectedResult()
        if selected is None:
            return
        from FVLMSlicerLib.results import anatomy_center_ras

        center = anatomy_center_ras(self._results.segmentation, selected[0])
        if center is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(
                slicer.mrmlScene, *center, slicer.vtkMRMLSliceNode.CenteredJumpSlice
            )
        if selected in self._results.similarity_volumes:
            self._showOverlay(selected)

    def _showOverlay(self, key) -> None:
        """Show one similarity map (and only its legend) over the CT; None hides the overlay."""
        from FVLMSlicerLib.overlay import set_legend_visible
        from FVLMSlicerLib.results import outline_only

        node = self._results.similarity_volumes.get(key) if key else None
        slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.6 if node else 0.0)
        outline_only(self._results.segmentation, self._results.result, key[0] if node else None)
        # after the layers: a legend is shown only where its volume is in a view, and the views
        # re-check that when the legend node changes (not when layers are set from code)
        for other, volume in self._results.similarity_volumes.items():
            set_legend_visible(volume, other == key)

    def onShow3D(self, checked) -> None:
        if self._results is None:
            return
        segmentation = self._results.segmentation
        if checked:
            segmentation.CreateClosedSurfaceRepresentation()
        else:
            segmentation.RemoveClosedSurfaceRepresentation()
        segmentation.GetDisplayNode().SetVisibility3D(bool(checked))

    # --- similar cases, DICOM export ----------------------------------------------------------
    def _analysedVolume(self):
        from FVLMSlicerLib.results import ATTR_SOURCE_VOLUME

        table = self._results.table if self._results is not None else None
        return slicer.mrmlScene.GetNodeByID(table.GetAttribute(ATTR_SOURCE_VOLUME) or "") if table else None

    def _updateResultActions(self) -> None:
        """Enable "Export to DICOM" and "Find similar cases" when they can run; else say why."""
        from FVLMSlicerLib import dicomdb
        from FVLMSlicerLib.panel import similar_blocker

        result = self._results.result if self._results is not None else None
        if result is None:
            why = "Analyse a CT loaded from Slicer's DICOM database first."
        elif self._running():
            why = "Wait for the running job to finish."
        else:
            why = dicomdb.export_blocker(self._analysedVolume(), dicomdb.database())
        self.ui.exportDicomButton.enabled = not why
        self.ui.exportDicomButton.toolTip = why or (
            "Write the anatomies as a DICOM Segmentation and the findings as a DICOM Structured Report "
            "(TID 1500), as 'fvlm analyze --dicom-out' does, into Slicer's DICOM database, in the study of "
            "the analysed series."
        )
        store = str(self.ui.storePathLineEdit.currentPath or "").strip()
        why = similar_blocker(result, store, self._running())
        self.ui.findSimilarButton.enabled = not why
        self.ui.findSimilarButton.toolTip = why or f"Search {store} for the scans most like each anatomy."

    def _startTask(self, what: str, start) -> None:
        from FVLMSlicerLib import dependencies

        try:
            if not dependencies.ensure_dependencies(ask=True):
                self.ui.statusLabel.text = f"Dependencies not installed: {what} not started."
                return
            self._taskJob = start()
        except Exception as exc:
            self._taskJob = None
            self.ui.statusLabel.text = f"{what.capitalize()} could not start: {exc}"
            slicer.util.errorDisplay(f"{what.capitalize()} could not start: {exc}")
            return
        self._startPolling(f"{what.capitalize()}...")

    def onExportDicom(self, *args) -> None:
        if self._results is not None:
            self._startTask(
                "export to DICOM",
                lambda: self.logic.export_dicom(self._results, idle_minutes=self._idleMinutes()),
            )

    def onFindSimilar(self, *args) -> None:
        if self._results is None:
            return
        store = str(self.ui.storePathLineEdit.currentPath or "").strip()
        self._showSimilar({})
        self._startTask(
            "similar cases",
            lambda: self.logic.find_similar(
                self._results, store, int(self.ui.similarCountSpinBox.value), idle_minutes=self._idleMinutes()
            ),
        )

    def _onTaskFinished(self, job) -> None:
        from FVLMSlicerLib.panel import export_done_text

        status, similar = job.status, job.task["task"] == "similar"
        what = "Similar cases" if similar else "Export to DICOM"
        if status.state == "cancelled":
            self.ui.statusLabel.text = f"{what}: cancelled."
        elif status.state == "failed":
            self.ui.statusLabel.text = f"{what} failed: " + (status.error.splitlines() or ["see the log"])[-1]
            if similar:  # e.g. a store of another model: said where the matches would be
                self.ui.similarNoteLabel.text = status.error
            else:
                slicer.util.errorDisplay(f"{what} failed:\n\n{status.error}")
        elif similar:
            self.ui.storePathLineEdit.addCurrentPathToHistory()
            self._showSimilar(job.output)
            found = sum(len(m) for m in job.output.get("matches", {}).values())
            self.ui.statusLabel.text = f"Similar cases: {found} matches in {status.elapsed_s:.1f} s."
        else:
            self.ui.statusLabel.text = export_done_text(job.value, job.output)
        self._updateButtons()

    def _showSimilar(self, output) -> None:
        """Fill the similar-cases table (a Load button where the volume is on this computer,
        unreachable ones greyed) and the line under it."""
        from FVLMSlicerLib.panel import SIMILAR_COLUMNS, UNREACHABLE, match_tip, similar_rows

        table = self.ui.similarTable
        table.setRowCount(0)
        table.setColumnCount(len(SIMILAR_COLUMNS))
        table.setHorizontalHeaderLabels(list(SIMILAR_COLUMNS))
        rows = similar_rows(output)
        self._matches = [match for _, match in rows]
        for r, (cells, match) in enumerate(rows):
            table.insertRow(r)
            for column, value in enumerate(cells):
                item = qt.QTableWidgetItem(str(value))
                item.setToolTip(match_tip(match))
                if cells[-1] == UNREACHABLE:
                    item.setForeground(qt.QBrush(qt.QColor("#757575")))
                table.setItem(r, column, item)
            if cells[-1] != UNREACHABLE:  # one click loads it
                button = qt.QPushButton("Load")
                button.toolTip = match_tip(match)
                button.connect("clicked(bool)", lambda checked=False, m=match: self.onLoadCase(m))
                table.setCellWidget(r, len(cells) - 1, button)
        table.resizeColumnsToContents()
        lines = [output["store"]] if output.get("store") else []
        self.ui.similarNoteLabel.text = "\n".join(lines + list(output.get("notes", [])))

    def _selectedMatch(self):
        items = self.ui.similarTable.selectedItems()
        return self._matches[items[0].row()] if items and items[0].row() < len(self._matches) else None

    def onLoadCase(self, match=None) -> None:
        """Load a match's volume (its Load button, or a double-click on its row); say clearly
        why when it cannot be loaded."""
        from fvlm_core.errors import InputError

        if not isinstance(match, dict):  # a double-click: the item under it is selected
            match = self._selectedMatch()
        if match is None:
            return
        try:
            node = self.logic.load_case(match)
        except InputError as exc:
            self.ui.statusLabel.text = f"Cannot load {match['scan']}: {exc}"
            return
        except RuntimeError as exc:  # Slicer's reader failed
            slicer.util.errorDisplay(f"Loading {match['scan']} failed:\n\n{exc}")
            return
        self.ui.statusLabel.text = f"Loaded {match['scan']} as '{node.GetName()}' from {match['source']}."


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
    """Runs inside Slicer on a phantom it builds itself (no downloads; a random tiny model).

    In Slicer's testing mode nothing is installed: without FVLM's dependencies the analysis
    test is skipped (``ensure_dependencies`` returns False, as ``pip_ensure`` skips there).
    ``runTest`` (what Reload and Test and ctest run) reports a skipped test as skipped, not as
    an error: Slicer's ``onReloadAndTest`` shows any exception it gets as a failure.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        self.skipped = []
        tests = (self.test_geometry_roundtrip, self.test_analyze_phantom) if SUPPORTED else ()
        if not SUPPORTED:
            self.skipped.append(UNSUPPORTED_TEXT)
        for test in tests:
            self.setUp()
            try:
                test()
            except unittest.SkipTest as skip:
                self.skipped.append(f"{test.__name__}: {skip}")
        for reason in self.skipped:
            self.delayDisplay(f"Skipped {reason}")

    def _phantom(self):
        import numpy as np

        from fvlm_core.geometry import Geometry
        from fvlm_core.io import CTVolume

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

        if not dependencies.ensure_dependencies(ask=False):
            self.skipTest("FVLM dependencies are not installed (Slicer's testing mode installs nothing)")
        from fvlm_core.anatomy import CTRATE_CATALOG
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
