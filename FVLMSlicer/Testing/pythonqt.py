"""A PythonQt-like binding over PySide6, to run a Slicer module's widget code outside Slicer.

3D Slicer's Python sees Qt through PythonQt (``import qt``, ``import ctk``), whose rules differ
from PySide6's in ways that break code written against the wrong one. :func:`qt_module` and
:func:`ctk_module` return stand-ins for those modules: every object they hand out is wrapped so
that attribute access follows PythonQt, as read in PythonQt's source (MeVisLab/pythonqt
``src/PythonQtInstanceWrapper.cpp`` ``PythonQtInstanceWrapper_getattro`` / ``_setattro`` and
``src/PythonQtClassInfo.cpp`` ``PythonQtClassInfo::member``; commontk/PythonQt, Slicer's fork,
has the same order):

1. On a QObject, a name that is a Qt property of the object is the property's *value*, found
   before any method: ``selectionModel().selectedIndexes`` is a list (calling it raises
   TypeError), ``combo.currentText`` a str, ``table.rowCount`` an int. The one exception PythonQt
   makes: ``QTimer.singleShot`` stays the static method. ``name`` is ``objectName`` (Slicer's
   ``childWidgetVariables`` relies on it).
2. Then methods, slots and signals; then dynamic properties (``widget.SlicerParameterName``);
   then child objects by ``objectName``; anything else is AttributeError.
3. Assigning a property writes it (a read-only one raises); assigning a method name raises;
   creating a new attribute on a C++ object raises.
4. ``obj.connect("signal(args)", callable)`` connects by Qt signature; a signature the object
   does not have is an error here (PythonQt prints it and returns False: the connection is
   silently missing). A callable gets as many signal arguments as it accepts.
5. Static helpers return what PythonQt returns: ``QFileDialog.getOpenFileName`` a str (PySide6:
   a (path, filter) tuple).

Slicer's own widgets in the .ui (``qMRMLWidget``, ``qMRMLNodeComboBox``, ``ctkPathLineEdit``,
``ctkCollapsibleButton``) are replaced by the small classes below, which declare the Qt
properties, slots and signals of the real classes that the module uses (from Slicer's
``qMRMLNodeComboBox.h`` / ``qMRMLWidget.h`` and CTK's ``ctkPathLineEdit.h`` /
``ctkCollapsibleButton.h``) and draw a plain look-alike. Qt is PySide6's (Qt 6) while Slicer
5.10-5.12 use Qt 5.15: the properties this module touches are the same in both.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import xml.etree.ElementTree as ET

import shiboken6
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

QT_MODULES = (QtCore, QtGui, QtWidgets, QtUiTools)
_MISSING = object()


class PythonQtError(AttributeError):
    """What PythonQt would refuse (or, for a bad connect, silently ignore)."""


# ------------------------------------------------------------------------------------------
# wrapping
# ------------------------------------------------------------------------------------------


def unwrap(value):
    """The PySide6 object(s) behind wrappers (for calls into PySide6)."""
    if isinstance(value, Wrapper):
        return object.__getattribute__(value, "_qt")
    if isinstance(value, ClassWrapper):
        return value._cls
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(unwrap(v) for v in value)
    return value


def wrap(value):
    """Wrap what PySide6 returns the way PythonQt wraps C++ objects."""
    if isinstance(value, Wrapper | ClassWrapper):
        return value
    if isinstance(value, shiboken6.Shiboken.Object):
        if isinstance(value, QtCore.QObject) and not shiboken6.isValid(value):
            return None
        return Wrapper(value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(wrap(v) for v in value)
    return value


def _positional_capacity(fn) -> int | None:
    """How many positional arguments ``fn`` takes (None: any number)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def _slot(fn):
    """A PySide6 slot calling ``fn`` with wrapped arguments, trimmed to what ``fn`` accepts."""
    capacity = _positional_capacity(fn)

    def slot(*args):
        args = wrap(args)
        return fn(*(args if capacity is None else args[:capacity]))

    return slot


def _callable(fn, name: str = ""):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return wrap(fn(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()}))

    return call


_CONNECTIONS: dict[tuple[int, str, int], object] = {}


def _normalized(signature: str) -> str:
    """A Qt signature as PySide6 registers it: VTK (and other non-Qt) pointers are PyObject."""
    signature = re.sub(r"\bvtk\w+\s*\*", "PyObject", signature.strip())
    return QtCore.QMetaObject.normalizedSignature(signature).data().decode()


def connect(obj, signature: str, fn) -> bool:
    """PythonQt's ``QObject.connect(signature, callable)``."""
    normalized = _normalized(signature)
    if obj.metaObject().indexOfSignal(normalized) == -1:
        raise PythonQtError(
            f"PythonQt: QObject::connect() signal '{signature}' does not exist on "
            f"{obj.metaObject().className()} (PythonQt ignores such a connect: nothing would happen)"
        )
    slot = _slot(fn)
    QtCore.QObject.connect(obj, QtCore.SIGNAL(normalized), slot)
    _CONNECTIONS[(id(obj), normalized, id(fn))] = slot
    return True


def disconnect(obj, signature: str, fn=None) -> bool:
    normalized = _normalized(signature)
    keys = [
        k for k in _CONNECTIONS if k[0] == id(obj) and k[1] == normalized and (fn is None or k[2] == id(fn))
    ]
    for key in keys:
        QtCore.QObject.disconnect(obj, QtCore.SIGNAL(normalized), _CONNECTIONS.pop(key))
    return bool(keys)


_SIGNAL_SLOTS: dict[tuple[int, str, int], object] = {}


class SignalWrapper:
    """A bound signal as PythonQt exposes it: ``connect``, ``disconnect``, ``emit``."""

    def __init__(self, signal, owner, name: str) -> None:
        self._signal, self._key = signal, (id(owner), name)

    def connect(self, fn) -> None:
        slot = _slot(fn)
        _SIGNAL_SLOTS[(*self._key, id(fn))] = slot
        self._signal.connect(slot)

    def disconnect(self, fn=None) -> None:
        if fn is None:
            self._signal.disconnect()
            for key in [k for k in _SIGNAL_SLOTS if k[:2] == self._key]:
                del _SIGNAL_SLOTS[key]
        else:
            self._signal.disconnect(_SIGNAL_SLOTS.pop((*self._key, id(fn))))

    def emit(self, *args) -> None:
        self._signal.emit(*unwrap(args))


def _qt_property_index(obj, name: str) -> int:
    if name == "singleShot" and isinstance(obj, QtCore.QTimer):
        return -1  # PythonQtClassInfo::lookForPropertyAndCache ignores it for QTimer
    return obj.metaObject().indexOfProperty(name)


def _qobject_member(obj, name: str):
    """PythonQt's lookup order on a QObject, up to (not including) plain methods."""
    index = _qt_property_index(obj, name)
    if index == -1 and name == "name":  # PYTHONQT_SUPPORT_NAME_PROPERTY
        index, name = obj.metaObject().indexOfProperty("objectName"), "objectName"
    if index != -1:
        return wrap(obj.metaObject().property(index).read(obj))
    if name == "connect":
        return lambda signature, fn: connect(obj, signature, fn)
    if name == "disconnect":
        return lambda signature, fn=None: disconnect(obj, signature, fn)
    return _MISSING


def lookup(obj, name: str):
    """``wrapper.<name>`` with PythonQt's rules (see the module docstring)."""
    if isinstance(obj, QtCore.QObject):
        if not shiboken6.isValid(obj):
            raise ValueError(f"Trying to read '{name}' from a destroyed {type(obj).__name__} object")
        found = _qobject_member(obj, name)
        if found is not _MISSING:
            return found
    attr = getattr(obj, name, _MISSING)
    if attr is not _MISSING:
        if isinstance(attr, QtCore.SignalInstance):
            return SignalWrapper(attr, obj, name)
        return _callable(attr, name) if callable(attr) else wrap(attr)
    if isinstance(obj, QtCore.QObject):
        if name.encode() in [bytes(n.data()) for n in obj.dynamicPropertyNames()]:
            return wrap(obj.property(name))
        if name == "className":
            return lambda: obj.metaObject().className()
        for child in obj.children():
            if child.objectName() == name:
                return wrap(child)
    raise AttributeError(f"{type(obj).__name__} has no attribute named '{name}'")


def assign(obj, name: str, value) -> None:
    """``wrapper.<name> = value`` with PythonQt's rules."""
    if isinstance(obj, QtCore.QObject):
        index = _qt_property_index(obj, name)
        if index != -1:
            prop = obj.metaObject().property(index)
            if not prop.isWritable():
                raise PythonQtError(f"Property '{name}' of {type(obj).__name__} object is not writable")
            if not prop.write(obj, unwrap(value)):
                raise PythonQtError(
                    f"Property '{name}' of type '{prop.typeName()}' does not accept an object of type "
                    f"{type(value).__name__} ({value!r})"
                )
            return
        if hasattr(obj, name):
            raise PythonQtError(f"Slot '{name}' can not be overwritten on {type(obj).__name__} object")
        if name.encode() in [bytes(n.data()) for n in obj.dynamicPropertyNames()]:
            obj.setProperty(name, unwrap(value))
            return
    raise PythonQtError(
        f"'{name}' does not exist on {type(obj).__name__} and creating new attributes on C++ objects is not allowed"
    )


class Wrapper:
    """A Qt object seen through PythonQt's attribute rules."""

    __slots__ = ("_qt",)

    def __init__(self, obj) -> None:
        object.__setattr__(self, "_qt", obj)

    def __getattr__(self, name: str):
        return lookup(object.__getattribute__(self, "_qt"), name)

    def __setattr__(self, name: str, value) -> None:
        assign(object.__getattribute__(self, "_qt"), name, value)

    def __eq__(self, other) -> bool:
        mine = object.__getattribute__(self, "_qt")
        theirs = unwrap(other)
        return mine is theirs or (type(mine) is type(theirs) and mine == theirs)

    def __hash__(self) -> int:
        return id(object.__getattribute__(self, "_qt"))

    def __repr__(self) -> str:
        return f"<PythonQt-like {object.__getattribute__(self, '_qt')!r}>"

    def __str__(self) -> str:
        return str(object.__getattribute__(self, "_qt"))

    def __bool__(self) -> bool:
        return True  # a wrapper always holds an object (PythonQt gives None for a null pointer)

    def __len__(self) -> int:
        return len(object.__getattribute__(self, "_qt"))

    def __iter__(self):
        return iter(wrap(list(object.__getattribute__(self, "_qt"))))


class ClassWrapper:
    """``qt.<Class>``: construct wrapped instances; static methods and enums as PythonQt has them."""

    def __init__(self, cls) -> None:
        self._cls = cls

    def __call__(self, *args, **kwargs):
        return wrap(self._cls(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()}))

    def __getattr__(self, name: str):
        attr = getattr(self._cls, name)
        if isinstance(attr, type) and issubclass(attr, shiboken6.Shiboken.Object):
            return ClassWrapper(attr)
        if callable(attr) and not isinstance(attr, type) and not hasattr(attr, "value"):
            call = _callable(attr, name)
            if self._cls is QtWidgets.QFileDialog and name in ("getOpenFileName", "getSaveFileName"):
                return lambda *a, **k: call(*a, **k)[0]  # PythonQt returns the QString only
            return call
        return attr

    def __instancecheck__(self, instance) -> bool:
        return isinstance(unwrap(instance), self._cls)

    def __repr__(self) -> str:
        return f"<PythonQt-like class {self._cls.__name__}>"


# ------------------------------------------------------------------------------------------
# stand-ins for Slicer's and CTK's widgets
# ------------------------------------------------------------------------------------------


def _prop(kind, name: str, default, notify=None):
    """A Qt property stored in ``self._<name>`` (declared like the real class's Q_PROPERTY)."""

    def get(self):
        return getattr(self, f"_{name}", default)

    def set_(self, value):
        setattr(self, f"_{name}", value)

    return QtCore.Property(kind, get, set_, notify=notify) if notify else QtCore.Property(kind, get, set_)


class qMRMLWidget(QtWidgets.QWidget):
    """Slicer's qMRMLWidget: ``setMRMLScene`` slot, ``mrmlScene()``, ``mrmlSceneChanged`` signal."""

    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None

    @QtCore.Slot(object)
    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(QtWidgets.QWidget):
    """Slicer's node selector (a QWidget holding a combo box), on a real MRML scene."""

    currentNodeChanged = QtCore.Signal((object,), (bool,))
    currentNodeIDChanged = QtCore.Signal(str)
    nodeTypes = _prop("QStringList", "nodeTypes", [])
    showChildNodeTypes = _prop(bool, "showChildNodeTypes", True)
    showHidden = _prop(bool, "showHidden", False)
    noneEnabled = _prop(bool, "noneEnabled", False)
    addEnabled = _prop(bool, "addEnabled", True)
    removeEnabled = _prop(bool, "removeEnabled", True)
    editEnabled = _prop(bool, "editEnabled", False)
    renameEnabled = _prop(bool, "renameEnabled", False)
    noneDisplay = _prop(str, "noneDisplay", "None")

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene, self._current, self._observers = None, None, []
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._combo = QtWidgets.QComboBox(self)
        layout.addWidget(self._combo)

    def _candidates(self) -> list:
        if self._scene is None:
            return []
        out = []
        for i in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(i)
            exact = node.GetClassName() in self.nodeTypes
            typed = exact or (self.showChildNodeTypes and any(node.IsA(t) for t in self.nodeTypes))
            if typed and (self.showHidden or not node.GetHideFromEditors()):
                out.append(node)
        return out

    def _refresh(self, *args) -> None:
        nodes = self._candidates()
        if self._current is not None and self._current not in nodes:
            self._current = None
        if self._current is None and not self.noneEnabled and nodes:
            self._current = nodes[0]  # the real selector picks a node when "None" is not allowed
        self._combo.blockSignals(True)
        self._combo.clear()
        self._combo.addItems(([self.noneDisplay] if self.noneEnabled else []) + [n.GetName() for n in nodes])
        if self._current is not None:
            self._combo.setCurrentIndex(nodes.index(self._current) + (1 if self.noneEnabled else 0))
        self._combo.blockSignals(False)

    @QtCore.Slot(object)
    def setMRMLScene(self, scene) -> None:
        for tag in self._observers:
            self._scene.RemoveObserver(tag)
        self._scene, self._observers = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndImportEvent):
                self._observers.append(scene.AddObserver(event, self._on_scene_changed))
        self._on_scene_changed()

    def _on_scene_changed(self, *args) -> None:
        before = self._current
        self._refresh()
        if self._current is not before:
            self._emit()

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        return self._current

    def currentNodeID(self) -> str:
        return self._current.GetID() if self._current is not None else ""

    @QtCore.Slot(object)
    def setCurrentNode(self, node) -> None:
        if isinstance(node, str):
            node = self._scene.GetNodeByID(node) if self._scene is not None and node else None
        if node is self._current:
            return
        self._current = node
        self._refresh()
        self._emit()

    @QtCore.Slot(str)
    def setCurrentNodeID(self, node_id: str) -> None:
        self.setCurrentNode(node_id)

    def _emit(self) -> None:
        self.currentNodeChanged[object].emit(self._current)
        self.currentNodeChanged[bool].emit(self._current is not None)
        self.currentNodeIDChanged.emit(self.currentNodeID())


class ctkPathLineEdit(QtWidgets.QWidget):
    """CTK's path editor: ``currentPath`` (USER property), history kept under ``settingKey``."""

    currentPathChanged = QtCore.Signal(str)
    validInputChanged = QtCore.Signal(bool)
    label = _prop(str, "label", "")
    settingKey = _prop(str, "settingKey", "")
    showBrowseButton = _prop(bool, "showBrowseButton", True)
    showHistoryButton = _prop(bool, "showHistoryButton", True)
    nameFilters = _prop("QStringList", "nameFilters", [])

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._path = ""
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._edit = QtWidgets.QComboBox(self)
        self._edit.setEditable(True)
        self._edit.setSizePolicy(QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Fixed)
        self._edit.setMinimumContentsLength(8)
        self._edit.setSizeAdjustPolicy(QtWidgets.QComboBox.AdjustToMinimumContentsLengthWithIcon)
        layout.addWidget(self._edit)
        browse = QtWidgets.QToolButton(self)
        browse.setText("...")
        layout.addWidget(browse)

    def _get_path(self) -> str:
        return self._path

    @QtCore.Slot(str)
    def setCurrentPath(self, path: str) -> None:
        if path == self._path:
            return
        self._path = path
        self._edit.setEditText(path)
        self.currentPathChanged.emit(path)

    currentPath = QtCore.Property(str, _get_path, setCurrentPath, user=True)

    def history(self) -> list[str]:
        values = QtCore.QSettings().value(self.settingKey) if self.settingKey else None
        return list(values) if isinstance(values, list) else ([values] if values else [])

    @QtCore.Slot()
    def addCurrentPathToHistory(self) -> None:
        """Keep the path first in the history list stored under ``settingKey`` (as CTK does)."""
        if not self.settingKey or not self._path:
            return
        paths = [self._path] + [p for p in self.history() if p != self._path]
        QtCore.QSettings().setValue(self.settingKey, paths[:5])
        self._edit.clear()
        self._edit.addItems(paths[:5])
        self._edit.setEditText(self._path)


class ctkCollapsibleButton(QtWidgets.QAbstractButton):
    """CTK's collapsible section: a header button; ``collapsed`` hides the contents."""

    contentsCollapsed = QtCore.Signal(bool)
    HEADER = 24

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False
        self.setContentsMargins(4, self.HEADER + 4, 4, 4)
        self.clicked.connect(lambda: self.setCollapsed(not self._collapsed))

    def _get_collapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)
        self.updateGeometry()
        self.contentsCollapsed.emit(self._collapsed)

    collapsed = QtCore.Property(bool, _get_collapsed, setCollapsed)
    collapsedHeight = _prop(int, "collapsedHeight", 14)

    def sizeHint(self) -> QtCore.QSize:
        hint = self.layout().sizeHint() if self.layout() and not self._collapsed else QtCore.QSize(100, 0)
        return QtCore.QSize(
            hint.width() + 8, hint.height() + (self.HEADER + 8 if not self._collapsed else self.HEADER)
        )

    def minimumSizeHint(self) -> QtCore.QSize:
        return self.sizeHint()

    def hitButton(self, pos) -> bool:
        return pos.y() < self.HEADER

    def paintEvent(self, event) -> None:
        painter = QtGui.QPainter(self)
        option = QtWidgets.QStyleOptionButton()
        option.initFrom(self)
        option.rect = QtCore.QRect(0, 0, self.width(), self.HEADER)
        option.text = ("\u25b8 " if self._collapsed else "\u25be ") + self.text()
        self.style().drawControl(QtWidgets.QStyle.CE_PushButton, option, painter, self)
        if not self._collapsed:
            painter.setPen(self.palette().mid().color())
            painter.drawRect(0, self.HEADER, self.width() - 1, self.height() - self.HEADER - 1)


STAND_INS = {
    "qMRMLWidget": qMRMLWidget,
    "qMRMLNodeComboBox": qMRMLNodeComboBox,
    "ctkPathLineEdit": ctkPathLineEdit,
    "ctkCollapsibleButton": ctkCollapsibleButton,
}


# ------------------------------------------------------------------------------------------
# .ui loading and the modules
# ------------------------------------------------------------------------------------------


def _prepare_ui(text: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """The .ui without its Designer connections (made by name after loading) and the CTK
    ``filters`` set (a CTK enum QFormBuilder cannot read without CTK's designer plugins)."""
    root = ET.fromstring(text)
    connections = [
        (c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
        for c in root.iter("connection")
    ]
    for parent in root.iter():
        for child in list(parent):
            if child.tag == "connections" or (
                child.tag == "property"
                and child.find("set") is not None
                and "ctk" in (child.findtext("set") or "")
            ):
                parent.remove(child)
    return ET.tostring(root, encoding="unicode"), connections


class UiLoader:
    """``qt.QUiLoader()``: QUiLoader with the stand-in widgets; .ui connections made by name."""

    def load(self, device, parent=None):
        device = unwrap(device)
        device.seek(0)
        text, connections = _prepare_ui(bytes(device.readAll().data()).decode("utf-8"))
        loader = QtUiTools.QUiLoader()
        for cls in STAND_INS.values():
            loader.registerCustomWidget(cls)
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(text.encode("utf-8")))
        buffer.open(QtCore.QIODevice.ReadOnly)
        widget = loader.load(buffer, unwrap(parent))
        if widget is None:
            return None
        objects = {o.objectName(): o for o in [widget, *widget.findChildren(QtCore.QObject)]}
        for sender, signal, receiver, slot in connections:
            target = getattr(objects[receiver], slot.split("(")[0])
            connect(objects[sender], signal, target)
        return wrap(widget)


def _module(name: str, extra: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(extra)

    def __getattr__(attr: str):
        for qt_module in QT_MODULES:
            cls = getattr(qt_module, attr, None)
            if cls is not None:
                return ClassWrapper(cls) if isinstance(cls, type) else cls
        raise AttributeError(f"module '{name}' has no attribute '{attr}'")

    module.__getattr__ = __getattr__
    return module


def qt_module() -> types.ModuleType:
    """The stand-in for Slicer's ``qt`` module."""
    return _module("qt", {"QUiLoader": UiLoader, "PythonQtError": PythonQtError})


def ctk_module() -> types.ModuleType:
    """The stand-in for Slicer's ``ctk`` module (the CTK widgets the .ui uses)."""
    module = types.ModuleType("ctk")
    for name in ("ctkPathLineEdit", "ctkCollapsibleButton"):
        setattr(module, name, ClassWrapper(STAND_INS[name]))
    return module
