"""Slicer's application around a scripted module's widget, outside Slicer, for tests.

:func:`install` makes ``import qt``, ``import ctk`` and ``import slicer`` inside a module behave
as in 3D Slicer as far as a module widget needs:

* ``qt`` / ``ctk``: the PythonQt-like layer over PySide6 (``pythonqt.py``);
* ``slicer``: the real ``slicer-core`` package (real MRML, and Slicer's own ``slicer/util.py``:
  ``loadUI``, ``childWidgetVariables``, ``setSliceViewerLayers``, ``errorDisplay``,
  ``tryWithErrorDisplay``, ``VTKObservationMixin`` run unchanged on the layer), plus
  ``slicer.mrmlScene`` (a headless scene with Red/Yellow/Green slice views rendered offscreen
  by ``render_views.py``), ``slicer.app``
  (:class:`Application`), and stand-ins for two pure-Python Slicer packages that slicer-core
  does not ship:

  - ``slicer.ScriptedLoadableModule``: the base classes, as in Slicer's
    ``Base/Python/slicer/ScriptedLoadableModule.py`` (module name from the class name,
    ``resourcePath``, singleton parameter node with the ``ModuleName`` attribute);
  - ``slicer.parameterNodeWrapper``: typed fields stored in the parameter node (nodes as node
    references, enums by member name, paths and strings as text, as Slicer's serializers do)
    and ``connectGui`` binding the widgets that carry a ``SlicerParameterName`` property, with
    the connectors Slicer uses for them: node combo box, combo box from an enum (items = the
    enum's ``label``), path line edit, check box. Other field types and widgets raise.

  and for two C++ parts of Slicer that slicer-core lacks:

  - ``slicer.dicomDatabase``: :class:`DICOMDatabase`, the calls of CTK's ``ctkDICOMDatabase``
    the module and the tests make, on a real folder (:func:`load_dicom_series` loads a series
    from it as Slicer's ``DICOMScalarVolumePlugin`` does);
  - ``slicer.app.coreIOManager()``: :class:`CoreIOManager`, loading a volume file as Slicer's
    ``qSlicerVolumesReader`` does (so ``slicer.util.loadVolume`` runs unchanged).

Not reproduced: the module manager, layouts and the Qt view widgets, the 3D view, Slicer's
settings and dialogs (message boxes only log, as Slicer's util does without a main window).

:class:`EventLoop` is Slicer's main loop as far as Python's GIL goes: Slicer's GUI thread holds
the GIL while Qt waits for and dispatches events (PythonQt releases it only with thread
support, ``PythonQt::setEnableThreadSupport`` built with ``PYTHONQT_FULL_THREAD_SUPPORT``, which
neither CTK nor Slicer enables; neither calls ``PyEval_SaveThread``), so a Python thread in
Slicer's process runs only while the GUI thread itself runs Python. PySide6, unlike PythonQt,
releases the GIL in ``processEvents``; the loop calls Qt's ``QCoreApplication::processEvents``
through ``ctypes.PyDLL`` instead, which keeps the GIL for the whole call, as Slicer does.
"""

from __future__ import annotations

import ctypes
import enum
import glob
import logging
import os
import pathlib
import sys
import time
import types
import typing
import unittest

import pythonqt
import slicer
import vtk
from PySide6 import QtCore, QtWidgets
from render_views import SliceView

SLICER_PARAMETER_NAME = "SlicerParameterName"


class qSlicerScriptedLoadableModuleWidget(pythonqt.qMRMLWidget):
    """The panel a module widget is built into (``isEntered``, as qSlicerAbstractModuleWidget)."""

    def _get_entered(self) -> bool:
        return getattr(self, "_entered", True)

    isEntered = QtCore.Property(bool, _get_entered)


class Application:
    """``slicer.app``: what the module and Slicer's util functions call on it."""

    applicationName = "Slicer"

    def __init__(self, scene, testing: bool = False) -> None:
        self.scene = scene
        self.testing = testing
        self.logic = slicer.vtkSlicerApplicationLogic()
        self.logic.SetMRMLScene(scene)
        if hasattr(scene, "_fvlm_color_logic"):  # headless.new_scene's: module logics find it by name
            self.logic.SetModuleLogic("Colors", scene._fvlm_color_logic)

    def testingEnabled(self) -> bool:
        return self.testing

    def startupEnvironment(self):
        return pythonqt.wrap(QtCore.QProcessEnvironment.systemEnvironment())

    def topLevelWidgets(self) -> list:
        return []  # no main window: Slicer's message boxes only log (slicer.util._messageDisplay)

    def applicationLogic(self):
        return self.logic

    def processEvents(self) -> None:
        QtWidgets.QApplication.processEvents()

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def applicationFilePath(self) -> str:
        return sys.executable

    def coreIOManager(self) -> CoreIOManager:
        return CoreIOManager(self.scene, self.logic)


class CoreIOManager:
    """``slicer.app.coreIOManager()`` for volume files: ``loadNodes("VolumeFile", ...)`` does what
    Slicer's ``qSlicerVolumesReader::load`` does (Slicer 583e9b3,
    ``Modules/Loadable/Volumes/qSlicerVolumesReader.cxx``): node name from ``name`` or the file's
    base name, the option bits, ``vtkSlicerVolumesLogic::AddArchetypeVolume`` (Slicer's reader,
    from slicer-core), then unless ``show`` is false the volume made active and propagated to the
    slice views."""

    OPTIONS = {
        "labelmap": 0x1,
        "center": 0x2,
        "singleFile": 0x4,
        "autoWindowLevel": 0x8,
        "discardOrientation": 0x10,
    }

    def __init__(self, scene, app_logic) -> None:
        self.scene, self.app_logic = scene, app_logic

    def fileType(self, filename) -> str:
        return "VolumeFile"

    def loadNodes(self, filetype, properties, loaded_nodes, messages) -> bool:
        if filetype != "VolumeFile":
            raise NotImplementedError(f"the test application reads volume files only, not {filetype}")
        file_name = str(properties["fileName"])
        name = properties.get("name") or pathlib.Path(file_name).name.split(".")[0]  # QFileInfo::baseName
        options = sum(bit for key, bit in self.OPTIONS.items() if properties.get(key))
        logic = slicer.vtkSlicerVolumesLogic()
        logic.SetMRMLApplicationLogic(self.app_logic)  # its default colours come from the Colors logic
        logic.SetMRMLScene(self.scene)
        node = logic.AddArchetypeVolume(file_name, name, options, None)
        if node is None:
            messages.AddMessage(vtk.vtkCommand.ErrorEvent, f"could not read {file_name}")
            return False
        if properties.get("show", True):
            self.app_logic.GetSelectionNode().SetActiveVolumeID(node.GetID())
            self.app_logic.PropagateVolumeSelection()
        loaded_nodes.AddItem(node)
        return True


class DICOMDatabase:
    """``slicer.dicomDatabase`` (CTK's ``ctkDICOMDatabase``) as far as the module and the tests
    use it, kept in a folder. Checked against CTK 868d56c, ``Libs/DICOM/Core/ctkDICOMDatabase.h``
    and ``.cpp``: ``isOpen`` and ``isInMemory`` are Qt properties; ``fileForInstance(uid)`` is the
    file of a SOP Instance UID ("" when unknown); ``insert(filePath, storeFile=True, ...)`` does
    nothing for a file already indexed and unchanged (``fileExistsAndUpToDate``), otherwise reads
    the header and, with ``storeFile`` and a database on disk, stores a copy in the database
    folder (``storeDatasetFile``) and indexes the copy, else indexes the file where it is.
    ``fileValue(file, "gggg,eeee")`` gives a tag as text (values joined by backslashes)."""

    def __init__(self, folder) -> None:
        self.folder = pathlib.Path(folder)
        self.isOpen, self.isInMemory = True, False
        self._files: dict[str, dict] = {}  # stored file -> {uid, series, mtime}

    def insert(self, filePath, storeFile=True, generateThumbnail=True, createHierarchy=True, destination=""):
        import shutil

        import pydicom

        path = pathlib.Path(filePath)
        known = self._files.get(str(path))
        if known is not None and known["mtime"] == path.stat().st_mtime_ns:
            return
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if storeFile and not self.isInMemory:
            stored = self.folder / "dicom" / ds.StudyInstanceUID / ds.SeriesInstanceUID / ds.SOPInstanceUID
            stored.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, stored)
            path = stored
        self._files[str(path)] = {
            "uid": str(ds.SOPInstanceUID),
            "series": str(ds.SeriesInstanceUID),
            "mtime": path.stat().st_mtime_ns,
        }

    def fileForInstance(self, sopInstanceUID) -> str:
        return next((f for f, info in self._files.items() if info["uid"] == sopInstanceUID), "")

    def instanceForFile(self, fileName) -> str:
        return self._files.get(str(fileName), {}).get("uid", "")

    def filesForSeries(self, seriesUID) -> list[str]:
        return [f for f, info in self._files.items() if info["series"] == seriesUID]

    def fileValue(self, fileName, tag) -> str:
        import pydicom

        group, element = (int(v, 16) for v in tag.split(","))
        element = pydicom.dcmread(fileName, stop_before_pixels=True).get((group, element))
        if element is None or element.value is None:
            return ""
        values = element.value if element.VM > 1 else [element.value]
        return "\\".join(str(v) for v in values)


def load_dicom_series(db: DICOMDatabase, files: list[str], name: str):
    """Load a series of the database as Slicer's ``DICOMScalarVolumePlugin`` does (Slicer 583e9b3:
    files sorted along the slice normal, ``DICOMUtils.getSortedImageFiles``; read by
    ``loadFilesWithArchetype``, ``AddArchetypeScalarVolume``; slices reversed for a left-handed
    IJK; ``DICOM.instanceUIDs`` = each slice's SOP Instance UID, ``setVolumeNodeProperties``)."""
    import numpy as np

    first = [float(v) for v in db.fileValue(files[0], "0020,0037").split("\\")]
    normal = np.cross(first[:3], first[3:])
    position = lambda f: np.dot([float(v) for v in db.fileValue(f, "0020,0032").split("\\")], normal)  # noqa: E731
    files = sorted(files, key=position)
    names = vtk.vtkStringArray()
    for f in files:
        names.InsertNextValue(f)
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
    logic.SetMRMLScene(slicer.mrmlScene)
    node = logic.AddArchetypeScalarVolume(files[0], name, 0, names)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    if not slicer.vtkMRMLVolumeNode.IsIJKCoordinateSystemRightHanded(ijk_to_ras):
        slicer.vtkMRMLVolumeNode.ReverseSliceOrder(node.GetImageData(), ijk_to_ras)
        node.SetIJKToRASMatrix(ijk_to_ras)
        files = list(reversed(files))
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.instanceForFile(f) or "Unknown" for f in files))
    return node


# ------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule
# ------------------------------------------------------------------------------------------


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = self.moduleName
        parent.categories, parent.dependencies, parent.contributors = [], [], []
        parent.helpText = parent.acknowledgementText = ""


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Widget")
        self.developerMode = False
        if parent is None:
            parent = pythonqt.wrap(qSlicerScriptedLoadableModuleWidget())
            parent.setLayout(pythonqt.wrap(QtWidgets.QVBoxLayout()))
            parent.setMRMLScene(slicer.mrmlScene)
        self.parent = parent
        self.layout = self.parent.layout()

    def resourcePath(self, filename: str) -> str:
        module = sys.modules[self.__class__.__module__]
        return os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "Resources", filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def onReload(self) -> None:
        slicer.util.reloadScriptedModule(self.moduleName)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return slicer.mrmlScene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None) -> None:
        logging.info(message)


# ------------------------------------------------------------------------------------------
# slicer.parameterNodeWrapper
# ------------------------------------------------------------------------------------------


class Choice:
    def __init__(self, choices) -> None:
        self.choices = list(choices)


def _is_node_type(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


class _Field:
    """One typed parameter, serialized as Slicer's serializers do."""

    def __init__(self, name: str, kind, default) -> None:
        self.name, self.kind, self.default = name, kind, default

    def is_in(self, node) -> bool:
        if _is_node_type(self.kind):
            return node.GetNodeReferenceID(self.name) is not None
        return node.GetParameterNames() is not None and self.name in node.GetParameterNames()

    def write(self, node, value) -> None:
        if _is_node_type(self.kind):
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif isinstance(self.kind, type) and issubclass(self.kind, enum.Enum):
            node.SetParameter(self.name, value.name)
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if _is_node_type(self.kind):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if isinstance(self.kind, type) and issubclass(self.kind, enum.Enum):
            return self.kind[text]
        if self.kind is bool:
            return text == "True"
        return self.kind(text)


def _default(kind):
    if _is_node_type(kind):
        return None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return next(iter(kind))
    return kind()


class _Connector:
    """A widget <-> value binding (Slicer's GuiConnector classes, for four widget types)."""

    def __init__(self, widget, kind) -> None:
        self.widget, self.kind = widget, kind
        qt_widget = pythonqt.unwrap(widget)
        if isinstance(qt_widget, pythonqt.qMRMLNodeComboBox) and _is_node_type(kind):
            widget.nodeTypes = [kind.__name__]
            self.signal, self.read, self.write = (
                "currentNodeChanged",
                widget.currentNode,
                widget.setCurrentNode,
            )
        elif type(qt_widget) is QtWidgets.QComboBox and issubclass(kind, enum.Enum):
            label = getattr(kind, "label", lambda member: member.name)
            self.members = list(kind)
            widget.clear()
            for member in self.members:
                widget.addItem(label(member))
            self.signal = "currentIndexChanged"
            self.read = lambda: self.members[widget.currentIndex]
            self.write = lambda value: setattr(widget, "currentIndex", self.members.index(value))
        elif isinstance(qt_widget, pythonqt.ctkPathLineEdit) and kind is pathlib.Path:
            self.signal = "currentPathChanged"
            self.read = lambda: pathlib.Path(widget.currentPath)
            self.write = lambda value: setattr(widget, "currentPath", str(value))
        elif type(qt_widget) is QtWidgets.QCheckBox and kind is bool:
            self.signal = "stateChanged"
            self.read = lambda: widget.checked
            self.write = lambda value: setattr(widget, "checked", bool(value))
        else:
            raise RuntimeError(f"no GUI connector for a {type(qt_widget).__name__} and {kind}")


def parameterNodeWrapper(cls):
    """Typed properties over a vtkMRMLScriptedModuleNode, and ``connectGui`` (see module docstring)."""
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]), include_extras=True)
    fields = {}
    for name, hint in hints.items():
        kind = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        fields[name] = _Field(name, kind, getattr(cls, name, _default(kind)))

    def __init__(self, parameterNode) -> None:
        self.parameterNode, self._guis, self._updating = parameterNode, {}, False
        for f in fields.values():
            if not f.is_in(parameterNode):
                f.write(parameterNode, f.default)

    def make_property(f: _Field):
        return property(
            lambda self: f.read(self.parameterNode), lambda self, v: f.write(self.parameterNode, v)
        )

    namespace = {name: make_property(f) for name, f in fields.items()}
    namespace.update(
        __init__=__init__,
        allParameters=fields,
        getValue=lambda self, name: getattr(self, name),
        setValue=lambda self, name, value: setattr(self, name, value),
        connectGui=_connect_gui,
        disconnectGui=_disconnect_gui,
        AddObserver=lambda self, event, cb, priority=0.0: self.parameterNode.AddObserver(event, cb, priority),
        RemoveObserver=lambda self, tag: self.parameterNode.RemoveObserver(tag),
        StartModify=lambda self: self.parameterNode.StartModify(),
        EndModify=lambda self, was: self.parameterNode.EndModify(was),
        Modified=lambda self: self.parameterNode.Modified(),
    )
    return type(cls.__name__, (), {**{"__module__": cls.__module__, "__doc__": cls.__doc__}, **namespace})


def _connect_gui(self, gui) -> int:
    """Bind every widget of ``gui`` (a ``childWidgetVariables`` object) named by SlicerParameterName."""
    connectors = {}
    for widget in vars(gui).values():
        name = widget.property(SLICER_PARAMETER_NAME)
        if name:
            connector = _Connector(widget, self.allParameters[name].kind)
            connector.write(getattr(self, name))

            def changed(*args, name=name, connector=connector):
                if not self._updating:
                    setattr(self, name, connector.read())

            getattr(widget, connector.signal).connect(changed)
            connector.changed = changed
            connectors[name] = connector
    tag = len(self._guis) + 1
    self._guis[tag] = connectors

    def update_gui(caller, event):
        if self._updating:
            return
        self._updating = True
        try:
            for guimap in self._guis.values():
                for param, connector in guimap.items():
                    connector.write(getattr(self, param))
        finally:
            self._updating = False

    self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, update_gui)
    return tag


def _disconnect_gui(self, tag) -> None:
    for connector in self._guis.pop(tag, {}).values():
        getattr(connector.widget, connector.signal).disconnect(connector.changed)


# ------------------------------------------------------------------------------------------
# the main loop
# ------------------------------------------------------------------------------------------

#: ``QCoreApplication::processEvents(QEventLoop::ProcessEventsFlags)`` (Itanium C++ ABI name).
_PROCESS_EVENTS = "_ZN16QCoreApplication13processEventsE6QFlagsIN10QEventLoop17ProcessEventsFlagEE"
_WAIT_FOR_MORE_EVENTS = 0x04  # QEventLoop::WaitForMoreEvents


def _qt_process_events_holding_gil():
    """Qt's own processEvents, called so that the GIL stays held (``ctypes.PyDLL``), or None
    where the symbol is not found (then :class:`EventLoop` sleeps in C holding the GIL)."""
    import PySide6

    for path in glob.glob(os.path.join(os.path.dirname(PySide6.__file__), "Qt", "lib", "libQt6Core.so*")):
        function = getattr(ctypes.PyDLL(path), _PROCESS_EVENTS, None)
        if function is not None:
            function.argtypes, function.restype = [ctypes.c_int], None
            return function
    return None


class EventLoop:
    """The application's main loop, run until a condition holds (see the module docstring).

    ``holds_gil=True``: like Slicer's, the loop keeps the GIL while it waits for events and
    dispatches them (a Python slot runs when its event comes, as in Slicer). ``holds_gil=False``:
    a free loop, whose waits release the GIL (what PySide6 and ``time.sleep`` do).
    """

    #: The loop wakes at least this often (ms) to look at its condition, as Slicer's many timers do.
    HEARTBEAT_MS = 50

    def __init__(self, holds_gil: bool) -> None:
        self.holds_gil = holds_gil
        self._process = _qt_process_events_holding_gil() if holds_gil else None
        self._heartbeat = QtCore.QTimer()  # no slot: a C++ event that only wakes the loop

    def _turn(self) -> None:
        if not self.holds_gil:
            QtWidgets.QApplication.processEvents()
            time.sleep(0.005)  # releases the GIL
        elif self._process is not None:
            self._process(_WAIT_FOR_MORE_EVENTS)  # blocks for the next event, GIL held
        else:  # no Qt symbol: dispatch, then wait in C with the GIL held
            QtWidgets.QApplication.processEvents()
            ctypes.PyDLL(None).usleep(5000)

    def run_until(self, condition, timeout_s: float) -> float:
        """Run until ``condition()``; the seconds it took (TimeoutError after ``timeout_s``)."""
        t0 = time.monotonic()
        self._heartbeat.start(self.HEARTBEAT_MS)
        try:
            while not condition():
                self._turn()
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"not done within {timeout_s:g} s")
        finally:
            self._heartbeat.stop()
        return time.monotonic() - t0


# ------------------------------------------------------------------------------------------
# installing it
# ------------------------------------------------------------------------------------------


def _settings_in(folder: str) -> None:
    """QSettings (path histories) go to ``folder``, never to the user's real settings."""
    QtCore.QCoreApplication.setOrganizationName("fvlm-tests")
    QtCore.QCoreApplication.setApplicationName("slicer-app")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, folder)


def install(scene, settings_dir: str, testing: bool = False, view_size=(400, 400)) -> Application:
    """Make ``qt``, ``ctk`` and ``slicer`` look like Slicer's for module code (see module docstring).

    ``app.views`` holds the Red, Yellow and Green slice views (``render_views.SliceView``).
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    if QtWidgets.QApplication.instance() is None:
        QtWidgets.QApplication([])
    _settings_in(settings_dir)
    sys.modules["qt"] = pythonqt.qt_module()
    sys.modules["ctk"] = pythonqt.ctk_module()
    loadable = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(loadable, cls.__name__, cls)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.Choice = parameterNodeWrapper, Choice
    sys.modules[loadable.__name__], sys.modules[wrapper.__name__] = loadable, wrapper
    app = Application(scene, testing)
    slicer.app, slicer.mrmlScene = app, scene
    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = loadable, wrapper
    slicer.qMRMLWidget = pythonqt.ClassWrapper(pythonqt.qMRMLWidget)
    slicer.qMRMLNodeComboBox = pythonqt.ClassWrapper(pythonqt.qMRMLNodeComboBox)
    slicer.modules = types.SimpleNamespace()
    # the slice views of Slicer's default layout, rendered offscreen by Slicer's own pipeline
    app.views = {name: SliceView(scene, app.logic, name, view_size) for name in ("Red", "Yellow", "Green")}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        app.views[name].node.SetOrientation(orientation)
    return app


def uninstall() -> None:
    """Undo :func:`install` (other tests import the plain slicer-core package)."""
    for name in ("qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"):
        sys.modules.pop(name, None)
    names = ("app", "mrmlScene", "ScriptedLoadableModule", "parameterNodeWrapper", "modules", "dicomDatabase")
    for attr in names:
        if hasattr(slicer, attr):
            delattr(slicer, attr)
